"""Position axes of a model's tensors: the axes along which one layer's weights are applied.

A layer's weights act the same way at every position of its output (a Conv's at every pixel,
a MatMul's on every row), so its rounding errors are correlated along those axes, and each
channel's error does not average away where the network pools over positions. The
channel-correlated Label-Free Hessian (``hessian.label_free_hessian(position_axes=...)``)
sums the Hutchinson gradient over these axes before squaring.

The axes come from the op that made each tensor, following the ONNX operator definitions,
not from the tensor's rank: Conv, pooling and the normalizations of the Conv family are
channels-first (positions: the spatial axes 2..), MatMul and Gemm apply their weights to
every row (positions: the axes between the batch axis and the last); element-wise and other
rank-preserving ops pass their input's axes on; Transpose permutes them; Reshape, Flatten,
Squeeze and Unsqueeze keep them where the leading axes up to the last position keep their
sizes; Reduce ops drop the reduced axes. Axis 0 (the batch) is never a position, and axes of
size 1 are dropped. Where no rule applies the axes are unknown (None).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Set, Tuple, Union

import onnx

from eptq_onnx.ops.registry import int_attr
from eptq_onnx.graph.tensor_store import tensor_array
from eptq_onnx.ops.registry import LAYOUT_CHANNELS_FIRST
from eptq_onnx.ops.registry import LAYOUT_ROW_WISE
from eptq_onnx.ops.registry import LAYOUT_RESHAPING
from eptq_onnx.ops.registry import LAYOUT_REDUCING
from eptq_onnx.ops.registry import LAYOUT_OPAQUE

Dim = Union[int, str, None]
Axes = Optional[Tuple[int, ...]]  # None: unknown


@dataclass
class Layout:
    """Position axes of the asked tensors, and which of them could not be told."""

    axes: Dict[str, Tuple[int, ...]]  # () where there is no position axis or it is unknown
    unknown: List[str]  # made from a weighted layer's output, but no rule tells their axes


def position_axes(model: onnx.ModelProto, names: Iterable[str]) -> Layout:
    """The position axes of each tensor in ``names``.

    Tensors that no Conv/MatMul/Gemm-like layer feeds (model inputs and what is computed from them
    alone) carry no weight error, only independent activation rounding: they get no position axis
    and are not counted as unknown. ``model`` must carry inferred shapes (``normalize.normalize_model``
    does that); nodes are read in the graph's (topological) order.
    """
    graph = model.graph
    shapes = _shapes(graph)
    constants = _Constants(graph)
    axes: Dict[str, Axes] = {}
    fed: Set[str] = set()  # tensors computed from some weighted layer's output
    for node in graph.node:
        if not node.output or not node.output[0]:
            continue
        first = _node_axes(node, axes, shapes, constants)
        from_layer = node.op_type in LAYOUT_CHANNELS_FIRST or node.op_type in LAYOUT_ROW_WISE or any(i in fed for i in node.input)
        for name in node.output:
            if name:
                found = first if name == node.output[0] else _passed_on(node, name, axes, shapes)
                axes[name] = _without_units(found, shapes.get(name))
                if from_layer:
                    fed.add(name)
    names = list(names)
    return Layout({n: axes.get(n) or () for n in names}, [n for n in names if n in fed and axes.get(n) is None])


def _node_axes(node: onnx.NodeProto, axes: Dict[str, Axes], shapes: Dict[str, List[Dim]], constants: _Constants) -> Axes:
    """The first output's position axes under the rule for ``node.op_type``."""
    op, out_shape = node.op_type, shapes.get(node.output[0])
    rank = len(out_shape) if out_shape is not None else None
    if op in LAYOUT_OPAQUE or rank is None:
        return None
    if op in LAYOUT_CHANNELS_FIRST:
        return tuple(range(2, rank))
    if op in LAYOUT_ROW_WISE:
        if len(node.input) > 1 and node.input[1] in constants.weights:
            return tuple(range(1, rank - 1))  # one weight matrix for every row of every leading axis
        return (rank - 2,) if rank > 2 else ()  # per-matrix products (attention): each head its own
    first = node.input[0] if node.input else ""
    if op == "Transpose":
        return _transposed(axes.get(first), _int_list(node, "perm"), rank)
    if op in LAYOUT_RESHAPING:
        return _reshaped(axes.get(first), shapes.get(first), out_shape)
    if op in LAYOUT_REDUCING:
        return _reduced(node, axes.get(first), shapes.get(first), constants)
    return _passed_on(node, node.output[0], axes, shapes)


