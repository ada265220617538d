"""The pipeline, one stage after another: load -> normalize -> fold -> quantization points ->
weight init -> activation calibration -> QDQ write -> validate -> save.
"""
from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Dict, Iterator, Optional, Union

import numpy as np
import onnx
from tqdm import tqdm

from eptq_onnx.calib.data import CalibrationSet

from eptq_onnx.calib.specs import input_specs
from eptq_onnx.calib.calibrate import calibrate_activations
from eptq_onnx.config import QuantConfig
from eptq_onnx.errors import ModelError, UsageError, ValidationError, error_entry
from eptq_onnx.eptq.stage import HESSIAN_SHARE, PROBED, EptqOutcome, TwinUnavailable, run_eptq
from eptq_onnx.eptq.hessian import LFHResult
from eptq_onnx.export.reference import fake_quant_model
from eptq_onnx.graph.float16 import has_float16, restore_io_types
from eptq_onnx.graph.fold_bn import fold_batch_norms
from eptq_onnx.export.latency import latency_note, measure_latency
from eptq_onnx.calib.layer_inputs import collect_layer_inputs
from eptq_onnx.mixed.stage import choose_bits
from eptq_onnx.mixed.sensitivity import SearchInputs
from eptq_onnx.graph.model_io import default_opset, ir_version_for, load_model, save_model, serialized_size
from eptq_onnx.graph.normalize import constant_only_nodes, normalize_model, upgrade_opset
from eptq_onnx.plots import write_plots
from eptq_onnx.export.writer import required_opset, write_qdq
from eptq_onnx.plan.qpoints import QuantPlan, build_plan
from eptq_onnx.init.quantizers import ActParams, sqnr_db
from eptq_onnx.report import Report, TensorEntry
from eptq_onnx.graph.runtime import make_session
from eptq_onnx.plan.targets import get_target
from eptq_onnx.graph.tensor_store import TensorStore, tensor_array
from eptq_onnx.export.validate import Validation, check_model, session_config, validate
from eptq_onnx.init.weights import WeightQuant, init_weights


@dataclass
class QuantState:
    """Everything the QDQ model is written from: the prepared float model and the quantizers."""

    float_model: onnx.ModelProto
    plan: QuantPlan
    weights: Dict[str, WeightQuant]
    acts: Dict[int, ActParams]
    config: QuantConfig


@dataclass
class QuantizeResult:
    """The quantized model, its report, where it was written (if it was), and its source state."""

    model: onnx.ModelProto
    report: Report
    output_path: Optional[Path] = None
    state: Optional[QuantState] = None
    # where the large tensors of a large model's ``model`` and ``state`` are (tensor_store): kept
    # alive with the result; None when the model was held in memory
    store: Optional[TensorStore] = None


class _Timer:
    """Times each stage into the report: ``timings_s`` of those completed, ``stages`` of all that ran."""

    def __init__(self, report: Report) -> None:
        self.report = report

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        except BaseException:
            self.report.stages.append({"name": name, "seconds": round(time.perf_counter() - start, 3), "status": "failed"})
            raise
        seconds = round(time.perf_counter() - start, 3)
        self.report.timings_s[name] = seconds
        self.report.stages.append({"name": name, "seconds": seconds, "status": "ok"})


def check_output_path(input_path: Optional[Path], output: Path, force: bool) -> None:
    """Refuse to overwrite the input or an existing file (without force), or to write nowhere."""
    if input_path is not None and output.resolve() == input_path.resolve():
        raise UsageError(f"output {output} is the input model: choose another output path")
    if output.is_dir():
        raise UsageError(f"output {output} is a directory: give a file path such as {output / 'model_qdq.onnx'}")
    if output.exists() and not force:
        raise UsageError(f"output {output} exists: pass --force to overwrite it")
    parent = output.parent if str(output.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"output folder {parent} does not exist: create it first")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"output folder {parent} is not writable: choose another output path")


