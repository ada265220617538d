"""Where two runs of a model part ways: the first tensor, in topological order, whose values differ.

Validation compares onnxruntime with and without graph optimizations, and the QDQ model with its
fake-quant reference. When they disagree, the cause is the first op whose output differs (every
tensor after it inherits the difference): this module accumulates per-tensor SQNR and finds it.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Optional, Tuple

import numpy as np
import onnx
import onnxruntime as ort

from eptq_onnx.calib.data import CalibrationSet
from eptq_onnx.graph.runtime import make_session, run, with_outputs
from eptq_onnx.graph.tensor_store import store_of, tensor_array
from eptq_onnx.ops.registry import ORT_LAYOUT_OPS

# The optimized-vs-unoptimized diagnosis reruns the model on this many samples, one at a time.
DIAGNOSIS_SAMPLES = 2
# Tensors larger than this are compared on an even sample of their elements (cost stays bounded).
COMPARED_ELEMENTS = 1 << 20


SUM_CHUNK = 1 << 16  # elements per piece of a sum of squares (a BLAS dot in the array's type)


def _sum_squares(x: np.ndarray) -> float:
    """sum(x**2) of a 1-D array: a dot product in its own type per piece of SUM_CHUNK elements, the
    pieces added in float64 (a float32 BLAS dot of 65536 squares is good to ~1e-6, and no float64
    copy is made: 80x faster than one on a feature map)."""
    total = 0.0
    for start in range(0, x.size, SUM_CHUNK):
        piece = x[start:start + SUM_CHUNK]
        total += float(np.dot(piece, piece))
    return total


@dataclass
class Accumulator:
    """Signal and noise energy, and the largest absolute difference, of a reference and an approximation."""

    signal: float = 0.0
    noise: float = 0.0
    max_abs: float = 0.0

    def add(self, ref: np.ndarray, approx: np.ndarray) -> None:
        """Add a batch: differences in the wider of the two types (at least float32), sums in float64."""
        ref, approx = np.asarray(ref), np.asarray(approx)
        dtype = np.result_type(ref.dtype, approx.dtype, np.float32)
        ref = ref.astype(dtype, copy=False).ravel()
        diff = ref - approx.astype(dtype, copy=False).ravel()
        self.signal += _sum_squares(ref)
        self.noise += _sum_squares(diff)
        if diff.size:
            largest = float(np.abs(diff).max())
            # a NaN difference sticks (Python's max would drop it, hiding a NaN output)
            self.max_abs = float("nan") if np.isnan(largest) or np.isnan(self.max_abs) else max(self.max_abs, largest)

    @property
    def sqnr(self) -> float:
        if self.noise == 0:
            return float("inf")
        return float("-inf") if self.signal == 0 else 10.0 * float(np.log10(self.signal / self.noise))


@dataclass
class FirstDifference:
    """The first tensor where two runs differ, and the op that computed it."""

    tensor: str
    op_type: str  # the producing op in the model as written ("input" for a graph input)
    node: str
    sqnr_db: float
    max_abs_difference: float
    optimized_op: str = ""  # the op of onnxruntime's optimized graph that computes it, where known
    # the lowest SQNR among the nearest compared tensors it is computed from (inf: from graph inputs
    # only): high where this op itself computes differently, low where it inherits a difference
    input_sqnr_db: float = float("inf")

    def made_by(self) -> str:
        """The op that computes the tensor, in the model as written and in onnxruntime's optimized graph."""
        fused = f", computed by {self.optimized_op} in onnxruntime's optimized graph" if self.optimized_op else ""
        return f"output of {self.op_type} node {self.node!r}{fused}"

    def describe(self) -> str:
        return (f"tensor {self.tensor!r} ({self.made_by()}; SQNR {self.sqnr_db:.1f} dB, "
                f"max abs difference {self.max_abs_difference:.4g})")


def producers(model: onnx.ModelProto) -> Dict[str, Tuple[str, str]]:
    """tensor -> (op type, node name) of the node computing it (node name: its first output if unnamed)."""
    out = {i.name: ("input", i.name) for i in model.graph.input}
    for node in model.graph.node:
        for o in node.output:
            out[o] = (node.op_type, node.name or node.output[0])
    return out


def first_below(accumulators: Mapping[str, Accumulator], order: Iterable[str], threshold: float,
                made_by: Mapping[str, Tuple[str, str]]) -> Optional[FirstDifference]:
    """The first tensor of ``order`` whose SQNR is below ``threshold`` dB (or not finite); None if none is."""
    for name in order:
        acc = accumulators.get(name)
        if acc is not None and (acc.sqnr < threshold or not np.isfinite(acc.max_abs)):
            op_type, node = made_by.get(name, ("?", name))
            return FirstDifference(name, op_type, node, acc.sqnr, acc.max_abs)
    return None


