"""Validation of a written QDQ model against the float model, with onnxruntime.

The fidelity that counts is what onnxruntime computes with its default graph optimizations against
the float model: output SQNR, max abs error and, for outputs that look like class scores, top-1
agreement. Diagnostics: onnx.checker (full); the unoptimized run and its agreement with the
optimized one; the QDQ model against its fake-quant reference; per-group activation SQNR; how many
Conv/MatMul/Gemm onnxruntime fuses into integer ops. A disagreement is traced to the first tensor
where the two runs part (divergence).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Optional

import numpy as np
import onnx
from tqdm import tqdm

from eptq_onnx.calib.data import CalibrationSet
from eptq_onnx.export.divergence import (DIAGNOSIS_SAMPLES, Accumulator, diagnose_optimization, first_below, input_agreement,
                         optimized_session, producers)
from eptq_onnx.errors import ValidationError
from eptq_onnx.export.reference import fake_quant_name
from eptq_onnx.graph.float16 import restore_io_types
from eptq_onnx.graph.model_io import model_path, serialized_size
from eptq_onnx.plan.qpoints import QuantPlan
from eptq_onnx.graph.runtime import (PROTOBUF_LIMIT, TAPPED_BATCH_BYTES, make_session, run, tapped_bytes_per_sample,
                                     with_outputs)
from eptq_onnx.plan.targets import TARGETS, Target
from eptq_onnx.graph.tensor_store import store_of
from eptq_onnx.ops.registry import ORT_FUSED_LINEAR
from eptq_onnx.ops.registry import LINEAR_OPS

if TYPE_CHECKING:
    from eptq_onnx.report import Report

# Optimized and unoptimized runs differ by integer requantization rounding only; below this
# mutual SQNR (dB) they disagree.
MIN_AGREEMENT_DB = 20.0
# A disagreement starts at an op of its own (its fused kernel computes differently) where the op's
# inputs agree to at least this SQNR (dB); below it, the op inherits differences grown upstream.
LOCAL_AGREEMENT_DB = 30.0
# The optimized run may be this much (dB of output SQNR vs float) less faithful than the unoptimized
# one before its disagreement is a fidelity loss (a VALIDATION warning) rather than rounding.
FUSION_LOSS_DB = 1.0
# onnxruntime's QDQ fusions refuse INT2 weights (QLinearConv: "Type 'tensor(int2)' ... is invalid"):
# models of targets other than onnxruntime itself that hold them run in onnxruntime with fusion off,
# which computes ONNX's QDQ semantics (what those targets run)
INT2_FUSION_OFF = {"session.disable_quant_qdq": "1"}
# The QDQ model and its fake-quant reference differ by float rounding ties only (a code off by one
# step here and there); below this SQNR (dB) of a quantized tensor they diverge.
MIN_REFERENCE_DB = 30.0
# Below this SQNR (dB) of its inputs, a tensor that departs from the reference inherits the departure.
LOCAL_REFERENCE_DB = 40.0
# The per-tensor diagnostics (tapped runs of the float, unoptimized QDQ and reference models) run on the
# first samples whose tapped tensors fit this many bytes in all, at least TAPPED_MIN_SAMPLES of them;
# the outputs (the fidelity that counts) are compared on every validation sample.
TAPPED_VALIDATION_BYTES = 1 << 30
TAPPED_MIN_SAMPLES = 4


@dataclass
class Validation:
    """What validation measured.

    What counts comes first: onnxruntime with its default graph optimizations (what a deployment
    runs) against the float model. The rest are diagnostics: the unoptimized run, the agreement of
    the two runs, and where a disagreement starts (``first_difference``).
    """

    samples: int = 0
    tapped_samples: int = 0  # of ``samples``: those the per-tensor and unoptimized diagnostics ran on
    output_sqnr_db: Dict[str, float] = field(default_factory=dict)  # optimized onnxruntime vs float
    output_max_abs_error: Dict[str, float] = field(default_factory=dict)
    top1_agreement: Dict[str, float] = field(default_factory=dict)  # outputs that look like class scores
    unoptimized_output_sqnr_db: Dict[str, float] = field(default_factory=dict)
    optimized_agreement_db: Dict[str, float] = field(default_factory=dict)
    # "optimized_vs_unoptimized" / "qdq_vs_reference" -> the first tensor where they differ (divergence.FirstDifference)
    first_difference: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    tensor_sqnr_db: Dict[str, float] = field(default_factory=dict)
    fused_linear_ops: int = 0
    linear_ops: int = 0
    fused_op_types: Dict[str, int] = field(default_factory=dict)
    qdq_fusion_disabled: bool = False
    notes: List[str] = field(default_factory=list)


@dataclass
class _Top1:
    """Arg-max agreement over the last axis (the classes) at every other position."""

    matches: int = 0
    total: int = 0

    def add(self, ref: np.ndarray, approx: np.ndarray) -> None:
        agree = np.argmax(ref, axis=-1) == np.argmax(approx, axis=-1)
        self.matches += int(agree.sum())
        self.total += int(agree.size)


def looks_like_class_scores(array: np.ndarray) -> bool:
    """Scores over classes on the last axis: [N, C] logits, or probabilities (summing to 1) of any rank."""
    if not np.issubdtype(array.dtype, np.floating) or array.ndim < 2 or array.shape[-1] < 2 or array.size == 0:
        return False
    if array.ndim == 2:
        return True
    return bool((array >= 0).all() and np.allclose(array.sum(axis=-1, dtype=np.float64), 1.0, atol=1e-3))


def _has_int2_weights(model: onnx.ModelProto) -> bool:
    return any(t.data_type in (onnx.TensorProto.INT2, onnx.TensorProto.UINT2) for t in model.graph.initializer)


def session_config(model: onnx.ModelProto, target: Target) -> Dict[str, str]:
    """onnxruntime session options to validate ``model`` of ``target`` with: the defaults, except
    QDQ fusion off for INT2 weights of a target that is not onnxruntime (see INT2_FUSION_OFF)."""
    return dict(INT2_FUSION_OFF) if not target.onnxruntime and _has_int2_weights(model) else {}


def check_model(model: onnx.ModelProto) -> None:
    """onnx.checker full check (shape inference included); ValidationError with its first line."""
    try:
        if serialized_size(model) < PROTOBUF_LIMIT and store_of(model) is None:
            onnx.checker.check_model(model, full_check=True)
        else:
            with model_path(model) as path:
                onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # checker raises several exception types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValidationError(f"the written model fails onnx.checker: {first}") from exc


def count_fused(model: onnx.ModelProto, config: Dict[str, str]) -> Dict[str, int]:
    """Op types of onnxruntime's optimized graph (extended level: where QDQ fusion happens)."""
    counts: Dict[str, int] = defaultdict(int)
    for node in optimized_session(model, config)[1].graph.node:
        counts[node.op_type] += 1
    return dict(counts)


