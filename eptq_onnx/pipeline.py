"""The pipeline, one stage after another: load -> normalize -> fold -> quantization points ->
calibration data -> depthwise input equalization (and the points again) -> activation ranges (and
the range rules' plan) -> weight init -> activation calibration -> mixed precision -> EPTQ -> QDQ
write -> validate -> latency -> save.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import onnx

from eptq_onnx.calib.calibrate import calibrate_activations, range_statistics
from eptq_onnx.calib.data import CalibrationSet
from eptq_onnx.calib.memory import CalibSource
from eptq_onnx.calib.stage import calibration_set, equalize_depthwise, row_sampler, widen_activations
from eptq_onnx.calib.transfer import point_transfers
from eptq_onnx.calib.wide_acts import WideningCheck
from eptq_onnx.config import QuantConfig
from eptq_onnx.context import RunContext
from eptq_onnx.eptq.stage import TwinUnavailable, run_eptq
from eptq_onnx.errors import ModelError, TargetNotReached, ValidationError, error_entry
from eptq_onnx.export.latency import report_latency
from eptq_onnx.export.reference import fake_quant_model
from eptq_onnx.export.validate import Validation, float16_io, validate
from eptq_onnx.export.writer import WriteSummary, required_opset, write_qdq
from eptq_onnx.fidelity.stage import hold_out, meet_target_stage
from eptq_onnx.graph.float16 import has_float16
from eptq_onnx.graph.fold_bn import fold_batch_norms, fold_bias_adds
from eptq_onnx.graph.fuse_activations import fuse_hardswish
from eptq_onnx.graph.model_io import default_opset, ir_version_for, load_model, save_model, serialized_size
from eptq_onnx.graph.normalize import constant_only_nodes, normalize_model, upgrade_opset
from eptq_onnx.graph.tensor_store import TensorStore
from eptq_onnx.init.quantizers import ActParams
from eptq_onnx.init.stage import bias_corrected_model, fit_bias_steps, float_weak_weights, init_weight_candidates
from eptq_onnx.init.weights import WeightQuant
from eptq_onnx.io_checks import check_onnxruntime_loads, check_output_path, check_report_path
from eptq_onnx.mixed.sensitivity import SearchInputs
from eptq_onnx.mixed.stage import choose_bits
from eptq_onnx.plan.exclusions import exclude_nodes
from eptq_onnx.plan.overrides import float_names, fused_layers, max_act_bits, resolve_for_run
from eptq_onnx.plan.qpoints import QuantPlan, build_plan
from eptq_onnx.plan.range_rules import refine_plan
from eptq_onnx.plan.targets import get_target
from eptq_onnx.plan.weight_only import float_weight_only_layers
from eptq_onnx.plots import write_plots
from eptq_onnx.report import Report, record_eptq, record_plan, tensor_entries, warn_lfh


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


InitialState = Tuple[onnx.ModelProto, QuantPlan, CalibrationSet, Dict[int, Dict[str, WeightQuant]], Dict[int, ActParams]]


def _prepare(model: onnx.ModelProto, config: QuantConfig, report: Report) -> tuple[onnx.ModelProto, QuantConfig]:
    """Normalize, raise the opset where the storage types need it, write decomposed HardSwish as one op,
    fold batch norms and bias Adds.

    When the opset upgrade for native INT4/INT2 weights fails, weights fall back to INT8
    containers (restricted to their bit range) and the report says so.
    """
    model = normalize_model(model)
    target = get_target(config.target)
    bits = list(config.mixed.bit_options) if config.mixed is not None else [config.weight_bits]
    act_bits = max_act_bits(config.overrides, config.act_bits)
    needed = required_opset(bits, act_bits, config.weight_storage, target)
    if default_opset(model) < needed:
        try:
            model = normalize_model(upgrade_opset(model, needed))  # converters may add Constant nodes
        except ModelError as exc:
            fallback = replace(config, weight_storage="int8")
            if config.weight_storage == "int8" or required_opset(bits, act_bits, "int8", target) > default_opset(model):
                raise
            report.warn(f"FALLBACK: weights stored in INT8 containers, not native INT{min(bits)}: {exc}")
            config = fallback
    report.opset = default_opset(model)
    report.fused_hardswish = fuse_hardswish(model, report.opset)
    model, folded = fold_batch_norms(model)
    report.folded_batch_norms = folded
    model, report.folded_bias_adds = fold_bias_adds(model)
    return model, config


def quantize(
    model: Union[str, Path, onnx.ModelProto],
    calib: CalibSource,
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

    ``model`` is a path or a ModelProto; ``calib`` a calibration folder, a CalibrationSet, or data in
    memory: an iterable of feeds (dicts {input name: array}, or arrays for a single-input model) or a
    reader with ``get_next()`` such as onnxruntime's CalibrationDataReader (``calib/memory.py``).
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
    run = RunContext(config, report, progress, started_at)  # its store stays empty unless the model is large
    with run.stage("load"):
        original = load_model(input_path, run.store) if input_path is not None else run.store.hold(model)
        assert isinstance(original, onnx.ModelProto)
        report.sizes_bytes["input"] = input_path.stat().st_size if input_path else serialized_size(original)
    try:
        result = _run_stages(run, original, calib)
        _finish(run, result, original, output_path, force, report_path, plots_dir)
        return result
    except BaseException as exc:  # the report says why, whatever stopped the run; the exception goes on
        if report_path is not None:
            report.error = error_entry(exc, report.stages)
            report.output = None
            report.write_json(report_path)
            exc.report_path = report_path  # type: ignore[attr-defined] - the CLI names it in its error line
        raise


def initial_state(run: RunContext, original: onnx.ModelProto, calib: CalibSource) -> InitialState:
    """The stages up to the MSE-initialized quantizers: the prepared float model, its plan, the calibration
    set, every weight at every width the run may choose, the activation parameters (the analysis starts here too)."""
    with run.stage("normalize"):
        float_model = _normalize(run, original)
    with run.stage("quantization points"):
        plan = _plan(run, float_model)
    with run.stage("calibration data"):
        calib_set = calibration_set(run, calib, float_model)
        if run.config.min_sqnr is not None:
            calib_set = hold_out(run, calib_set)
    with run.stage("equalization"):
        equalized, unfused = equalize_depthwise(run, float_model, calib_set)
        if equalized is not float_model:  # rescaled: the points of the new graph
            float_model, plan = equalized, _plan(run, equalized, unfused)
    with run.stage("activation ranges"):
        sampler = row_sampler(run, float_model, plan)
        ranges = range_statistics(float_model, plan, calib_set, run.progress, sampler)
        plan, range_notes = refine_plan(float_model, plan, ranges.root_stats)
        for note in range_notes:
            run.report.warn(note)
        plan = float_weight_only_layers(plan, run.target)
        record_plan(run.report, plan)
        overrides = resolve_for_run(run, float_model, plan)
    with run.stage("weight init"):
        rows = sampler.rows() if sampler is not None else {}
        reader_rows = sampler.reader_rows() if sampler is not None else {}
        candidates = init_weight_candidates(run, float_model, plan, overrides.weight_bits, rows)
    with run.stage("activation calibration"):
        transfers = point_transfers(float_model, plan) if run.config.calib_method == "mse" else {}  # mse reads them
        acts, stats = calibrate_activations(plan, ranges, calib_set, run.config, run.progress, overrides.acts,
                                            transfers)
        check = WideningCheck(candidates[max(candidates)], calib_set, run.config.quantize_outputs,
                              run.config.quantize_bias)
        float_model = widen_activations(run, float_model, plan, acts, stats, rows, frozenset(overrides.acts), check)
        plan, candidates, acts = float_weak_weights(run, float_model, plan, candidates, acts, rows, reader_rows,
                                                    frozenset(overrides.weight_bits), check)
        record_plan(run.report, plan)
        candidates = {b: fit_bias_steps(run, float_model, plan, w, acts) for b, w in candidates.items()}
    return float_model, plan, calib_set, candidates, acts


def _latency_baseline(run: RunContext, original: onnx.ModelProto, float_model: onnx.ModelProto
                      ) -> tuple[onnx.ModelProto, str]:
    """The float model the written one is timed against, and which it is: the model as read, which the user
    replaces (the prepared one folds batch norms and fuses HardSwish, and may run faster); the prepared one
    where the model as read takes inputs of other types (float16) or a large model's tensors are in the store."""
    def inputs(model: onnx.ModelProto) -> list:
        constants = {t.name for t in model.graph.initializer}
        return [(i.name, i.type.tensor_type.elem_type) for i in model.graph.input if i.name not in constants]

    if run.store.used or inputs(original) != inputs(float_model):
        return float_model, "prepared"
    return original, "as read"


