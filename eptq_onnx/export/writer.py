"""Write a QDQ model: the float graph plus DequantizeLinear on weights and Q/DQ pairs on activations.

Weights become integer initializers (INT8, INT4 at opset 21, INT2 at opset 25, or all in INT8
containers) read by a per-axis DequantizeLinear; biases of Conv/ConvTranspose/Gemm whose input
is quantized become int32 with scale = input scale x weight scale (onnxruntime's convention).
Every tensor of an activation group gets QuantizeLinear -> DequantizeLinear and its readers read
the DequantizeLinear output. Every other node, and every tensor name, is kept.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set, Tuple

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from eptq_onnx.init.quantizers import ActParams
from eptq_onnx.plan.exclusions import node_id
from eptq_onnx.plan.qpoints import QuantPlan
from eptq_onnx.plan.targets import TARGETS, Target
from eptq_onnx.graph.index import unique_name
from eptq_onnx.graph.tensor_store import store_of, tensor_array
from eptq_onnx.init.weights import WeightQuant

INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class StorageType:
    """An integer tensor type for stored weights and the opset that introduced it."""

    onnx_type: int
    numpy_type: type
    bits: int
    min_opset: int


STORAGE = {
    2: StorageType(TensorProto.INT2, ml_dtypes.int2, 2, 25),
    4: StorageType(TensorProto.INT4, ml_dtypes.int4, 4, 21),
    8: StorageType(TensorProto.INT8, np.int8, 8, 13),
}
ACT_TYPES = {
    (8, False): (TensorProto.UINT8, np.uint8, 13),
    (8, True): (TensorProto.INT8, np.int8, 13),
    (16, False): (TensorProto.UINT16, np.uint16, 21),
    (16, True): (TensorProto.INT16, np.int16, 21),
}


def weight_readers(plan: QuantPlan) -> Set[Tuple[str, str]]:
    """(node, weight) of every quantized weight's reader in ``plan``: another node reading the same
    initializer (one the user keeps float) reads it float."""
    return {(p.node, p.weight) for p in plan.weights}


def storage_for(bits: int, weight_storage: str, allowed: Tuple[int, ...] = tuple(STORAGE)) -> StorageType:
    """The narrowest native type (of the ``allowed`` widths) that holds ``bits``-bit codes (INT8
    with ``weight_storage='int8'``)."""
    if weight_storage == "int8":
        return STORAGE[8]
    return next(STORAGE[b] for b in sorted(allowed) if b >= bits)


def required_opset(weight_bits: List[int], act_bits: int, weight_storage: str, target: Target = TARGETS["ort-cpu"]) -> int:
    """The lowest default-domain opset that can hold these weight and activation types."""
    opset = max([storage_for(b, weight_storage, target.weight_bits).min_opset for b in weight_bits] or [13])
    return max(opset, ACT_TYPES[(act_bits, False)][2])


@dataclass
class WriteSummary:
    """What the writer did that the report should show."""

    float_biases: List[str] = field(default_factory=list)  # biases kept float (input not quantized)
    clipped_biases: List[str] = field(default_factory=list)  # biases saturated to int32
    storage: Dict[str, str] = field(default_factory=dict)  # weight -> storage type name


class _Builder:
    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.initializers: List[TensorProto] = []
        self.names = {n.name for n in model.graph.node}
        # every tensor name the model has: a new constant never takes one (a user's "h_scale" next to "h")
        self.tensors = ({t.name for t in model.graph.initializer} | {i.name for i in model.graph.input}
                        | {o for n in model.graph.node for o in n.output})
        self.store = store_of(model)  # new large constants of a store-backed model go there

    def node_name(self, base: str) -> str:
        return unique_name(base, self.names)

    def constant(self, name: str, array: np.ndarray) -> str:
        """A new initializer named ``name`` (with a numeric suffix if the model has that name); returns its name."""
        name = unique_name(name, self.tensors)
        self.initializers.append(numpy_helper.from_array(array, name))
        if self.store is not None:
            self.store.keep(self.initializers[-1])
        return name

    def dequantize(self, tensor: str, codes: str, scale: str, zero_point: str, axis: Optional[int]) -> onnx.NodeProto:
        out = f"{tensor}_DequantizeLinear_Output"
        kwargs = {"axis": axis} if axis is not None else {}
        return helper.make_node(
            "DequantizeLinear", [codes, scale, zero_point], [out], name=self.node_name(f"{tensor}_DequantizeLinear"), **kwargs
        )


def write_qdq(
    model: onnx.ModelProto,
    plan: QuantPlan,
    weights: Dict[str, WeightQuant],
    acts: Dict[int, ActParams],
    *,
    weight_storage: str = "native",
    quantize_outputs: bool = False,
    quantize_bias: bool = True,
    target: Target = TARGETS["ort-cpu"],
) -> Tuple[onnx.ModelProto, WriteSummary]:
    """The QDQ model for a float model whose opset already allows the storage types used.

    ``target`` picks each weight's storage type (by its op) and per-tensor scales where it
    takes no per-channel weights."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    b = _Builder(out)
    summary = WriteSummary()
    outputs = {o.name for o in graph.output}

    op_of = {p.weight: p.op_type for p in plan.weights}
    per_tensor = {name for name in weights if not target.per_channel(op_of[name])}
    weight_nodes: Dict[str, onnx.NodeProto] = {}
    for name, wq in weights.items():
        storage = STORAGE[target.storage_bits(wq.bits, op_of[name], weight_storage)]
        summary.storage[name] = onnx.helper.tensor_dtype_to_string(storage.onnx_type).replace("TensorProto.", "")
        scale = _per_tensor(wq.scale, name) if name in per_tensor else wq.scale.astype(np.float32)
        codes = b.constant(f"{name}_quantized", wq.codes.astype(storage.numpy_type))
        steps = b.constant(f"{name}_scale", scale)
        zero = b.constant(f"{name}_zero_point", np.zeros(scale.shape, dtype=storage.numpy_type))
        axis = None if name in per_tensor else wq.axis
        weight_nodes[name] = b.dequantize(name, codes, steps, zero, axis)

    bias_nodes, bias_inputs = (
        _bias_nodes(b, model, plan, weights, acts, summary, per_tensor) if quantize_bias else ({}, {})
    )

    act_pairs: Dict[str, List[onnx.NodeProto]] = {}
    rename: Dict[str, str] = {}  # tensor -> the DequantizeLinear output its readers use
    producer_rename: Dict[str, str] = {}  # graph outputs that get quantized: producer writes here
    for g in plan.groups:
        p = acts[g.id]
        act_type, act_np, _ = ACT_TYPES[(p.bits, p.signed)]
        root = g.roots[0]
        scale = b.constant(f"{root}_scale", np.array(p.scale, dtype=np.float32))
        zero = b.constant(f"{root}_zero_point", np.array(p.zero_point, dtype=act_np))
        for t in g.tensors:
            source = t
            if t in outputs and quantize_outputs:
                source = f"{t}_float"
                producer_rename[t] = source
            q_out = f"{t}_QuantizeLinear_Output"
            q = helper.make_node("QuantizeLinear", [source, scale, zero], [q_out], name=b.node_name(f"{t}_QuantizeLinear"))
            dq = b.dequantize(t, q_out, scale, zero, None)
            if t in producer_rename:
                dq.output[0] = t
            else:
                rename[t] = dq.output[0]
            act_pairs[t] = [q, dq]

    before: Dict[str, List[onnx.NodeProto]] = {}
    readers = weight_readers(plan)
    for node in graph.node:
        node_key = node_id(node)
        for i, inp in enumerate(node.input):
            if inp in weight_nodes and (node_key, inp) in readers:  # a node kept float reads the float weight
                node.input[i] = weight_nodes[inp].output[0]
            elif (node_key, i) in bias_inputs:
                bias_node = bias_nodes[bias_inputs[(node_key, i)]]
                before.setdefault(node_key, []).append(bias_node)
                node.input[i] = bias_node.output[0]
    # graph outputs that are also quantized for their readers stay float themselves
    rewire(graph, after=act_pairs, rename=rename, producer_rename=producer_rename,
           leading=list(weight_nodes.values()), before=before)
    used = {i for n in graph.node for i in n.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept + b.initializers)
    return out, summary


