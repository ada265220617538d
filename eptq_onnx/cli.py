"""Command line: a thin click layer over ``eptq_onnx.quantize``."""
from __future__ import annotations

import signal
import sys
import traceback
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional, Tuple, TypeVar

import click

from eptq_onnx.config import SUPPORTED_WEIGHT_BITS, CalibOptions, ImageOptions, MixedPrecisionOptions, OptimizeOptions, QuantConfig
from eptq_onnx.config_file import config_option
from eptq_onnx.errors import EptqError, UsageError
from eptq_onnx.pipeline import quantize
from eptq_onnx.report import print_summary
from eptq_onnx.plan.overrides import read_overrides
from eptq_onnx.plan.targets import DEFAULT_TARGET, TARGETS

EXIT_CODES = """\b
Exit codes: 0 success, 1 internal error, 2 bad usage or paths, 3 bad model,
4 bad calibration data, 5 validation of the written model failed, 6 --min-sqnr not reached
with --strict, 130 interrupted (Ctrl-C),
143 terminated (SIGTERM); no model is written on an error or an interruption, and once
the model was read --report says why (the error, the stages that ran, what was measured)."""
TERMINATED_EXIT_CODE = 128 + signal.SIGTERM
F = TypeVar("F", bound=Callable[..., Any])


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, so that it unwinds like Ctrl-C (temporary files removed)."""

    exit_code = TERMINATED_EXIT_CODE


@contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """While the run lasts, SIGTERM raises Terminated (default: the process dies without cleanup)."""

    def handler(signum: int, frame: object) -> None:
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals to the caller
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def _third_party_warnings(shown: bool) -> Iterator[None]:
    """Python warnings of the libraries we call (torch, onnx2torch, ...) as they come, or none (-q)."""
    with warnings.catch_warnings():
        if not shown:
            warnings.simplefilter("ignore")
        yield


class _OneLineUsageError(click.ClickException):
    """A click usage error (bad option value, unknown option) as one line, exit 2, like our own."""

    exit_code = 2

    def show(self, file: object = None) -> None:
        click.echo(f"error: {self.format_message()} (see --help)", err=True)


class _Command(click.Command):
    def make_context(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        try:
            return super().make_context(*args, **kwargs)
        except click.UsageError as exc:
            raise _OneLineUsageError(" ".join(exc.format_message().split())) from exc


def _floats(text: Optional[str], option: str) -> Optional[Tuple[float, ...]]:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.replace(" ", "").split(","))
    except ValueError:
        raise UsageError(f"{option} {text!r}: give comma-separated numbers such as 0.485,0.456,0.406") from None


def _image_size(text: Optional[str]) -> Optional[Tuple[int, int]]:
    if text is None:
        return None
    parts = text.lower().replace("x", ",").split(",")
    try:
        values = [int(p) for p in parts if p]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or min(values) < 1:
        raise UsageError(f"--image-size {text!r}: give SIZE or HEIGHT,WIDTH such as 224 or 224,320")
    return (values[0], values[-1])


def _bit_options(text: str) -> Tuple[int, ...]:
    try:
        return tuple(sorted({int(v) for v in text.replace(" ", "").split(",") if v}))
    except ValueError:
        raise UsageError(f"--bit-options {text!r}: give comma-separated widths such as 2,4,8") from None


def _no_budget(weight_memory: Optional[str], avg_weight_bits: Optional[float], pairwise: bool) -> None:
    """Mixed-precision options without --mixed-precision are a mistake, not silently ignored."""
    if weight_memory is not None or avg_weight_bits is not None or pairwise:
        raise UsageError("--weight-memory, --avg-weight-bits and --pairwise need --mixed-precision")
    return None


def quantization_settings(*, weight_bits: int, act_bits: str, act_symmetric: bool, calib_method: str, weight_init: str,
                          weight_rounding: str, act16_below: float, equalize: bool, float_weights_below: float, percentile: float,
                          target: str, reduce_range: Optional[bool], exclude: Tuple[str, ...], overrides_file: Optional[Path], quantize_outputs: bool, float_bias: bool, num_calib: Optional[int], batch_size: int, image_size: Optional[str],
                          mean: Optional[str], std: Optional[str], pixel_scale: float, layout: str,
                          bgr: bool) -> Dict[str, Any]:
    """The QuantConfig fields that QUANTIZATION_OPTIONS set (UsageError for a malformed value)."""
    image = ImageOptions(
        size=_image_size(image_size),
        mean=_floats(mean, "--mean") or ImageOptions.mean,
        std=_floats(std, "--std") or ImageOptions.std,
        scale=pixel_scale,
        layout=layout,  # type: ignore[arg-type]
        bgr=bgr,
    )
    return dict(
        weight_bits=weight_bits,
        act_bits=int(act_bits),
        act_symmetric=act_symmetric,
        calib_method=calib_method,
        weight_init=weight_init,
        weight_rounding=weight_rounding,
        act16_below=act16_below,
        equalize=equalize,
        float_weights_below=float_weights_below,
        percentile=percentile,
        target=target,
        reduce_range=reduce_range,
        exclude=tuple(exclude),
        overrides=read_overrides(overrides_file) if overrides_file is not None else (),
        quantize_outputs=quantize_outputs,
        quantize_bias=not float_bias,
        calib=CalibOptions(num_samples=num_calib, batch_size=batch_size, image=image),
    )


@contextmanager
def one_line_errors(debug: bool, interrupted: str = "") -> Iterator[None]:
    """Run a command's work: an error becomes one line on stderr and its exit code (1 for an internal
    error, with the traceback under --debug); Ctrl-C and SIGTERM exit 130 and 143 (``interrupted`` is
    added to the Ctrl-C line)."""
    try:
        with _sigterm_unwinds():
            yield
    except EptqError as exc:
        click.echo(f"error: {exc}" + (f" (report: {exc.report_path})" if getattr(exc, "report_path", None) else ""), err=True)
        sys.exit(exc.exit_code)
    except Terminated:
        click.echo("terminated (SIGTERM): nothing was written", err=True)
        sys.exit(TERMINATED_EXIT_CODE)
    except KeyboardInterrupt:
        click.echo(f"interrupted: nothing was written{interrupted}", err=True)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one line, not a traceback
        if debug:
            traceback.print_exc()
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        click.echo(f"internal error: {type(exc).__name__}: {first} (rerun with --debug and report it)", err=True)
        sys.exit(1)


def _options(*decorators: Callable[[F], F]) -> Callable[[F], F]:
    """One decorator applying click options in the order given (the order --help lists them)."""

    def apply(function: F) -> F:
        for decorator in reversed(decorators):
            function = decorator(function)
        return function

    return apply


# What the model is quantized with: shared by eptq-onnx and eptq-onnx-analyze (analysis/cli.py).
QUANTIZATION_OPTIONS = _options(
    click.option("--calib", "calib_dir", required=True, type=click.Path(path_type=Path),
                 help="Folder of unlabeled calibration samples: .npy (one sample or a batch per file), "
                 ".npz (arrays keyed by input name) or images (.jpg/.jpeg/.png/.bmp)."),
    config_option(),
    click.option("--weight-bits", type=click.IntRange(min(SUPPORTED_WEIGHT_BITS), max(SUPPORTED_WEIGHT_BITS)),
                 default=4, show_default=True, help="Bits of every weight (per-channel symmetric)."),
    click.option("--act-bits", type=click.Choice(["8", "16"]), default="8", show_default=True,
                 help="Bits of every activation (per tensor)."),
    click.option("--act-symmetric", is_flag=True, help="Signed activations with zero point 0 (default: unsigned, asymmetric)."),
    click.option("--calib-method", type=click.Choice(["mse", "minmax", "percentile"]), default="mse", show_default=True,
                 help="How activation step sizes are chosen: MSE minimization (paper), min/max range, or a "
                 "percentile."),
    click.option("--weight-init", type=click.Choice(["output-mse", "mse", "minmax"]), default="output-mse", show_default=True,
                 help="How weight step sizes are chosen per channel: minimizing the MSE of each layer's output on "
                 "calibration inputs, the MSE of the weight itself, or its min/max."),
    click.option("--weight-rounding", type=click.Choice(["gptq", "nearest"]), default="gptq", show_default=True,
                 help="How weights are rounded onto those steps before EPTQ (and as --iters 0 writes them): GPTQ, "
                 "which codes each layer's input columns in turn and spreads each one's rounding error over the rest "
                 "(kept per layer only where it lowers the layer's output error on calibration inputs; needs "
                 "--weight-init output-mse), or round-to-nearest. EPTQ starts from the float weights (paper) and falls back to "
                 "these codes when its result is worse."),
    click.option("--act16-below", type=click.FloatRange(min=0), default=30.0, show_default=True, metavar="DB",
                 help="With 8-bit activations: a point whose 8-bit grid leaves a layer that reads it below DB dB "
                 "output SQNR (measured on sampled layer inputs; channels too far apart for one grid, e.g. a "
                 "HardSwish before a depthwise Conv) takes 16 bits, with the point its activation reads, where the "
                 "target reads 16-bit activations (ort-cpu, qnn, generic; the model is raised to opset 21). Its "
                 "readers then run as float ops on onnxruntime's CPU. Kept only when it raises the model's output SQNR on "
                 "16 calibration samples. The report lists each one. 0: never."),
    click.option("--equalize/--no-equalize", default=True, show_default=True,
                 help="Rescale, per channel and exactly in float, the activation a depthwise Conv reads when its "
                 "channels' ranges lie far apart (a HardSwish/ReLU/SiLU before a depthwise Conv, as in MobileNet and "
                 "PP-LCNet): the activation writes each channel divided by its range's share of the widest, the "
                 "depthwise filters take the factor back, and one 8-bit grid holds every channel. The point in front "
                 "of a HardSwish/SiLU (onnxruntime's placement) then moves past it. The report lists each one."),
    click.option("--float-weights-below", type=click.FloatRange(min=0), default=36.0, show_default=True, metavar="DB",
                 help="A weight whose 8-bit codes (full int8 range, whatever --weight-bits) leave a layer that reads it "
                 "below DB dB output SQNR (measured on sampled layer inputs, for every layer that reads it; a fixed filter such as a "
                 "constant-Q transform's lowpass, whose tiny taps 8 bits lose) stays float, with every layer that reads "
                 "it. Kept only when it raises the model's output SQNR on 16 calibration samples. The report lists "
                 "each one. 0: never."),
    click.option("--percentile", type=float, default=99.99, show_default=True, help="Percentile for --calib-method percentile."),
    click.option("--target", type=click.Choice(list(TARGETS)), default=DEFAULT_TARGET, show_default=True,
                 help="Deployment profile: ort-cpu (uint8 activations, layouts onnxruntime fuses into QLinear ops), "
                 "trt (symmetric int8, INT4 only on MatMul/Gemm), qnn (uint8/uint16 activations, per-tensor "
                 "MatMul/Gemm weights) or generic (everything ONNX allows, native INT2 included)."),
    click.option("--reduce-range/--no-reduce-range", "reduce_range", default=None,
                 help="ort-cpu: 8-bit Conv/MatMul/Gemm weights (with uint8 activations) in the 7-bit range, "
                 "onnxruntime's remedy for its integer kernels' int16 saturation on x86 CPUs without VNNI "
                 "(full 8-bit codes lose most of a model's accuracy there). Default: only when onnxruntime on "
                 "this machine saturates (a probe at start; the report says which). Set it when the model "
                 "will run on such a CPU and this machine has VNNI."),
    click.option("--exclude", "exclude", multiple=True, metavar="PATTERN",
                 help="Keep these nodes float (repeatable): a node name or output tensor name as the model spells it; "
                 "else a regular expression that must match a whole node or tensor name (re.fullmatch); or op:TYPE for "
                 "every node of an op type (op:Conv). Their weights are not quantized and no activation point sits on "
                 "their outputs; a pattern that matches nothing is an error."),
    click.option("--overrides", "overrides_file", type=click.Path(path_type=Path), default=None, metavar="FILE",
                 help="JSON (or .yaml/.yml YAML) object of per-tensor or per-node settings, keyed by name (onnxruntime's "
                 "TensorQuantOverrides vocabulary): float, bits (a weight's 2..8, an activation's 8/16), symmetric, "
                 "quant_type (QUInt8, QInt8, QUInt16, QInt16), rmin/rmax or scale/zero_point (fixed, never learned), "
                 "e.g. {\"conv1.weight\": {\"bits\": 8}, \"head\": {\"float\": true}}."),
    click.option("--quantize-outputs", is_flag=True, help="Also quantize the model's outputs (default: they stay float)."),
    click.option("--float-bias", is_flag=True, help="Keep biases float instead of int32 (scale = input x weight scale)."),
    click.option("--num-calib", type=int, default=None,
                 help="Number of calibration samples to use (default: all in the folder, at most 1024)."),
    click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True,
                 help="Calibration batch size (ignored when the model's batch dimension is fixed)."),
    click.option("--image-size", default=None, help="Resize images to SIZE or HEIGHT,WIDTH (default: the model's input size)."),
    click.option("--mean", default=None, help="Per-channel mean subtracted from images after --scale, e.g. 0.485,0.456,0.406."),
    click.option("--std", default=None, help="Per-channel std dividing images after the mean, e.g. 0.229,0.224,0.225."),
    click.option("--scale", "pixel_scale", type=float, default=1 / 255, show_default="1/255",
                 help="Factor applied to 0-255 pixel values before mean/std."),
    click.option("--layout", type=click.Choice(["nchw", "nhwc"]), default="nchw", show_default=True, help="Image tensor layout."),
    click.option("--bgr", is_flag=True, help="Feed images in BGR channel order (mean/std are then in BGR order too)."),
)

DEVICE_OPTION = click.option("--device", default="cpu", show_default=True,
                             help="Torch device of the torch twin (optimization, sensitivities, analysis): cpu or cuda[:N].")
SAMPLES_OPTION = click.option("--sensitivity-samples", type=click.IntRange(min=1), default=32, show_default=True,
                              help="Calibration samples the sensitivities are measured on.")
QUIET_OPTION = click.option("--quiet", "-q", is_flag=True, help="Print nothing but errors (no progress bars, summary or warnings).")
DEBUG_OPTION = click.option("--debug", is_flag=True, help="Show the Python traceback of internal errors.")


@click.command(cls=_Command, epilog=EXIT_CODES, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("input_model", metavar="INPUT.onnx", type=click.Path(path_type=Path))
@click.argument("output_model", metavar="OUTPUT.onnx", type=click.Path(path_type=Path))
@QUANTIZATION_OPTIONS
@click.option("--bias-correction/--no-bias-correction", default=True, show_default=True,
              help="Correct each layer's bias by the mean shift that quantization causes in its output, measured on "
                   "calibration samples (kept only when it improves the output SQNR; where EPTQ runs it learns the "
                   "biases itself).")
@click.option("--min-sqnr", type=float, default=None, metavar="DB",
              help="Fidelity target: when the output SQNR against the float model on held-out calibration samples "
                   "(a quarter, at most 16, that no stage sees) is below DB, leave float the fewest, most damaging "
                   "nodes (ranked as eptq-onnx-analyze ranks them, each kept only for a gain beyond the held-out "
                   "samples' noise) until it is reached, and check the written model in onnxruntime on the same "
                   "samples at the end (nodes it does not confirm stay quantized); the report lists each node with "
                   "the dB it bought.")
@click.option("--strict", is_flag=True, help="With --min-sqnr: a target not reached is an error (exit 6, no model "
              "written) instead of a warning.")
@click.option("--weight-storage", type=click.Choice(["native", "int8"]), default="native", show_default=True,
              help="native: INT4 (opset 21) / INT2 (opset 25) / INT8 initializers, the narrowest the target reads "
              "(ort-cpu: 2-bit codes in INT4); int8: every weight in an INT8 container restricted to its bit range, "
              "for toolchains that read only INT8.")
@click.option("--iters", type=click.IntRange(min=0), default=None,
              help="EPTQ optimization steps; 0 = no optimization (the initialized model: MSE steps, GPTQ rounding). "
              "Default: as many as fit --time-budget, at most 20000.")
@click.option("--time-budget", type=float, default=15.0, show_default=True,
              help="Minutes the whole run may take when --iters is not given: the optimization gets what the "
              "stages before it left, less 10% kept for validation.")
@click.option("--weighting", type=click.Choice(["lfh", "uniform"]), default="lfh", show_default=True,
              help="Loss weights of the quantization points: Label-Free Hessian (paper) or uniform (ablation).")
@click.option("--hessian-samples", type=click.IntRange(min=1), default=16, show_default=True,
              help="Calibration samples for the Label-Free Hessian.")
@click.option("--hessian-draws", type=click.IntRange(min=1), default=50, show_default=True,
              help="Most Hutchinson draws per sample (stops early on convergence).")
@click.option("--hessian-distribution", type=click.Choice(["gaussian", "rademacher"]), default="gaussian",
              show_default=True, help="Distribution of the Hutchinson vectors.")
@click.option("--hessian-trace", type=click.Choice(["channel", "element"]), default="channel", show_default=True,
              help="LFH of errors equal across each channel's positions (pixels, tokens), as rounded weights make "
              "them, or independent per element (the paper's trace).")
@click.option("--rounding-start", type=click.Choice(["init", "float"]), default="init", show_default=True,
              help="Where EPTQ's rounding starts: next to the initialized (GPTQ) codes, so that short runs refine "
              "them, or from the float weights' fractional parts (the paper).")
@click.option("--opt-batch-size", type=click.IntRange(min=1), default=32, show_default=True,
              help="Batch size of the optimization (lowered, and said so, where a step would not fit --max-memory).")
@click.option("--max-memory", "max_memory_gb", type=click.FloatRange(min=0.01), default=None, metavar="GB",
              help="Memory one optimization step (forward and backward) may take at its peak, measured on the model (default on CPU: a "
              "quarter of the memory available when the optimization starts, at most 4 GB; on CUDA half the free GPU "
              "memory); the batch is lowered to fit.")
@click.option("--learn-act-scales", is_flag=True, help="Also learn activation step sizes (default: fixed after calibration).")
@click.option("--learn-weight-scales", is_flag=True, help="Also learn per-channel weight step multipliers (default: fixed).")
@DEVICE_OPTION
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of minibatch sampling and Hutchinson draws.")
@click.option("--checkpoint", "checkpoint_dir", type=click.Path(path_type=Path), default=None,
              help="Save the optimization state in this folder (every 5 minutes and when stopped); rerunning "
              "the same command resumes from it with the same result as an uninterrupted run.")
@click.option("--mixed-precision", is_flag=True,
              help="Search a bit width per weight over --bit-options under one weight-memory budget (ILP); "
              "activations stay at --act-bits.")
@click.option("--bit-options", default="2,4,8", show_default=True, help="Candidate weight widths of --mixed-precision.")
@click.option("--weight-memory", default=None,
              help="Mixed-precision budget: BYTES, or NN% of the float32 weight bytes (e.g. 12.5%).")
@click.option("--avg-weight-bits", type=float, default=None, help="Mixed-precision budget as average bits per weight element.")
@click.option("--sensitivity-metric", type=click.Choice(["lfh", "output"]), default="lfh", show_default=True,
              help="Sensitivity: LFH-weighted activation distance (paper) or the plain output distance.")
@SAMPLES_OPTION
@click.option("--pairwise", is_flag=True, help="Also measure neighbouring layer pairs and add their interaction terms to the ILP.")
@click.option("--ilp-time-limit", type=float, default=60.0, show_default=True,
              help="Seconds the ILP solver may take (then its best solution is used).")
@click.option("--bit-search", type=click.Choice(["ilp", "lfh-rank"]), default="ilp", show_default=True,
              help="ilp (paper), or lfh-rank: widest bits to the layers of largest Label-Free Hessian first (baseline).")
@click.option("--plots", "plots_dir", type=click.Path(path_type=Path), default=None,
              help="Write PNG plots here: LFH per layer, loss curve.")
@click.option("--validation-samples", type=click.IntRange(min=1), default=64, show_default=True,
              help="Calibration samples used to validate the written model with onnxruntime.")
@click.option("--latency/--no-latency", default=True, show_default=True,
              help="Measure onnxruntime CPU latency of the float and the written model (one sample, a few seconds) "
                   "and warn when the quantized one is slower.")
@click.option("--report", "report_path", type=click.Path(path_type=Path), default=None,
              help="Write the machine-readable JSON report here.")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT.onnx if it exists (never the input).")
@QUIET_OPTION
@DEBUG_OPTION
def main(input_model: Path, output_model: Path, calib_dir: Path, weight_bits: int, act_bits: str, act_symmetric: bool,
         calib_method: str, weight_init: str, weight_rounding: str, act16_below: float, equalize: bool, float_weights_below: float, percentile: float, weight_storage: str, target: str, reduce_range: Optional[bool],
         exclude: Tuple[str, ...],
         overrides_file: Optional[Path], quantize_outputs: bool, float_bias: bool,
         bias_correction: bool, min_sqnr: Optional[float], strict: bool,
         num_calib: Optional[int], batch_size: int, image_size: Optional[str], mean: Optional[str], std: Optional[str],
         pixel_scale: float, layout: str, bgr: bool, iters: Optional[int], time_budget: float, weighting: str,
         hessian_samples: int, hessian_draws: int, hessian_distribution: str, hessian_trace: str, rounding_start: str, opt_batch_size: int, max_memory_gb: Optional[float],
         learn_act_scales: bool, learn_weight_scales: bool, device: str, seed: int, checkpoint_dir: Optional[Path], mixed_precision: bool,
         bit_options: str, weight_memory: Optional[str], avg_weight_bits: Optional[float], sensitivity_metric: str,
         sensitivity_samples: int, pairwise: bool, ilp_time_limit: float, bit_search: str, plots_dir: Optional[Path], validation_samples: int,
         latency: bool, report_path: Optional[Path], force: bool, quiet: bool, debug: bool) -> None:
    """Quantize INPUT.onnx (FP32, opset >= 11) into OUTPUT.onnx, a QDQ model onnxruntime runs.

    Weights are quantized per channel (symmetric), activations per tensor at the quantization
    points of the EPTQ paper; step sizes are initialized by MSE minimization on the calibration
    samples, then the rounding of every weight and the biases (by option also the steps) are
    optimized for the whole network at once, weighted by the Label-Free Hessian (EPTQ), within
    --time-budget minutes. The written model is validated with onnxruntime
    and a summary is printed.

    \b
    Example:
      eptq-onnx model.onnx model_w4a8.onnx --calib calib_dir/
      eptq-onnx model.onnx model_w8a8.onnx --calib calib_dir/ --weight-bits 8 --report report.json
      eptq-onnx model.onnx model_mp.onnx --calib calib_dir/ --mixed-precision --avg-weight-bits 4
      eptq-onnx model.onnx model_w8a8.onnx --config run.json --exclude head
    """
    interrupted = f"; the optimization state is in {checkpoint_dir}: rerun the same command to resume" if checkpoint_dir else ""
    with one_line_errors(debug, interrupted):
        config = QuantConfig(
            **quantization_settings(
                weight_bits=weight_bits, act_bits=act_bits, act_symmetric=act_symmetric, calib_method=calib_method,
                weight_init=weight_init, weight_rounding=weight_rounding, act16_below=act16_below, equalize=equalize,
                float_weights_below=float_weights_below, percentile=percentile,
                target=target, reduce_range=reduce_range, exclude=exclude,
                overrides_file=overrides_file, quantize_outputs=quantize_outputs, float_bias=float_bias, num_calib=num_calib, batch_size=batch_size,
                image_size=image_size, mean=mean, std=std, pixel_scale=pixel_scale, layout=layout, bgr=bgr),
            weight_storage=weight_storage,  # type: ignore[arg-type]
            bias_correction=bias_correction,
            min_sqnr=min_sqnr,
            strict=strict,
            validation_samples=validation_samples,
            measure_latency=latency,
            mixed=MixedPrecisionOptions(
                bit_options=_bit_options(bit_options),
                weight_memory=weight_memory,
                avg_weight_bits=avg_weight_bits,
                metric=sensitivity_metric,  # type: ignore[arg-type]
                samples=sensitivity_samples,
                pairwise=pairwise,
                time_limit_s=ilp_time_limit,
                search=bit_search,  # type: ignore[arg-type]
            ) if mixed_precision else _no_budget(weight_memory, avg_weight_bits, pairwise),
            optimize=OptimizeOptions(
                iters=iters,
                time_budget_min=time_budget,
                weighting=weighting,  # type: ignore[arg-type]
                hessian_samples=hessian_samples,
                hessian_draws=hessian_draws,
                hessian_distribution=hessian_distribution,  # type: ignore[arg-type]
                hessian_trace=hessian_trace,  # type: ignore[arg-type]
                rounding_start=rounding_start,  # type: ignore[arg-type]
                batch_size=opt_batch_size,
                max_memory_gb=max_memory_gb,
                learn_act_scales=learn_act_scales,
                learn_weight_scales=learn_weight_scales,
                device=device,
                seed=seed,
                checkpoint_dir=None if checkpoint_dir is None else str(checkpoint_dir),
            ),
        )
        with _third_party_warnings(shown=not quiet):
            result = quantize(input_model, calib_dir, config, output=output_model, force=force,
                              report_path=report_path, progress=not quiet, plots_dir=plots_dir)
    if not quiet:
        print_summary(result.report)
        click.echo(f"wrote {result.output_path}" + (f" and {report_path}" if report_path else ""))


if __name__ == "__main__":  # pragma: no cover
    main()