def _plan(run: RunContext, float_model: onnx.ModelProto, unfused: frozenset = frozenset()) -> QuantPlan:
    """The quantization points of ``float_model`` less the excluded nodes (ModelError when nothing is left);
    ``unfused``: layers whose output point moves past their activation (equalization)."""
    plan = build_plan(float_model, run.config.quantize_outputs, run.target.fusible,
                      fused_layers(run, float_model, unfused))
    floated = float_names(run.config.overrides, float_model)
    plan = exclude_nodes(float_model, plan, run.config.exclude + floated, run.config.quantize_outputs)
    if not plan.weights and not plan.groups:
        raise ModelError("the model has no quantizable layer (no Conv/Gemm/MatMul/... and no float activations)")
    record_plan(run.report, plan)
    return plan


def _run_stages(run: RunContext, original: onnx.ModelProto, calib: CalibSource) -> QuantizeResult:
    """The stages in data-flow order, from the model as read to the validated QDQ model (not yet saved)."""
    float_model, plan, calib_set, candidates, acts = initial_state(run, original, calib)
    weights = candidates[max(candidates)]
    lfh = None  # the search's LFH of float_model, reused by the EPTQ stage
    if run.config.mixed is not None:
        with run.stage("mixed precision"):
            search = SearchInputs(float_model, plan, candidates, acts, calib_set, run.config, run.rescaled)
            weights, sensitivity = choose_bits(search, run.report, run.progress, run.log)
            lfh = sensitivity.hessian
            if lfh is not None:
                warn_lfh(run.report, lfh[0])
    quantized_model, weights, acts = _optimize(run, float_model, plan, weights, acts, calib_set, lfh)
    written = None  # the fidelity target writes the state it verifies: the write stage takes that model
    if run.config.min_sqnr is not None:
        with run.stage("fidelity target"):
            (quantized_model, plan, weights, acts), written = meet_target_stage(
                run, float_model, quantized_model, plan, weights, acts, calib_set,
                write=lambda *state: _qdq(run, *state))
    with run.stage("write"):
        qdq, summary = _write(run, quantized_model, plan, weights, acts, written)
    with run.stage("validate"):
        validation = _validate(run, float_model, quantized_model, qdq, plan, weights, acts, calib_set, summary)
    if run.config.measure_latency:
        with run.stage("latency"):
            report_latency(run, *_latency_baseline(run, original, float_model), qdq, calib_set, weights, validation)
    fidelity = run.report.fidelity
    if run.config.strict and fidelity and not fidelity["reached"]:
        raise TargetNotReached(f"--min-sqnr {fidelity['target_db']:g} dB not reached (held-out output SQNR "
                               f"{fidelity['written_db']:.1f} dB, {len(fidelity['floated'])} node(s) left float: "
                               f"{fidelity['note']}); without --strict the model is written with a warning")
    state = QuantState(float_model=quantized_model, plan=plan, weights=weights, acts=acts, config=run.config)
    return QuantizeResult(model=qdq, report=run.report, state=state, store=run.store if run.store.used else None)