def sampled(array: np.ndarray) -> np.ndarray:
    """The array flattened, or an even stride of its elements when it has more than COMPARED_ELEMENTS."""
    flat = np.asarray(array).reshape(-1)
    step = -(-flat.size // COMPARED_ELEMENTS)
    return flat[::step] if step > 1 else flat


def optimized_session(model: onnx.ModelProto, config: Dict[str, str]) -> Tuple[ort.InferenceSession, onnx.ModelProto]:
    """An onnxruntime session with every graph optimization, and its optimized graph (weights not loaded)."""
    if store_of(model) is not None:  # the optimized copy's weights go to a file, not into memory
        config = {**config, "session.optimized_model_external_initializers_file_name": "optimized.onnx.data"}
    with tempfile.TemporaryDirectory(prefix="eptq-opt-") as tmp:
        path = os.path.join(tmp, "optimized.onnx")
        session = make_session(model, optimize=True, config=config, optimized_path=path)
        optimized = onnx.load(path, load_external_data=False)
    return session, optimized


def _computing_node(graph_model: onnx.ModelProto, tensor: str) -> Optional[onnx.NodeProto]:
    """The node of ``graph_model`` that computes ``tensor``, looking through layout conversions and a
    QuantizeLinear left unfused (to the op whose output it quantizes)."""
    made_by = {o: node for node in graph_model.graph.node for o in node.output}
    node = made_by.get(tensor)
    while node is not None and node.op_type in ORT_LAYOUT_OPS | {"QuantizeLinear"} and node.input and node.input[0] in made_by:
        node = made_by[node.input[0]]  # an unfused QuantizeLinear: the op whose output it quantizes
    return node


def compared_inputs(model: onnx.ModelProto, tensor: str, compared: Mapping[str, Accumulator]) -> List[str]:
    """The nearest compared tensors upstream of ``tensor`` (through every op that is not compared itself)."""
    made_by = {o: node for node in model.graph.node for o in node.output}
    found, stack, seen = [], list(made_by[tensor].input) if tensor in made_by else [], set()
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in compared:
            found.append(name)
        elif name in made_by:
            stack.extend(made_by[name].input)
    return found


def input_agreement(model: onnx.ModelProto, tensor: str, accumulators: Mapping[str, Accumulator]) -> float:
    """The lowest SQNR of the compared tensors ``tensor`` is computed from (inf where there are none)."""
    return min((accumulators[t].sqnr for t in compared_inputs(model, tensor, accumulators)), default=float("inf"))


def _dequantizers(model: onnx.ModelProto) -> Dict[str, Tuple[float, float]]:
    """QuantizeLinear output -> (scale, zero point) for those whose scale and zero point are scalar initializers."""
    inits = {t.name: t for t in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[1] not in inits:
            continue
        scale = tensor_array(inits[node.input[1]])
        zp = tensor_array(inits[node.input[2]]) if len(node.input) > 2 and node.input[2] in inits else np.zeros(1)
        if scale.size == 1 and zp.size == 1:
            out[node.output[0]] = (float(scale.reshape(-1)[0]), float(zp.reshape(-1)[0]))
    return out


def diagnose_optimization(qdq_model: onnx.ModelProto, calib: CalibrationSet, threshold: float,
                          config: Dict[str, str]) -> Optional[FirstDifference]:
    """The first quantized tensor (or output) where onnxruntime's optimized and unoptimized runs differ.

    Taps the QuantizeLinear outputs (integer codes, which the fused QLinear ops produce too, so
    tapping them leaves the fusions as they are) and the graph outputs, on DIAGNOSIS_SAMPLES
    samples, and compares them dequantized, in graph order.
    """
    codes = _dequantizers(qdq_model)
    outputs = [o.name for o in qdq_model.graph.output]
    order: List[str] = [n.output[0] for n in qdq_model.graph.node if n.output[0] in codes] + outputs
    tapped = with_outputs(qdq_model, order)
    opt_sess, optimized = optimized_session(tapped, config)
    plain_sess = make_session(tapped, optimize=False, config=config)
    accumulators: Dict[str, Accumulator] = {name: Accumulator() for name in order}
    for feeds in calib.batches(1, limit=DIAGNOSIS_SAMPLES):
        o, p = run(opt_sess, feeds, order), run(plain_sess, feeds, order)
        for name in order:
            scale, zp = codes.get(name, (1.0, 0.0))
            accumulators[name].add((sampled(p[name]).astype(np.float64) - zp) * scale,
                                   (sampled(o[name]).astype(np.float64) - zp) * scale)
        del o, p
    found = first_below(accumulators, order, threshold, producers(qdq_model))
    if found is None:
        return None
    found.input_sqnr_db = input_agreement(qdq_model, found.tensor, accumulators)
    fused = _computing_node(optimized, found.tensor)
    if fused is not None:
        found.optimized_op = f"{fused.op_type} node {fused.name!r}"
    quantize = {n.output[0]: n for n in qdq_model.graph.node if n.op_type == "QuantizeLinear"}
    if found.tensor in quantize:  # name the tensor that was quantized and its op, not the QuantizeLinear
        found.tensor = quantize[found.tensor].input[0]
        found.op_type, found.node = producers(qdq_model).get(found.tensor, (found.op_type, found.node))
    return found