def rewire(
    graph: onnx.GraphProto,
    *,
    after: Dict[str, List[onnx.NodeProto]],
    rename: Dict[str, str],
    producer_rename: Dict[str, str],
    leading: Optional[List[onnx.NodeProto]] = None,
    before: Optional[Dict[str, List[onnx.NodeProto]]] = None,
) -> None:
    """Insert nodes after tensors and reroute their readers, keeping a topological order.

    The nodes ``after[t]`` follow the producer of t (graph inputs' come first, then ``leading``);
    every node reads ``rename[x]`` instead of x and writes ``producer_rename[y]`` instead of y
    (value_info follows); ``before[node name]`` nodes come right before that node.
    """
    nodes = [n for name in (i.name for i in graph.input) for n in after.get(name, [])] + list(leading or [])
    for node in graph.node:
        nodes.extend((before or {}).get(node.name or node.output[0], []))
        for i, inp in enumerate(node.input):
            if inp in rename:
                node.input[i] = rename[inp]
        produced = list(node.output)
        for i, o in enumerate(produced):
            if o in producer_rename:
                node.output[i] = producer_rename[o]
        nodes.append(node)
        for o in produced:
            nodes.extend(after.get(o, []))
    del graph.node[:]
    graph.node.extend(nodes)
    for vi in graph.value_info:
        if vi.name in producer_rename:
            vi.name = producer_rename[vi.name]