def _normalize(run: RunContext, original: onnx.ModelProto) -> onnx.ModelProto:
    """The prepared float model (``_prepare``), its new tensors held by the store of a large model."""
    float_model, run.config = _prepare(original, run.config, run.report)
    if run.store.used:  # folded batch norms: new weights
        float_model = run.store.held(float_model)
        unfolded = constant_only_nodes(float_model)
        if unfolded:
            shown = ", ".join(unfolded[:5]) + (f" and {len(unfolded) - 5} more" if len(unfolded) > 5 else "")
            run.report.warn(f"large model: {len(unfolded)} node(s) computing from constants only were not folded "
                            f"(their tensors are in the tensor store; they run as they are): {shown}")
    check_onnxruntime_loads(float_model)
    return float_model


def _optimize(run: RunContext, model: onnx.ModelProto, plan: QuantPlan, weights: Dict[str, WeightQuant],
              acts: Dict[int, ActParams], calib: CalibrationSet, lfh: Optional[tuple]):
    """The model with bias-corrected biases and the quantizers as they are (what ``--iters 0`` writes);
    where EPTQ runs, it starts from them and its result replaces them unless it is worse on the check
    samples: then the reason is in the report."""
    optimize = run.config.optimize
    start = bias_corrected_model(run, model, plan, weights, acts, calib)
    if optimize.iters == 0:
        return start, weights, acts
    if not plan.weights and not optimize.learn_act_scales:
        run.report.warn("FALLBACK: EPTQ optimization skipped, the output is the MSE-initialized model: "
                        "the model has no weights to optimize (and --learn-act-scales is off)")
        return start, weights, acts
    with run.stage("eptq"):
        try:
            outcome = run_eptq(model, plan, weights, acts, calib, run.config, run.progress, log=run.log,
                               started_at=run.started_at, lfh=lfh, start=start, untapped=run.rescaled)
        except TwinUnavailable as exc:
            run.report.warn(f"FALLBACK: EPTQ optimization skipped, the output is the MSE-initialized model: {exc}")
            return start, weights, acts
        record_eptq(run.report, outcome)
    if outcome.kept_init:  # the initialized model, as an --iters 0 run writes it
        return start, weights, acts
    return outcome.float_model, outcome.weights, outcome.acts


