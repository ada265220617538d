"""onnxruntime sessions for the float and quantized models, including models over 2 GB."""
from __future__ import annotations

import math
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from eptq_onnx.calib.data import CalibrationSet
from eptq_onnx.graph.model_io import model_path, serialized_size
from eptq_onnx.graph.tensor_store import store_of

PROTOBUF_LIMIT = 2**31 - 2**20  # leave room for the protobuf envelope
# Batches that return every intermediate tensor (calibration, validation) are cut so that one
# batch's returned tensors stay under this size: memory does not grow with the batch size.
TAPPED_BATCH_BYTES = 256 << 20


def with_outputs(model: onnx.ModelProto, tensors: Iterable[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also returns the given intermediate tensors."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    have = {o.name for o in out.graph.output}
    infos = {vi.name: vi for vi in out.graph.value_info}
    for name in tensors:
        if name not in have:
            out.graph.output.append(infos[name] if name in infos else onnx.ValueInfoProto(name=name))
            have.add(name)
    return out


def make_session(
    model: onnx.ModelProto,
    *,
    optimize: bool = True,
    config: Optional[Dict[str, str]] = None,
    optimized_path: Optional[str] = None,
) -> ort.InferenceSession:
    """A CPU session of ``model``; optimizations all on, or all off for a reference run.

    Store-backed models (tensor_store) are read from a file next to their store, their weights
    memory-mapped and not prepacked (a copy); other models too large for one protobuf go through
    a temporary file with external data.
    """
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # no arena: its buffers, sized for the largest batch of intermediates, would stay resident
    opts.enable_cpu_mem_arena = False
    # idle worker threads sleep instead of spinning: on a busy machine spinning workers stall each other
    # (about 30% of a detector's run time at load 15 on 2 cores); the ops run here are long enough not to miss it
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    for key, value in (config or {}).items():
        opts.add_session_config_entry(key, value)
    if optimized_path:
        opts.optimized_model_filepath = optimized_path
    if store_of(model) is not None:
        opts.add_session_config_entry("session.disable_prepacking", "1")
    return inference_session(model, opts)


def inference_session(model: onnx.ModelProto, opts: ort.SessionOptions) -> ort.InferenceSession:
    """A CPU session of ``model`` with ``opts``: from its bytes, or through a file when it is store-backed
    or too large for one protobuf."""
    providers = ["CPUExecutionProvider"]
    if store_of(model) is None and serialized_size(model) < PROTOBUF_LIMIT:
        return ort.InferenceSession(model.SerializeToString(), opts, providers=providers)
    with model_path(model) as path:
        return ort.InferenceSession(str(path), opts, providers=providers)


def run(session: ort.InferenceSession, feeds: Dict[str, np.ndarray], names: Optional[List[str]] = None) -> Dict[str, np.ndarray]:
    """Run a session and return its outputs by name."""
    names = names or [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def tapped_bytes_per_sample(session: ort.InferenceSession, calib: CalibrationSet) -> float:
    """Bytes of ``session``'s outputs per sample, measured on a run of the first calibration sample
    alone, so that dynamic dims (image sizes, sequence lengths) count at their real sizes (0: no sample)."""
    first = next(iter(calib.batches(1, limit=1)), None)
    if first is None:
        return 0.0
    outputs = session.run(None, first)
    per_sample = sum(np.asarray(v).nbytes for v in outputs) / max(calib.samples_in(first), 1)
    del outputs
    return float(per_sample)


def tapped_batch_size(session: ort.InferenceSession, calib: CalibrationSet, requested: int, copies: int = 1) -> int:
    """The batch size, at most ``requested``, at which a batch of ``session``'s outputs fits TAPPED_BATCH_BYTES
    (``tapped_bytes_per_sample``); ``copies``: how many such sets of outputs are alive at once. At least 1."""
    per_sample = copies * tapped_bytes_per_sample(session, calib)
    return max(1, min(requested, int(TAPPED_BATCH_BYTES // max(per_sample, 1))))


def float_outputs_of(model: onnx.ModelProto, batches: Sequence[Dict[str, np.ndarray]],
                     config: Optional[Dict[str, str]] = None) -> List[List[np.ndarray]]:
    """The floating-point outputs of ``model`` (onnxruntime, optimized, with session ``config``) on every batch."""
    session = make_session(model, config=config)
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)
    floating = [i for i, o in enumerate(model.graph.output) if o.type.tensor_type.elem_type in floats]
    return [[out[i] for i in floating] for out in (session.run(None, feeds) for feeds in batches)]


def output_sqnr_db(reference: List[List[np.ndarray]], approx: List[List[np.ndarray]]) -> float:
    """SQNR of all outputs together (``float_outputs_of`` lists): signal and noise summed over outputs and batches."""
    signal = noise = 0.0
    for ref_batch, approx_batch in zip(reference, approx):
        for r, a in zip(ref_batch, approx_batch):
            r64 = np.asarray(r, dtype=np.float64)
            signal += float(np.sum(r64 * r64))
            noise += float(np.sum((r64 - np.asarray(a, dtype=np.float64)) ** 2))
    if noise == 0:
        return math.inf
    return 10 * math.log10(max(signal, 1e-300) / noise)
