"""onnxruntime sessions for the float and quantized models, including models over 2 GB."""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional

import numpy as np
import onnx
import onnxruntime as ort

from .model_io import model_path, serialized_size
from .tensor_store import store_of

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
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    for key, value in (config or {}).items():
        opts.add_session_config_entry(key, value)
    if optimized_path:
        opts.optimized_model_filepath = optimized_path
    providers = ["CPUExecutionProvider"]
    stored = store_of(model) is not None
    if not stored and serialized_size(model) < PROTOBUF_LIMIT:
        return ort.InferenceSession(model.SerializeToString(), opts, providers=providers)
    if stored:
        opts.add_session_config_entry("session.disable_prepacking", "1")
    with model_path(model) as path:
        return ort.InferenceSession(str(path), opts, providers=providers)


def run(session: ort.InferenceSession, feeds: Dict[str, np.ndarray], names: Optional[List[str]] = None) -> Dict[str, np.ndarray]:
    """Run a session and return its outputs by name."""
    names = names or [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def tapped_batch_size(model: onnx.ModelProto, tensors: Iterable[str], requested: int) -> int:
    """The batch size, at most ``requested``, at which ``tensors`` of one batch fit TAPPED_BATCH_BYTES.

    Sizes per sample come from the model's value_info (dims after the batch dim; unknown dims
    count as 1). At least 1.
    """
    infos = {vi.name: vi for vi in [*model.graph.input, *model.graph.value_info, *model.graph.output]}
    per_sample = 0
    for name in tensors:
        vi = infos.get(name)
        if vi is None or not vi.type.HasField("tensor_type"):
            continue
        dims = [d.dim_value if d.dim_value > 0 else 1 for d in vi.type.tensor_type.shape.dim[1:]]
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type or 1)).itemsize
        per_sample += int(np.prod(dims, dtype=np.int64)) * itemsize
    return max(1, min(requested, TAPPED_BATCH_BYTES // max(per_sample, 1)))
