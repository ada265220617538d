"""``analyze``: rank every quantization point of a model by what it costs, without writing a model."""
from __future__ import annotations

import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Optional, Sequence, Union

import onnx

from eptq_onnx.analysis.measure import chosen_outputs, measure
from eptq_onnx.analysis.plot import write_analysis_plots
from eptq_onnx.analysis.result import AnalysisResult
from eptq_onnx.calib.memory import CalibSource
from eptq_onnx.config import QuantConfig
from eptq_onnx.context import RunContext
from eptq_onnx.graph.model_io import load_model
from eptq_onnx.io_checks import check_report_path
from eptq_onnx.pipeline import initial_state
from eptq_onnx.report import Report

DEFAULT_SAMPLES = 32  # as --sensitivity-samples


def analyze(
    model: Union[str, Path, onnx.ModelProto],
    calib: CalibSource,
    config: Optional[QuantConfig] = None,
    *,
    samples: int = DEFAULT_SAMPLES,
    outputs: Sequence[str] = (),
    report_path: Union[str, Path, None] = None,
    plots_dir: Union[str, Path, None] = None,
    progress: bool = True,
) -> AnalysisResult:
    """Rank every quantization point (weights and activation groups) of ``model`` by its cost.

    The model is prepared, planned and MSE-initialized as ``quantize`` does with ``config`` (every
    weight at ``config.weight_bits``; no EPTQ, no mixed precision), then measured on the first
    ``samples`` calibration samples: the SQNR of the worst of ``outputs`` (default: every float output) with only each point quantized and with only it
    left float, and the float-vs-quantized SQNR of every tensor along the graph. ``calib`` takes what
    ``quantize`` takes. With ``report_path`` the JSON report; with ``plots_dir`` analysis.png.
    Raises an ``EptqError`` subclass (one-line message, exit code) on bad input.
    """
    started_at = time.perf_counter()
    config = config or QuantConfig()
    config = replace(config, mixed=None, optimize=replace(config.optimize, iters=0), measure_latency=False)
    input_path = Path(model) if isinstance(model, (str, Path)) else None
    if report_path is not None:
        check_report_path(Path(report_path))
    report = Report(input=str(input_path or "<ModelProto>"), output=None, config=asdict(config))
    run = RunContext(config, report, progress, started_at)
    with run.stage("load"):
        original = load_model(input_path, run.store) if input_path is not None else run.store.hold(model)
        chosen_outputs(original, outputs)  # a wrong --output fails before calibration
    float_model, plan, calib_set, candidates, acts = initial_state(run, original, calib)
    with run.stage("analysis"):
        found = measure(float_model, plan, candidates[run.config.weight_bits], acts, calib_set, run.config, samples, progress,
                        outputs)
    warnings = list(report.warnings)
    if found.not_measured:
        warnings.append(f"{len(found.not_measured)} weight(s) have no quantizer in the torch twin and were not "
                        f"measured: {', '.join(found.not_measured[:5])}")
    result = AnalysisResult(
        input=report.input, config=asdict(run.config), samples=int(found.cost["samples"]), outputs=found.outputs,
        quantized_sqnr_db=found.quantized_sqnr_db, points=found.points, tensors=found.tensors, cost=found.cost,
        not_measured=found.not_measured, warnings=warnings, timings_s=dict(report.timings_s),
        excluded=[{"node": n, "op": op, "pattern": pat} for n, op, pat in plan.excluded])
    if report_path is not None:
        result.write_json(report_path)
    if plots_dir is not None:
        write_analysis_plots(result, Path(plots_dir))
    if not run.store.used:
        run.store.close()
    return result