def check_onnxruntime_loads(model: onnx.ModelProto) -> None:
    """Calibration runs the float model in onnxruntime: refuse a model it cannot load, in one line."""
    try:
        make_session(model, optimize=False)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own Fail/InvalidGraph/... types
        first = " ".join(str(exc).split())[:300]
        raise ModelError(
            f"onnxruntime cannot load the model ({first}): ops of custom domains need their onnxruntime library"
        ) from exc


def check_report_path(report_path: Path) -> None:
    """Refuse a report path that cannot be written, before any work (the model is written first)."""
    parent = report_path.parent if str(report_path.parent) else Path(".")
    if report_path.is_dir():
        raise UsageError(f"report {report_path} is a directory: give a file path such as {report_path / 'report.json'}")
    if not parent.is_dir():
        raise UsageError(f"report folder {parent} does not exist: create it first")


def _prepare(model: onnx.ModelProto, config: QuantConfig, report: Report) -> tuple[onnx.ModelProto, QuantConfig]:
    """Normalize, raise the opset where the storage types need it, fold batch norms.

    When the opset upgrade for native INT4/INT2 weights fails, weights fall back to INT8
    containers (restricted to their bit range) and the report says so.
    """
    model = normalize_model(model)
    target = get_target(config.target)
    bits = list(config.mixed.bit_options) if config.mixed is not None else [config.weight_bits]
    needed = required_opset(bits, config.act_bits, config.weight_storage, target)
    if default_opset(model) < needed:
        try:
            model = normalize_model(upgrade_opset(model, needed))  # converters may add Constant nodes
        except ModelError as exc:
            fallback = replace(config, weight_storage="int8")
            if config.weight_storage == "int8" or required_opset(bits, config.act_bits, "int8", target) > default_opset(model):
                raise
            report.warn(f"FALLBACK: weights stored in INT8 containers, not native INT{min(bits)}: {exc}")
            config = fallback
    report.opset = default_opset(model)
    model, folded = fold_batch_norms(model)
    report.folded_batch_norms = folded
    return model, config


def quantize(
    model: Union[str, Path, onnx.ModelProto],
    calib: Union[str, Path, CalibrationSet],
    config: Optional[QuantConfig] = None,
    *,
    output: Union[str, Path, None] = None,
    force: bool = False,
    report_path: Union[str, Path, None] = None,
    progress: bool = True,
    plots_dir: Union[str, Path, None] = None,
) -> QuantizeResult:
    """Quantize a float ONNX model into a validated QDQ model with EPTQ.

    Steps are MSE-initialized, then optimized network-wise with the Label-Free Hessian weighting
    (``config.optimize``; ``iters=0`` keeps the MSE-initialized model).

    ``model`` is a path or a ModelProto; ``calib`` a calibration folder or a CalibrationSet.
    With ``output`` the model is written there atomically; with ``report_path`` the JSON report;
    with ``plots_dir`` PNG plots (LFH per layer, loss curve).
    Raises an ``EptqError`` subclass (one-line message, exit code) on bad input.
    """
    started_at = time.perf_counter()
    config = config or QuantConfig()
    input_path = Path(model) if isinstance(model, (str, Path)) else None
    output_path = Path(output) if output is not None else None
    if output_path is not None:
        check_output_path(input_path, output_path, force)
    if report_path is not None:
        check_report_path(Path(report_path))
    report = Report(input=str(input_path or "<ModelProto>"), output=str(output_path) if output_path else None, config=asdict(config))
    timer = _Timer(report)
    store = TensorStore()  # stays empty unless the model has more than tensor_store.LARGE_MODEL_BYTES

    with timer.stage("load"):
        original = load_model(input_path, store) if input_path is not None else store.hold(model)
        assert isinstance(original, onnx.ModelProto)
        report.sizes_bytes["input"] = input_path.stat().st_size if input_path else serialized_size(original)
    try:
        return _quantize_read(original, calib, config, report, timer, store, output_path=output_path, force=force,
                              report_path=report_path, progress=progress, plots_dir=plots_dir, started_at=started_at)
    except BaseException as exc:  # the report says why, whatever stopped the run; the exception goes on
        if report_path is not None:
            report.error = error_entry(exc, report.stages)
            report.output = None
            report.write_json(report_path)
            exc.report_path = report_path  # type: ignore[attr-defined] - the CLI names it in its error line
        raise


