"""``eptq-onnx-analyze``: the analysis command, with the calibration and quantization options of ``eptq-onnx``."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

import click

from eptq_onnx.analysis.api import analyze
from eptq_onnx.analysis.result import SHOWN_POINTS, print_table
from eptq_onnx.cli import (DEBUG_OPTION, DEVICE_OPTION, QUANTIZATION_OPTIONS, QUIET_OPTION, SAMPLES_OPTION, _Command,
                           _third_party_warnings, one_line_errors, quantization_settings)
from eptq_onnx.config import OptimizeOptions, QuantConfig

EXIT_CODES = """\b
Exit codes: 0 success, 1 internal error, 2 bad usage or paths, 3 bad model (or one without a torch
twin), 4 bad calibration data, 130 interrupted (Ctrl-C), 143 terminated (SIGTERM). No model is written."""


@click.command(cls=_Command, epilog=EXIT_CODES, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("input_model", metavar="INPUT.onnx", type=click.Path(path_type=Path))
@QUANTIZATION_OPTIONS
@SAMPLES_OPTION
@DEVICE_OPTION
@click.option("--output", "outputs", multiple=True, metavar="NAME",
              help="Rank by this model output (repeatable; the worst of them counts). Default: every float output.")
@click.option("--top", type=click.IntRange(min=1), default=SHOWN_POINTS, show_default=True,
              help="Points shown in the terminal table (the JSON report has all).")
@click.option("--report", "report_path", type=click.Path(path_type=Path), default=None,
              help="Write the JSON report here: every point ranked, every tensor's SQNR, the cost.")
@click.option("--plots", "plots_dir", type=click.Path(path_type=Path), default=None,
              help="Write analysis.png here: the SQNR of every tensor along the graph, the costliest points marked.")
@QUIET_OPTION
@DEBUG_OPTION
def main(input_model: Path, calib_dir: Path, weight_bits: int, act_bits: str, act_symmetric: bool, calib_method: str,
         weight_init: str, weight_rounding: str, act16_below: float, equalize: bool, float_weights_below: float, percentile: float, target: str,
         reduce_range: Optional[bool],
         exclude: Tuple[str, ...], overrides_file: Optional[Path],
         quantize_outputs: bool,
         float_bias: bool, num_calib: Optional[int], batch_size: int, image_size: Optional[str], mean: Optional[str],
         std: Optional[str], pixel_scale: float, layout: str, bgr: bool, sensitivity_samples: int, device: str, outputs: Tuple[str, ...], top: int,
         report_path: Optional[Path], plots_dir: Optional[Path], quiet: bool, debug: bool) -> None:
    """Rank every quantization point of INPUT.onnx by what it costs, without writing a model.

    The model is prepared and MSE-initialized as eptq-onnx does with the same options (no EPTQ
    optimization, as with --iters 0). On --sensitivity-samples calibration samples, each weight and
    each activation point is measured twice: the output SQNR against the float model when only it is
    quantized, and when it is left float in the quantized model as --exclude of its node leaves
    it (with the points in front of it that then feed no quantized layer: the gain is what that
    --exclude buys). Points are ranked by their share of the quantized model's output
    noise. The float-vs-quantized SQNR of every tensor along the graph goes to --report and --plots.

    \b
    Example:
      eptq-onnx-analyze model.onnx --calib calib_dir/ --weight-bits 8 --report analysis.json --plots plots/
      eptq-onnx model.onnx model_w8a8.onnx --calib calib_dir/ --weight-bits 8 --exclude NODE_RANKED_FIRST
    """
    with one_line_errors(debug):
        config = QuantConfig(
            **quantization_settings(
                weight_bits=weight_bits, act_bits=act_bits, act_symmetric=act_symmetric, calib_method=calib_method,
                weight_init=weight_init, weight_rounding=weight_rounding, act16_below=act16_below, equalize=equalize,
                float_weights_below=float_weights_below, percentile=percentile,
                target=target, reduce_range=reduce_range, exclude=exclude,
                overrides_file=overrides_file, quantize_outputs=quantize_outputs, float_bias=float_bias, num_calib=num_calib, batch_size=batch_size,
                image_size=image_size, mean=mean, std=std, pixel_scale=pixel_scale, layout=layout, bgr=bgr),
            measure_latency=False,
            optimize=OptimizeOptions(iters=0, device=device),
        )
        with _third_party_warnings(shown=not quiet):
            result = analyze(input_model, calib_dir, config, samples=sensitivity_samples, outputs=outputs, report_path=report_path,
                             plots_dir=plots_dir, progress=not quiet)
    if not quiet:
        print_table(result, shown=top)
        written = [str(p) for p in (report_path, plots_dir and Path(plots_dir) / "analysis.png") if p]
        if written:
            click.echo("wrote " + " and ".join(written))


if __name__ == "__main__":  # pragma: no cover
    main()
