"""Validation of a written QDQ model against the float model, with onnxruntime.

Checks: onnx.checker (full); onnxruntime loads and runs the model with graph optimizations off
and on, and the two agree; output SQNR and max abs error vs the float model; per-group
activation SQNR; how many Conv/MatMul/Gemm onnxruntime fuses into integer ops.
"""
from __future__ import annotations

import os
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np
import onnx
from tqdm import tqdm

from .calib_data import CalibrationSet
from .errors import ValidationError
from .fake_quant import fake_quant_name
from .model_io import model_path, serialized_size
from .qpoints import QuantPlan
from .quantizers import sqnr_db
from .runtime import PROTOBUF_LIMIT, make_session, run, tapped_batch_size, with_outputs
from .targets import TARGETS, Target
from .tensor_store import store_of

# Fused integer ops onnxruntime's QDQ transformers produce for Conv, MatMul and Gemm.
FUSED_OPS = {"QLinearConv", "QLinearMatMul", "QGemm", "MatMulIntegerToFloat", "ConvInteger", "MatMulInteger"}
LINEAR_OPS = {"Conv", "MatMul", "Gemm"}
# Optimized and unoptimized runs differ by integer requantization rounding only; below this
# mutual SQNR (dB) they disagree.
MIN_AGREEMENT_DB = 20.0
# onnxruntime's QDQ fusions refuse INT2 weights (QLinearConv: "Type 'tensor(int2)' ... is invalid"):
# models of targets other than onnxruntime itself that hold them run in onnxruntime with fusion off,
# which computes ONNX's QDQ semantics (what those targets run)
INT2_FUSION_OFF = {"session.disable_quant_qdq": "1"}
# The QDQ model and its fake-quant reference differ by float rounding ties only (a code off by one
# step here and there); below this SQNR (dB) of a quantized tensor they diverge.
MIN_REFERENCE_DB = 30.0


@dataclass
class _Accumulator:
    signal: float = 0.0
    noise: float = 0.0
    max_abs: float = 0.0

    def add(self, ref: np.ndarray, approx: np.ndarray) -> None:
        ref64 = np.asarray(ref, dtype=np.float64)
        diff = ref64 - np.asarray(approx, dtype=np.float64)
        self.signal += float((ref64**2).sum())
        self.noise += float((diff**2).sum())
        if diff.size:
            self.max_abs = max(self.max_abs, float(np.abs(diff).max()))

    @property
    def sqnr(self) -> float:
        if self.noise == 0:
            return float("inf")
        return float("-inf") if self.signal == 0 else 10.0 * float(np.log10(self.signal / self.noise))