@dataclass
class BiasQuant:
    """A bias of a weighted op stored as int32 codes with scale = input scale x weight scale."""

    node: str
    bias: str
    codes: np.ndarray  # int32
    scale: np.ndarray  # float32, per output channel
    clipped: bool  # saturated to the int32 range
    tensor_wide: bool = False  # one step for the whole bias, as for its per-tensor weight

    def dequantized(self) -> np.ndarray:
        return (self.codes.astype(np.float32) * self.scale).astype(np.float32)


def _per_tensor(scale: np.ndarray, name: str) -> np.ndarray:
    """The one step of a per-tensor weight (its per-channel steps must all be equal)."""
    if not np.all(scale == scale.flat[0]):
        raise ValueError(f"weight {name} must be per-tensor but has different steps per channel")
    return np.asarray(scale.flat[0], dtype=np.float32)


def quantize_biases(
    model: onnx.ModelProto, plan: QuantPlan, weights: Dict[str, WeightQuant], acts: Dict[int, ActParams],
    per_tensor: frozenset = frozenset(),
) -> Tuple[List[BiasQuant], List[str]]:
    """int32 biases for weighted ops with a quantized input, and the biases that stay float.

    Biases of the weights in ``per_tensor`` get one step (the target stores their weights per tensor)."""
    initializers = {t.name: t for t in model.graph.initializer}
    group_of = plan.group_of()
    quantized: List[BiasQuant] = []
    left_float: List[str] = []
    for point in plan.weights:
        if point.bias is None:
            continue
        group = group_of.get(point.input) if point.input else None
        if group is None or point.weight not in weights:
            left_float.append(point.bias)
            continue
        bias = tensor_array(initializers[point.bias]).astype(np.float32)
        scale = (np.float32(acts[group.id].scale) * weights[point.weight].scale).astype(np.float32)
        if scale.shape != bias.shape:
            left_float.append(point.bias)
            continue
        codes = np.rint(bias / scale).astype(np.float64)  # float32 division, as the torch twin does
        clipped = bool(np.abs(codes).max(initial=0) > INT32_MAX)
        codes = np.clip(codes, -INT32_MAX, INT32_MAX).astype(np.int32)
        quantized.append(BiasQuant(point.node, point.bias, codes, scale, clipped, point.weight in per_tensor))
    return quantized, left_float


def _bias_nodes(b, model, plan, weights, acts, summary, per_tensor=frozenset()):
    """DequantizeLinear nodes of the int32 biases (see ``quantize_biases``) and the inputs they feed."""
    nodes_by_name = {(n.name or n.output[0]): n for n in model.graph.node}
    bias_nodes: Dict[str, onnx.NodeProto] = {}
    bias_inputs: Dict[Tuple[str, int], str] = {}
    quantized, left_float = quantize_biases(model, plan, weights, acts, frozenset(per_tensor))
    summary.float_biases.extend(left_float)
    for bq in quantized:
        if bq.clipped:
            summary.clipped_biases.append(bq.bias)
        key = f"{bq.bias}__{bq.node}"
        scale = _per_tensor(bq.scale, bq.bias) if bq.tensor_wide else bq.scale
        codes = b.constant(f"{key}_quantized", bq.codes)
        steps = b.constant(f"{key}_scale", scale)
        zero = b.constant(f"{key}_zero_point", np.zeros(scale.shape, dtype=np.int32))
        bias_nodes[key] = b.dequantize(key, codes, steps, zero, None if bq.tensor_wide else 0)
        index = list(nodes_by_name[bq.node].input).index(bq.bias)
        bias_inputs[(bq.node, index)] = key
    return bias_nodes, bias_inputs