def _quantize_read(
    original: onnx.ModelProto,
    calib: Union[str, Path, CalibrationSet],
    config: QuantConfig,
    report: Report,
    timer: "_Timer",
    store: TensorStore,
    *,
    output_path: Optional[Path],
    force: bool,
    report_path: Union[str, Path, None],
    progress: bool,
    plots_dir: Union[str, Path, None],
    started_at: float,
) -> QuantizeResult:
    """Every stage after the model was read, up to the written model and report."""
    with timer.stage("normalize"):
        float_model, config = _prepare(original, config, report)
        if store.used:  # folded batch norms: new weights
            float_model = store.held(float_model)
            unfolded = constant_only_nodes(float_model)
            if unfolded:
                shown = ", ".join(unfolded[:5]) + (f" and {len(unfolded) - 5} more" if len(unfolded) > 5 else "")
                report.warn(f"large model: {len(unfolded)} node(s) computing from constants only were not folded "
                            f"(their tensors are in the tensor store; they run as they are): {shown}")
        check_onnxruntime_loads(float_model)
    with timer.stage("quantization points"):
        plan = build_plan(float_model, config.quantize_outputs, get_target(config.target).fusible)
        if not plan.weights and not plan.groups:
            raise ModelError("the model has no quantizable layer (no Conv/Gemm/MatMul/... and no float activations)")
        report.float_ops = [{"node": n, "op_type": t, "why": w} for n, t, w in plan.float_ops]
        report.norm_blocks = [{"kind": b.kind, "input": b.input, "output": b.output, "nodes": list(b.nodes)}
                              for b in plan.norm_blocks]
        report.singular_float = list(plan.singular_float)
        for node, op_type, why in plan.float_ops:
            report.warn(f"{op_type} node {node} stays float ({why})")
    with timer.stage("calibration data"):
        calib_set = calib if isinstance(calib, CalibrationSet) else CalibrationSet(calib, input_specs(float_model), config.calib)
        report.calibration_samples = len(calib_set)
        if calib_set.whole_feeds:
            report.warn(f"calibration data: {calib_set.describe()}")
    with timer.stage("weight init"):
        inputs = collect_layer_inputs(float_model, plan, calib_set) if config.weight_init == "output-mse" else {}
        widths = config.mixed.bit_options if config.mixed is not None else (config.weight_bits,)
        target = get_target(config.target)
        candidates = {b: init_weights(float_model, plan, b, config.weight_init, inputs, target, config.act_symmetric)
                      for b in widths}
        weights = candidates[max(widths)]
    with timer.stage("activation calibration"):
        acts, _, range_notes = calibrate_activations(float_model, plan, calib_set, config, progress)
        for note in range_notes:
            report.warn(note)
    lfh = None  # the search's LFH of float_model, reused by the EPTQ stage
    if config.mixed is not None:
        with timer.stage("mixed precision"):
            inputs = SearchInputs(float_model, plan, candidates, acts, calib_set, config)
            weights, sensitivity = choose_bits(inputs, report, progress, _logger(progress))
            lfh = sensitivity.hessian
            if lfh is not None:
                warn_lfh(report, lfh[0])
    reference_model, quantized_model = float_model, float_model
    if config.optimize.iters != 0 and not plan.weights and not config.optimize.learn_act_scales:
        report.warn("FALLBACK: EPTQ optimization skipped, the output is the MSE-initialized model: "
                    "the model has no weights to optimize (and --learn-act-scales is off)")
    elif config.optimize.iters != 0:
        with timer.stage("eptq"):
            try:
                outcome = run_eptq(float_model, plan, weights, acts, calib_set, config, progress, log=_logger(progress),
                                   started_at=started_at, lfh=lfh)
            except TwinUnavailable as exc:
                report.warn(f"FALLBACK: EPTQ optimization skipped, the output is the MSE-initialized model: {exc}")
            else:
                quantized_model, weights, acts = outcome.float_model, outcome.weights, outcome.acts
                _report_eptq(report, outcome)
                if outcome.kept_init:
                    report.warn(
                        f"FALLBACK: EPTQ result discarded, the output is the MSE-initialized model: {outcome.kept_init}; "
                        "give the optimization more steps (--iters, --time-budget)"
                    )
    with timer.stage("write"):
        qdq, summary = write_qdq(
            quantized_model,
            plan,
            weights,
            acts,
            weight_storage=config.weight_storage,
            quantize_outputs=config.quantize_outputs,
            quantize_bias=config.quantize_bias,
            target=get_target(config.target),
        )
        qdq.ir_version = ir_version_for(default_opset(qdq))
        for bias in summary.float_biases:
            report.warn(f"bias {bias} stays float: its layer's input is not quantized")
        for bias in summary.clipped_biases:
            report.warn(f"bias {bias} saturated to the int32 range")
    with timer.stage("validate"):
        fake_quant = fake_quant_model(quantized_model, plan, weights, acts, config.quantize_outputs, config.quantize_bias)
        validation = Validation()
        try:
            validation = validate(reference_model, qdq, plan, calib_set, config.validation_samples, progress,
                                  reference=fake_quant, target=get_target(config.target))
        except ValidationError as exc:  # what was measured before it failed goes into the report
            validation = exc.validation or validation
            raise
        finally:
            report.validation = asdict(validation)
            report.warnings.extend(validation.notes)
            report.tensors = _tensor_entries(float_model, plan, weights, acts, summary.storage, validation.tensor_sqnr_db)
    if config.measure_latency:
        with timer.stage("latency"):
            _report_latency(report, reference_model, qdq, calib_set, weights, validation, config.target)
    if has_float16(original):
        qdq = _float16_io(qdq, original, report)
    if output_path is not None:
        with timer.stage("save"):
            save_model(qdq, output_path, force=force)
            report.sizes_bytes["output"] = output_path.stat().st_size
    else:
        report.sizes_bytes["output"] = serialized_size(qdq)
    if report_path is not None:
        report.write_json(report_path)
    if plots_dir is not None:
        write_plots(report, Path(plots_dir))
    state = QuantState(float_model=quantized_model, plan=plan, weights=weights, acts=acts, config=config)
    if not store.used:
        store.close()
    return QuantizeResult(model=qdq, report=report, output_path=output_path, state=state,
                          store=store if store.used else None)