def validate(
    float_model: onnx.ModelProto,
    qdq_model: onnx.ModelProto,
    plan: QuantPlan,
    calib: CalibrationSet,
    samples: int,
    progress: bool = True,
    reference: Optional[onnx.ModelProto] = None,
    target: Target = TARGETS["ort-cpu"],
) -> Validation:
    """Run the float and QDQ models on the first ``samples`` calibration samples and compare.

    With ``reference`` (``fake_quant.fake_quant_model`` of the state the QDQ model was written
    from), every quantized tensor and output of the QDQ model must match it (``MIN_REFERENCE_DB``),
    else ValidationError names the first tensor, in graph order, where they diverge. onnxruntime
    runs with its default options for ``target`` (``session_config``). A ValidationError carries
    what was measured before it (``.validation``).
    """
    result = Validation()
    try:
        _validate(float_model, qdq_model, plan, calib, samples, progress, reference, target, result)
    except ValidationError as exc:
        exc.validation = result
        raise
    return result


def _validate(float_model: onnx.ModelProto, qdq_model: onnx.ModelProto, plan: QuantPlan, calib: CalibrationSet,
              samples: int, progress: bool, reference: Optional[onnx.ModelProto], target: Target,
              result: Validation) -> None:
    check_model(qdq_model)
    config = session_config(qdq_model, target)
    if config:
        result.qdq_fusion_disabled = True
        result.notes.append(f"INT2 weights: validated with onnxruntime's QDQ fusion off (session.disable_quant_qdq=1), "
                            f"ONNX's semantics, which --target {target.name} runs; onnxruntime itself refuses INT2 in its "
                            "fused kernels: use --target ort-cpu (2-bit codes in INT4) to deploy on onnxruntime")
    roots = [g.roots[0] for g in plan.groups]
    dq_outputs = {n.output[0] for n in qdq_model.graph.node if n.op_type == "DequantizeLinear"}
    qdq_tensor_names = {r: (r if r in dq_outputs else f"{r}_DequantizeLinear_Output") for r in roots}
    out_names = [o.name for o in float_model.graph.output]
    checked = _checked_tensors(float_model, plan, out_names)  # topological order
    qdq_checked = {t: (t if t in dq_outputs or t in out_names else f"{t}_DequantizeLinear_Output") for t in checked}
    float_sess = make_session(with_outputs(float_model, roots))
    try:
        ref_sess = make_session(with_outputs(qdq_model, [*qdq_tensor_names.values(), *qdq_checked.values()]),
                                optimize=False, config=config)
        opt_sess = make_session(qdq_model, optimize=True, config=config)
    except Exception as exc:
        raise ValidationError(f"onnxruntime cannot load the quantized model: {_first_line(exc)}") from exc
    fq_names = {t: (t if t in out_names else fake_quant_name(t)) for t in checked}
    # a store-backed (large) model: the float and reference sessions map their weights one after the other
    split = store_of(float_model) is not None
    fq_sess = _reference_session(reference, fq_names) if reference is not None and not split else None

    outputs = defaultdict(Accumulator)  # optimized onnxruntime vs float
    unoptimized = defaultdict(Accumulator)
    top1: Dict[str, _Top1] = {}
    agreement = defaultdict(Accumulator)
    tensors = defaultdict(Accumulator)
    divergence = defaultdict(Accumulator)
    # two sets of tapped tensors are alive at once: the QDQ model's (ref_sess) and the float or reference one's
    per_sample = tapped_bytes_per_sample(ref_sess, calib)
    batch_size = max(1, min(calib.batch_size, int(TAPPED_BATCH_BYTES // max(2 * per_sample, 1))))
    tapped_limit = max(TAPPED_MIN_SAMPLES, int(TAPPED_VALIDATION_BYTES // max(per_sample, 1)))
    plain_float = None  # the float model without taps, for the samples past tapped_limit
    pairs = (checked, fq_names, qdq_checked)
    total = calib.num_batches(batch_size, limit=samples)
    for feeds in tqdm(calib.batches(batch_size, limit=samples), total=total, desc="validation", disable=not progress,
                      leave=False):
        first_batch = result.samples == 0
        tapped = result.samples < tapped_limit
        result.samples += calib.samples_in(feeds)
        o = _run_qdq(opt_sess, feeds, out_names)
        if not tapped:
            plain_float = plain_float or make_session(float_model)
            f = run(plain_float, feeds, out_names)
            _add_outputs(out_names, f, o, outputs, top1, first_batch)
            continue
        result.tapped_samples += calib.samples_in(feeds)
        r = _run_qdq(ref_sess, feeds)
        f = run(float_sess, feeds)
        _add_outputs(out_names, f, o, outputs, top1, first_batch)
        for name in out_names:
            agreement[name].add(r[name], o[name])
            unoptimized[name].add(f[name], r[name])
        for root, qname in qdq_tensor_names.items():
            tensors[root].add(f[root], r[qname])
        del f, o
        if fq_sess is not None:
            _add_divergence(divergence, run(fq_sess, feeds), r, *pairs)
    if reference is not None and split:
        del float_sess, opt_sess, plain_float
        fq_sess = _reference_session(reference, fq_names)
        for feeds in calib.batches(batch_size, limit=result.tapped_samples):
            _add_divergence(divergence, run(fq_sess, feeds), _run_qdq(ref_sess, feeds), *pairs)
    for name in out_names:
        result.output_sqnr_db[name] = outputs[name].sqnr
        result.output_max_abs_error[name] = outputs[name].max_abs
        result.unoptimized_output_sqnr_db[name] = unoptimized[name].sqnr
        result.optimized_agreement_db[name] = agreement[name].sqnr
        if name in top1:
            result.top1_agreement[name] = top1[name].matches / max(1, top1[name].total)
    result.tensor_sqnr_db = {root: acc.sqnr for root, acc in tensors.items()}
    _check_divergence(divergence, checked, float_model, result)
    for name in out_names:
        if not (np.isfinite(outputs[name].max_abs) and np.isfinite(unoptimized[name].max_abs)):
            raise ValidationError(f"output {name!r}: the quantized model's output is not finite")
    disagree = [name for name in out_names if agreement[name].sqnr < MIN_AGREEMENT_DB]
    if disagree:  # the model is usable: written, with a loud warning that says where the runs part
        _note_disagreement(qdq_model, calib, config, disagree, result)
    counts = count_fused(qdq_model, config)
    result.fused_op_types = {k: v for k, v in counts.items() if k in ORT_FUSED_LINEAR}
    result.fused_linear_ops = sum(result.fused_op_types.values())
    result.linear_ops = sum(1 for n in float_model.graph.node if n.op_type in LINEAR_OPS)


def _note_disagreement(qdq_model: onnx.ModelProto, calib: CalibrationSet, config: Dict[str, str],
                       disagree: List[str], result: Validation) -> None:
    """A VALIDATION note per output where optimized and unoptimized onnxruntime disagree, with the first op that differs."""
    first = diagnose_optimization(qdq_model, calib, MIN_AGREEMENT_DB, config)
    if first is not None:
        result.first_difference["optimized_vs_unoptimized"] = asdict(first)
    where = (f"they first differ at {first.describe()}" if first is not None
             else f"no tensor differs below {MIN_AGREEMENT_DB} dB on {DIAGNOSIS_SAMPLES} samples")
    for name in disagree:
        optimized, unoptimized = result.output_sqnr_db[name], result.unoptimized_output_sqnr_db[name]
        runs = (f"output {name!r}: onnxruntime with and without graph optimizations disagree (SQNR "
                f"{result.optimized_agreement_db[name]:.1f} dB < {MIN_AGREEMENT_DB} dB)")
        local = first is not None and first.input_sqnr_db >= LOCAL_AGREEMENT_DB  # that op itself computes differently
        if local or unoptimized - optimized > FUSION_LOSS_DB:
            result.notes.append(
                f"VALIDATION: {runs}: its fused integer kernels compute this model differently from the QDQ ops as "
                f"written (SQNR vs float {optimized:.1f} dB optimized, {unoptimized:.1f} dB unoptimized); {where}")
        else:  # two roundings of the same quantized model, each as far from the float model as the other
            inherited = f" (its inputs already differ: {first.input_sqnr_db:.1f} dB)" if first is not None else ""
            result.notes.append(
                f"{runs}, by rounding differences grown through the model as its quantization noise grows (no op "
                f"computes differently by itself; SQNR vs float {optimized:.1f} dB optimized, {unoptimized:.1f} dB "
                f"unoptimized); {where}{inherited}")


def _reference_session(reference: onnx.ModelProto, fq_names: Dict[str, str]):
    return make_session(with_outputs(reference, fq_names.values()), optimize=False)


def _run_qdq(session, feeds: Dict[str, np.ndarray], names: Optional[List[str]] = None) -> Dict[str, np.ndarray]:
    """The QDQ session's outputs (``names``, default all); a failure to run is a ValidationError."""
    try:
        return run(session, feeds, names)
    except Exception as exc:
        raise ValidationError(f"onnxruntime fails to run the quantized model: {_first_line(exc)}") from exc


def _add_outputs(out_names: List[str], f: Dict[str, np.ndarray], o: Dict[str, np.ndarray],
                 outputs: Dict[str, Accumulator], top1: Dict[str, "_Top1"], first_batch: bool) -> None:
    """Optimized QDQ outputs ``o`` against the float outputs ``f``: SQNR, and top-1 for class scores
    (recognized on the first batch)."""
    for name in out_names:
        outputs[name].add(f[name], o[name])
        if first_batch and looks_like_class_scores(f[name]):
            top1[name] = _Top1()
        if name in top1:
            top1[name].add(f[name], o[name])


def _add_divergence(divergence: Dict[str, Accumulator], q: Dict[str, np.ndarray], r: Dict[str, np.ndarray],
                    checked: List[str], fq_names: Dict[str, str], qdq_checked: Dict[str, str]) -> None:
    for t in checked:
        divergence[t].add(q[fq_names[t]], r[qdq_checked[t]])


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _checked_tensors(model: onnx.ModelProto, plan: QuantPlan, outputs: List[str]) -> List[str]:
    """Quantized tensors and float outputs in topological order (inputs first)."""
    quantized = {t for g in plan.groups for t in g.tensors}
    order = [i.name for i in model.graph.input] + [o for n in model.graph.node for o in n.output]
    checked = [t for t in order if t in quantized]
    return checked + [o for o in outputs if o not in quantized]


def _check_divergence(divergence: Dict[str, Accumulator], checked: List[str], float_model: onnx.ModelProto,
                      result: Validation) -> None:
    """Where the QDQ model first departs from its fake-quant reference (``checked``: float-model tensor names).

    An op whose inputs agree (``LOCAL_REFERENCE_DB``) but whose output departs is written wrong: a
    ValidationError. An op that inherits differences grown upstream (rounding ties, which the two
    compute on different sides now and then, amplified by the model) is a VALIDATION warning.
    """
    first = first_below(divergence, checked, MIN_REFERENCE_DB, producers(float_model))
    if first is None:
        return
    first.input_sqnr_db = input_agreement(float_model, first.tensor, divergence)
    result.first_difference["qdq_vs_reference"] = asdict(first)
    if first.input_sqnr_db < LOCAL_REFERENCE_DB and np.isfinite(first.max_abs_difference):
        result.notes.append(
            f"VALIDATION: the QDQ model departs from its fake-quant reference first at {first.describe()}, whose "
            f"inputs already differ ({first.input_sqnr_db:.1f} dB): rounding ties grown through the model, no op "
            "written wrong by itself")
        return
    raise ValidationError(
        f"validation: the QDQ model diverges from its fake-quant reference first at tensor {first.tensor!r} "
        f"(SQNR {first.sqnr_db:.1f} dB < {MIN_REFERENCE_DB:.0f} dB, max abs difference {first.max_abs_difference:.4g}; "
        f"{first.made_by()}): the written model does not compute what its quantizers do; rerun with --debug and report it"
    )


def float16_io(qdq: onnx.ModelProto, original: onnx.ModelProto, report: "Report") -> onnx.ModelProto:
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