def _write(run: RunContext, model: onnx.ModelProto, plan: QuantPlan, weights: Dict[str, WeightQuant],
           acts: Dict[int, ActParams], written: Optional[tuple[onnx.ModelProto, WriteSummary]] = None
           ) -> tuple[onnx.ModelProto, WriteSummary]:
    """The QDQ model (``written``, where a stage already wrote this state), with the biases the writer
    left float or saturated in the report."""
    qdq, summary = written or _qdq(run, model, plan, weights, acts)
    for bias in summary.float_biases:
        run.report.warn(f"bias {bias} stays float: its layer's input is not quantized")
    for bias in summary.clipped_biases:
        run.report.warn(f"bias {bias} saturated to the int32 range")
    return qdq, summary


def _qdq(run: RunContext, model: onnx.ModelProto, plan: QuantPlan, weights: Dict[str, WeightQuant],
         acts: Dict[int, ActParams]) -> tuple[onnx.ModelProto, WriteSummary]:
    """The QDQ model of a state, as the run writes it."""
    config = run.config
    qdq, summary = write_qdq(model, plan, weights, acts, weight_storage=config.weight_storage,
                             quantize_outputs=config.quantize_outputs, quantize_bias=config.quantize_bias,
                             target=run.target)
    qdq.ir_version = ir_version_for(default_opset(qdq))
    return qdq, summary


def _validate(run: RunContext, float_model: onnx.ModelProto, quantized_model: onnx.ModelProto, qdq: onnx.ModelProto,
              plan: QuantPlan, weights: Dict[str, WeightQuant], acts: Dict[int, ActParams], calib: CalibrationSet,
              summary: WriteSummary) -> Validation:
    """The written model against the float model and its fake-quant reference; what was measured is in
    the report even when validation fails."""
    config = run.config
    fake_quant = fake_quant_model(quantized_model, plan, weights, acts, config.quantize_outputs, config.quantize_bias)
    validation = Validation()
    try:
        validation = validate(float_model, qdq, plan, calib, config.validation_samples, run.progress,
                              reference=fake_quant, target=run.target)
    except ValidationError as exc:
        validation = exc.validation or validation
        raise
    finally:
        run.report.validation = asdict(validation)
        run.report.warnings.extend(validation.notes)
        run.report.tensors = tensor_entries(float_model, plan, weights, acts, summary.storage, validation.tensor_sqnr_db)
    return validation


def _finish(run: RunContext, result: QuantizeResult, original: onnx.ModelProto, output_path: Optional[Path],
            force: bool, report_path: Union[str, Path, None], plots_dir: Union[str, Path, None]) -> None:
    """float16 I/O restored, the model saved, the report and plots written."""
    report = run.report
    if has_float16(original):
        result.model = float16_io(result.model, original, report)
    if output_path is not None:
        with run.stage("save"):
            save_model(result.model, output_path, force=force)
            report.sizes_bytes["output"] = output_path.stat().st_size
        result.output_path = output_path
    else:
        report.sizes_bytes["output"] = serialized_size(result.model)
    if report_path is not None:
        report.write_json(report_path)
    if plots_dir is not None:
        write_plots(report, Path(plots_dir))
    if not run.store.used:
        run.store.close()