def _float16_io(qdq: onnx.ModelProto, original: onnx.ModelProto, report: Report) -> onnx.ModelProto:
    """The QDQ model of a float16 model with its float16 inputs and outputs back (Casts at the
    boundary), checked and loaded by onnxruntime with its default options."""
    qdq = restore_io_types(qdq, original)
    check_model(qdq)
    try:
        make_session(qdq)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types
        raise ValidationError(f"onnxruntime cannot load the quantized model: {' '.join(str(exc).split())[:300]}") from exc
    report.warn("float16 model: quantized in float32; the written model computes in float32 between Casts at its "
                "float16 inputs and outputs (QDQ of float16 needs opset 19)")
    return qdq


def _logger(progress: bool) -> Callable[[str], None]:
    """Stage messages go to stderr (through tqdm, so progress bars stay intact); none when quiet."""
    return (lambda message: tqdm.write(message, file=sys.stderr)) if progress else (lambda message: None)


UNDECIDED_WARN = 0.001  # of all rounding variables: more left undecided at the end is warned about


def _report_eptq(report: Report, outcome: EptqOutcome) -> None:
    opt = outcome.optimization
    report.optimization = {
        "iters": opt.iters,
        "seconds": round(opt.seconds, 3),
        "step_seconds": round(opt.step_seconds, 5),
        "why": opt.why,
        "kernels": opt.kernels,
        "undecided_rounding": opt.undecided,
        "loss_weights": outcome.loss_weights,
        "curve": opt.curve,
        "sqnr_before_db": outcome.sqnr_before,
        "sqnr_after_db": outcome.sqnr_after,
        "kept_init": outcome.kept_init,
    }
    undecided = sum(opt.undecided.values())
    if undecided > UNDECIDED_WARN * max(1, opt.rounding_variables):
        report.warn(f"{undecided} of {opt.rounding_variables} rounding variables were still undecided (0.01 < h < 0.99) "
                    f"when the optimization stopped (most in {max(opt.undecided, key=opt.undecided.get)}); the hard rounding "
                    "written to the file then departs from what was trained: give it more steps (--iters, --time-budget)")
    if opt.kernels_failed:
        report.warn(f"FALLBACK: EPTQ trained with the slower {opt.kernels}")
    if outcome.hessian is not None:
        report.hessian = {"probed": PROBED, **outcome.hessian.to_dict(),
                          "forward_backward_seconds": round(outcome.hessian_step_seconds, 5)}
        warn_lfh(report, outcome.hessian)