@dataclass
class Validation:
    """What validation measured."""

    samples: int = 0
    output_sqnr_db: Dict[str, float] = field(default_factory=dict)
    output_max_abs_error: Dict[str, float] = field(default_factory=dict)
    optimized_agreement_db: Dict[str, float] = field(default_factory=dict)
    tensor_sqnr_db: Dict[str, float] = field(default_factory=dict)
    fused_linear_ops: int = 0
    linear_ops: int = 0
    fused_op_types: Dict[str, int] = field(default_factory=dict)
    qdq_fusion_disabled: bool = False
    notes: List[str] = field(default_factory=list)


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
    if store_of(model) is not None:  # the optimized copy's weights go to a file, not into memory
        config = {**config, "session.optimized_model_external_initializers_file_name": "optimized.onnx.data"}
    with tempfile.TemporaryDirectory(prefix="eptq-opt-") as tmp:
        path = os.path.join(tmp, "optimized.onnx")
        make_session(model, optimize=True, config=config, optimized_path=path)
        optimized = onnx.load(path, load_external_data=False)
    counts: Dict[str, int] = defaultdict(int)
    for node in optimized.graph.node:
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
    runs with its default options for ``target`` (``session_config``).
    """
    check_model(qdq_model)
    result = Validation()
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

    outputs = defaultdict(_Accumulator)
    agreement = defaultdict(_Accumulator)
    tensors = defaultdict(_Accumulator)
    divergence = defaultdict(_Accumulator)
    # two sets of tapped tensors are alive at once: the QDQ model's and the float or reference one's
    batch_size = tapped_batch_size(float_model, [*checked, *checked], calib.batch_size)
    pairs = (checked, fq_names, qdq_checked)
    for feeds, r in _qdq_batches(ref_sess, calib, batch_size, samples, progress):
        result.samples += calib.samples_in(feeds)
        try:
            o = run(opt_sess, feeds, out_names)
        except Exception as exc:
            raise ValidationError(f"onnxruntime fails to run the quantized model: {_first_line(exc)}") from exc
        for name in out_names:
            agreement[name].add(r[name], o[name])
        del o
        f = run(float_sess, feeds)
        for name in out_names:
            outputs[name].add(f[name], r[name])
        for root, qname in qdq_tensor_names.items():
            tensors[root].add(f[root], r[qname])
        del f
        if fq_sess is not None:
            _add_divergence(divergence, run(fq_sess, feeds), r, *pairs)
    if reference is not None and split:
        del float_sess, opt_sess
        fq_sess = _reference_session(reference, fq_names)
        for feeds, r in _qdq_batches(ref_sess, calib, batch_size, samples, progress):
            _add_divergence(divergence, run(fq_sess, feeds), r, *pairs)
    _check_divergence(divergence, checked)
    for name in out_names:
        result.output_sqnr_db[name] = outputs[name].sqnr
        result.output_max_abs_error[name] = outputs[name].max_abs
        result.optimized_agreement_db[name] = agreement[name].sqnr
        if not np.isfinite(outputs[name].max_abs):
            raise ValidationError(f"output {name!r}: the quantized model's output is not finite")
        if agreement[name].sqnr < MIN_AGREEMENT_DB:  # the model is usable: written, with a loud warning
            result.notes.append(
                f"VALIDATION: output {name!r}: onnxruntime with and without graph optimizations disagree "
                f"(SQNR {agreement[name].sqnr:.1f} dB < {MIN_AGREEMENT_DB} dB): its fused integer kernels compute "
                "this model differently from the QDQ ops as written; measure the deployed fidelity before shipping")
    result.tensor_sqnr_db = {root: acc.sqnr for root, acc in tensors.items()}
    counts = count_fused(qdq_model, config)
    result.fused_op_types = {k: v for k, v in counts.items() if k in FUSED_OPS}
    result.fused_linear_ops = sum(result.fused_op_types.values())
    result.linear_ops = sum(1 for n in float_model.graph.node if n.op_type in LINEAR_OPS)
    return result


def _reference_session(reference: onnx.ModelProto, fq_names: Dict[str, str]):
    return make_session(with_outputs(reference, fq_names.values()), optimize=False)


def _qdq_batches(session, calib: CalibrationSet, batch_size: int, samples: int, progress: bool):
    """(feeds, every output of the unoptimized QDQ session) per validation batch."""
    total = calib.num_batches(batch_size, limit=samples)
    for feeds in tqdm(calib.batches(batch_size, limit=samples), total=total, desc="validation", disable=not progress,
                      leave=False):
        try:
            r = run(session, feeds)
        except Exception as exc:
            raise ValidationError(f"onnxruntime fails to run the quantized model: {_first_line(exc)}") from exc
        yield feeds, r


def _add_divergence(divergence: Dict[str, _Accumulator], q: Dict[str, np.ndarray], r: Dict[str, np.ndarray],
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


def _check_divergence(divergence: Dict[str, _Accumulator], checked: List[str]) -> None:
    """ValidationError naming the first tensor whose QDQ values diverge from the fake-quant reference."""
    for name in checked:
        acc = divergence.get(name)
        if acc is not None and (acc.sqnr < MIN_REFERENCE_DB or not np.isfinite(acc.max_abs)):
            raise ValidationError(
                f"validation: the QDQ model diverges from its fake-quant reference first at tensor {name!r} "
                f"(SQNR {acc.sqnr:.1f} dB < {MIN_REFERENCE_DB:.0f} dB, max abs difference {acc.max_abs:.4g}): "
                f"the written model does not compute what its quantizers do; rerun with --debug and report it"
            )