def _passed_on(node: onnx.NodeProto, out: str, axes: Dict[str, Axes], shapes: Dict[str, List[Dim]]) -> Axes:
    """Rank-preserving ops: the axes common to every input of the output's rank whose axes are known
    (a sum of errors is correlated along an axis only where each of its terms is)."""
    out_shape = shapes.get(out)
    if out_shape is None or node.op_type in LAYOUT_OPAQUE:
        return None
    known = [axes[name] for name in node.input
             if name and axes.get(name) is not None and len(shapes.get(name) or ()) == len(out_shape)]
    if not known:
        return None
    return tuple(a for a in known[0] if all(a in other for other in known[1:]))


def _transposed(before: Axes, perm: Optional[List[int]], rank: int) -> Axes:
    if before is None:
        return None
    perm = perm if perm is not None else list(reversed(range(rank)))
    if perm[0] != 0:
        return None  # the batch axis moved: positions can no longer be told from it
    return tuple(j for j, p in enumerate(perm) if p in before)


def _reshaped(before: Axes, in_shape: Optional[List[Dim]], out_shape: List[Dim]) -> Axes:
    """Kept where every axis up to the last position keeps its size (the batch axis may be symbolic)."""
    if before is None or in_shape is None:
        return None
    if not before:
        return ()
    last = max(before)
    if len(out_shape) <= last or not _same_batch(in_shape[0], out_shape[0]):
        return None
    for a in range(1, last + 1):
        if in_shape[a] is None or in_shape[a] != out_shape[a]:
            return None
    return before


def _reduced(node: onnx.NodeProto, before: Axes, in_shape: Optional[List[Dim]], constants: _Constants) -> Axes:
    if before is None or in_shape is None:
        return None
    rank = len(in_shape)
    listed = _int_list(node, "axes")
    if listed is None and len(node.input) > 1 and node.input[1]:
        listed = constants.ints.get(node.input[1])
        if listed is None:
            return None  # axes computed at run time
    if not listed:
        if int_attr(node, "noop_with_empty_axes", 0):
            return before
        listed = list(range(rank))
    reduced = {a % rank for a in listed}
    kept = [a for a in before if a not in reduced]
    if int_attr(node, "keepdims", 1):
        return tuple(kept)
    return tuple(a - sum(1 for r in reduced if r < a) for a in kept)


def _without_units(found: Axes, shape: Optional[List[Dim]]) -> Axes:
    """Drop axes of size 1 (summing over them changes nothing) and the batch axis."""
    if found is None:
        return None
    return tuple(a for a in found if a > 0 and not (shape is not None and a < len(shape) and shape[a] == 1))


def _same_batch(a: Dim, b: Dim) -> bool:
    return not (isinstance(a, int) and isinstance(b, int) and a != b)


def _shapes(graph: onnx.GraphProto) -> Dict[str, List[Dim]]:
    shapes: Dict[str, List[Dim]] = {}
    for info in [*graph.input, *graph.value_info, *graph.output]:
        tensor = info.type.tensor_type
        if info.type.HasField("tensor_type") and tensor.HasField("shape"):
            shapes[info.name] = [_dim(d) for d in tensor.shape.dim]
    for init in graph.initializer:
        shapes[init.name] = list(init.dims)
    return shapes


def _dim(d: onnx.TensorShapeProto.Dimension) -> Dim:
    if d.HasField("dim_value"):
        return int(d.dim_value)
    return d.dim_param or None


class _Constants:
    """The graph's constant tensors (initializers, Constant nodes) and the values of small integer ones."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        tensors = [(t.name, t) for t in graph.initializer]
        tensors += [(n.output[0], a.t) for n in graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
        self.weights: Set[str] = {name for name, _ in tensors}
        self.ints: Dict[str, List[int]] = {
            name: [int(v) for v in tensor_array(t).reshape(-1)]
            for name, t in tensors
            if t.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32) and len(t.dims) <= 1
        }


def _int_list(node: onnx.NodeProto, name: str) -> Optional[List[int]]:
    for attr in node.attribute:
        if attr.name == name:
            return list(attr.ints)
    return None