def _report_latency(report: Report, float_model: onnx.ModelProto, qdq: onnx.ModelProto, calib: CalibrationSet,
                    weights: Dict[str, WeightQuant], validation: Validation, target: str) -> None:
    """onnxruntime CPU latency of one calibration batch (one sample, unless the model fixes its batch dim)
    through the float and the written model. A measurement that fails is a warning, never the run's end."""
    feeds = next(iter(calib.batches(1, limit=1)), None) or next(iter(calib.batches()), None)
    try:
        if feeds is None:
            raise ValueError("no calibration batch to run")
        latency = measure_latency(float_model, qdq, feeds, config=session_config(qdq, get_target(target)))
    except Exception as exc:  # noqa: BLE001 - informational: the validated model stands
        report.warn(f"latency not measured: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}")
        return
    report.latency = asdict(latency)
    note = latency_note(latency, {n: w.bits for n, w in weights.items()}, validation.fused_linear_ops,
                        validation.linear_ops, target)
    if note:
        report.warn(note)


def warn_lfh(report: Report, hessian: LFHResult) -> None:
    """Say when the LFH's time share cut its draws, and which tensors the channel-correlated LFH had to
    treat elementwise (their layout unknown)."""
    if hessian.time_limited:
        report.warn(f"LFH: its share of the time budget ({HESSIAN_SHARE:.0%} of --time-budget) allowed "
                    f"{hessian.samples} sample(s) and {hessian.total_draws} Hutchinson draws in all (at most "
                    f"{hessian.draws} per sample); the loss weights are noisier estimates: a larger --time-budget gives "
                    "more draws")
    unknown = hessian.unknown_axes
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        report.warn(f"LFH (--hessian-trace channel): the position axes of {len(unknown)} tensor(s) are unknown (no "
                    f"layout rule for the op that makes them); they take the paper's elementwise trace: {shown}")


def _tensor_entries(
    model: onnx.ModelProto,
    plan: QuantPlan,
    weights: Dict[str, WeightQuant],
    acts: Dict[int, ActParams],
    storage: Dict[str, str],
    act_sqnr: Dict[str, float],
) -> list[TensorEntry]:
    initializers = {t.name: t for t in model.graph.initializer}
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    ops = {p.weight: p.op_type for p in plan.weights}
    entries = []
    for name, wq in weights.items():
        w = tensor_array(initializers[name]).astype(np.float32, copy=False)
        entries.append(
            TensorEntry(name, ops[name], "weight", wq.bits, wq.scale.tolist(), 0, sqnr_db(w, wq.dequantized()), storage.get(name, ""))
        )
    for g in plan.groups:
        p = acts[g.id]
        for root in g.roots:
            entries.append(
                TensorEntry(root, producers.get(root, "input"), "activation", p.bits, p.scale, p.zero_point, act_sqnr.get(root), g.reason)
            )
    return entries
