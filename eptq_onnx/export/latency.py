"""What the written model costs to run: onnxruntime CPU latency of the float and the quantized model.

Both sessions run with onnxruntime's default graph optimizations and the same thread count, on the
same single feed; runs are interleaved (float, quantized, quantized, float, ...) so that a machine
that gets slower or faster during the measurement moves both medians alike.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Dict, List, Optional

import numpy as np
import onnx
import onnxruntime as ort

from eptq_onnx.export.validate import Validation, session_config
from eptq_onnx.graph.runtime import inference_session
from eptq_onnx.ops.registry import LINEAR_OPS
from eptq_onnx.plan.targets import ACT_ELEM_TYPES

if TYPE_CHECKING:
    from eptq_onnx.calib.data import CalibrationSet
    from eptq_onnx.context import RunContext
    from eptq_onnx.init.weights import WeightQuant

WARMUP_RUNS = 3
MIN_RUNS = 5  # per model
MAX_RUNS = 50
MEASURE_SECONDS = 3.0  # wall time the interleaved runs may take, both models together
SLOWER_THAN_FLOAT = 1.05  # a ratio above this is warned about


@dataclass
class Latency:
    """Median onnxruntime CPU latency of one feed, float vs quantized."""

    threads: int = 0
    runs: int = 0
    float_ms: float = 0.0
    quantized_ms: float = 0.0
    ratio: float = 0.0  # quantized / float
    float_runs_ms: List[float] = field(default_factory=list)
    quantized_runs_ms: List[float] = field(default_factory=list)


def default_threads() -> int:
    """One thread: the ratio of per-core costs, which a machine busy with other work disturbs least
    (a multi-threaded session's workers wait on each other whenever one is descheduled)."""
    return 1


def _session(model: onnx.ModelProto, threads: int, config: Optional[Dict[str, str]] = None) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    for key, value in (config or {}).items():
        opts.add_session_config_entry(key, value)
    opts.log_severity_level = 3
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return inference_session(model, opts)


def _timed(session: ort.InferenceSession, feeds: Dict[str, np.ndarray]) -> float:
    start = time.perf_counter()
    session.run(None, feeds)
    return (time.perf_counter() - start) * 1e3


def measure_latency(float_model: onnx.ModelProto, quantized_model: onnx.ModelProto, feeds: Dict[str, np.ndarray],
                    threads: Optional[int] = None, seconds: float = MEASURE_SECONDS,
                    config: Optional[Dict[str, str]] = None) -> Latency:
    """Median latency (ms) of ``feeds`` through both models, interleaved, within about ``seconds``
    (the quantized model's session takes the ``config`` entries validation used)."""
    threads = threads or default_threads()
    sessions = (_session(float_model, threads), _session(quantized_model, threads, config))
    for _ in range(WARMUP_RUNS):
        for s in sessions:
            _timed(s, feeds)
    first = [_timed(s, feeds) for s in sessions]
    runs = int(np.clip(seconds * 1e3 / max(sum(first), 1e-3), MIN_RUNS, MAX_RUNS))
    times: List[List[float]] = [[first[0]], [first[1]]]
    for i in range(1, runs):
        order = (0, 1) if i % 2 else (1, 0)
        for k in order:
            times[k].append(_timed(sessions[k], feeds))
    f, q = (float(np.median(t)) for t in times)
    return Latency(threads=threads, runs=runs, float_ms=round(f, 4), quantized_ms=round(q, 4),
                   ratio=round(q / f, 4) if f > 0 else float("inf"),
                   float_runs_ms=[round(t, 4) for t in times[0]], quantized_runs_ms=[round(t, 4) for t in times[1]])


@dataclass
class WideReaders:
    """The Conv/MatMul/Gemm of a written model that read or write 16-bit activations, and the output SQNR
    (dB) that the 16-bit points were kept for (report.wide_output_sqnr_db: 8-bit vs 16-bit)."""

    ops: int = 0
    db_8: Optional[float] = None
    db_16: Optional[float] = None


def sixteen_bit_linear_ops(qdq: onnx.ModelProto) -> int:
    """How many Conv/MatMul/Gemm of a QDQ model read a 16-bit DequantizeLinear or feed a 16-bit
    QuantizeLinear (onnxruntime's CPU has no 16-bit integer kernel for them: they run as float ops)."""
    zero_points = {t.name: t.data_type for t in qdq.graph.initializer}
    wide_q = [n for n in qdq.graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2
              and ACT_ELEM_TYPES.get(zero_points.get(n.input[2]), (0, False))[0] == 16]
    written = {n.input[0] for n in wide_q}
    codes = {n.output[0] for n in wide_q}
    read = {n.output[0] for n in qdq.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in codes}
    return sum(1 for n in qdq.graph.node if n.op_type in LINEAR_OPS
               and (any(i in read for i in n.input) or any(o in written for o in n.output)))


def _wide_clause(wide: WideReaders) -> str:
    """What the 16-bit points cost in time and buy in fidelity, and the option that trades them."""
    if wide.ops == 0:
        return ""
    bought = (f" (output SQNR {wide.db_16:.1f} dB, against {wide.db_8:.1f} dB with 8-bit activations)"
              if wide.db_8 is not None and wide.db_16 is not None else "")
    return (f"; {wide.ops} of the rest read or write 16-bit activations, kept for fidelity{bought}, which "
            "onnxruntime's CPU runs as float ops (no 16-bit integer kernel): --act16-below 0 keeps every "
            "activation 8-bit, faster at that fidelity cost (report.wide_activations lists them)")


def latency_note(latency: Latency, weight_bits: Dict[str, int], fused: int, linear: int, target: str,
                 wide: Optional[WideReaders] = None) -> Optional[str]:
    """A warning when the quantized model runs slower than the float one, with its cause and what the
    target offers instead."""
    if latency.ratio <= SLOWER_THAN_FLOAT:
        return None
    head = (f"LATENCY: the quantized model runs at {latency.ratio:.2f}x its float model's latency on onnxruntime CPU "
            f"({latency.quantized_ms:.2f} vs {latency.float_ms:.2f} ms, {latency.threads} thread"
            f"{'' if latency.threads == 1 else 's'}, median of "
            f"{latency.runs})")
    narrow = sorted(b for b in set(weight_bits.values()) if b < 7)
    if target == "ort-cpu" and narrow:
        return (f"{head}: onnxruntime's CPU runs {'/'.join(map(str, narrow))}-bit weights as DequantizeLinear then a "
                "float op (no integer kernel), so they save memory, not time; --weight-bits 8 gives fused integer "
                "kernels, or deploy to a runtime with low-bit kernels (--target qnn, trt)")
    return (f"{head}: {fused} of {linear} Conv/MatMul/Gemm run as fused integer kernels; the rest (and every "
            "Q/DQ pair around a float op) add conversions" + _wide_clause(wide or WideReaders())
            + "; check report.validation.fused_op_types")


def report_latency(run: "RunContext", float_model: onnx.ModelProto, baseline: str, qdq: onnx.ModelProto,
                   calib: "CalibrationSet", weights: Dict[str, "WeightQuant"], validation: Validation) -> None:
    """onnxruntime CPU latency of one calibration batch (one sample, unless the model fixes its batch dim)
    through the float and the written model; ``baseline`` says which float model (report.latency's
    ``float_model``: "as read" or "prepared"). A measurement that fails is a warning, never the run's end."""
    feeds = next(iter(calib.batches(1, limit=1)), None) or next(iter(calib.batches()), None)
    try:
        if feeds is None:
            raise ValueError("no calibration batch to run")
        latency = measure_latency(float_model, qdq, feeds, config=session_config(qdq, run.target))
    except Exception as exc:  # noqa: BLE001 - informational: the validated model stands
        run.report.warn(f"latency not measured: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}")
        return
    run.report.latency = {**asdict(latency), "float_model": baseline}
    checked = run.report.wide_output_sqnr_db
    wide = WideReaders(sixteen_bit_linear_ops(qdq), checked.get("8-bit"), checked.get("16-bit"))
    note = latency_note(latency, {n: w.bits for n, w in weights.items()}, validation.fused_linear_ops,
                        validation.linear_ops, run.config.target, wide)
    if note:
        run.report.warn(note)
