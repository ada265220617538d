"""Depthwise input equalization: a per-channel rescaling, exact in float, of what a depthwise Conv reads.

A depthwise Conv (one filter per channel) often reads an activation whose channels span ranges
100x apart (MobileNet/PP-LCNet blocks: Conv -> HardSwish -> depthwise Conv). One per-tensor
8-bit grid over all of them rounds the narrow channels to a few codes. With
s_c = max|x_c| / max over channels (floored at MIN_SCALE), the activation writes x_c / s_c and
the depthwise filter of channel c is multiplied by s_c: the Conv's output is unchanged, and the
quantization point on its input holds channels of one range (cross-layer equalization, Nagel
et al. 2019, moved to where the point is).

Where the activation takes the factor 1/s:

- ``relu``: Relu/LeakyRelu (positively homogeneous) after a Conv read only by it: the Conv's
  output channels are divided by s; no new node.
- ``composite``: an activation spelled as elementwise ops (HardSwish as x * clip(x + 3, 0, 6), then
  / 6; SiLU, ...) whose exit is a Mul or Div of two activations: a Mul by 1/s goes on its first
  factor, inside the composite (a constant per-channel divisor after the exit would stop the
  point from moving past it: composites.UNEVEN_SCALE_RATIO).
- ``hardswish``: a HardSwish op, written as (y / s) * HardSigmoid(y): a composite of the above.

The point before a ``composite``/``hardswish`` activation (a fusing target's pre-activation
point, one grid over the unequalized channels) costs more than the equalization gains: the
blocks name their layer, whose output point then moves past the activation (``Block.layer``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnx
from onnx import helper, numpy_helper

from eptq_onnx.graph.index import GraphIndex, drop_unread_initializers, unique_name
from eptq_onnx.graph.tensor_store import tensor_array
from eptq_onnx.graph.toposort import toposort_graph
from eptq_onnx.ops.registry import int_attr
from eptq_onnx.plan.composites import composites
from eptq_onnx.plan.qpoints import node_roles

MIN_SCALE = 1.0 / 64  # the narrowest channel keeps 1/64 of the widest one's range (6 bits of its codes)
EQUALIZE_BELOW = 0.5  # a block is rescaled when its narrowest channel spans less than this of the widest
HOMOGENEOUS = frozenset(("Relu", "LeakyRelu"))  # f(x / s) = f(x) / s for s > 0


@dataclass(frozen=True)
class Block:
    """A depthwise Conv, the activation tensor it reads, how that tensor takes a per-channel factor,
    and the weighted layer before the activation (None: none, or it keeps its output point)."""

    conv: str
    tensor: str
    kind: str  # "relu" | "composite" | "hardswish"
    layer: Optional[str] = None
    exit: Optional[str] = None  # the composite's exit that takes the factor (its output is ``tensor``, or feeds it)


def _name(node: onnx.NodeProto) -> str:
    return node.name or node.output[0]


def _constant_conv(index: GraphIndex, node: Optional[onnx.NodeProto]) -> bool:
    """A Conv whose weight is a constant."""
    return node is not None and node.op_type == "Conv" and len(node.input) >= 2 and node.input[1] in index.constants


def _depthwise(index: GraphIndex, node: onnx.NodeProto) -> bool:
    """A Conv with a constant [C, 1, k...] weight and group C that reads an activation."""
    if not _constant_conv(index, node):
        return False
    dims = list(index.constants[node.input[1]].dims)
    return len(dims) >= 3 and dims[1] == 1 and int_attr(node, "group", 1) == dims[0] > 1 \
        and index.is_activation(node.input[0])


def _read_by_one(index: GraphIndex, tensor: str) -> bool:
    """Whether one node reads ``tensor`` and it is no model output."""
    return len(index.consumers.get(tensor, [])) == 1 and tensor not in index.outputs


def _layer_before(index: GraphIndex, tensor: str) -> Optional[str]:
    """The name of the Conv with constant weights that writes ``tensor`` (None when another node does)."""
    node = index.producer.get(tensor)
    return _name(node) if _constant_conv(index, node) else None  # type: ignore[arg-type]


def _composite_exit(index: GraphIndex, act: onnx.NodeProto, exits: Dict[str, str]) -> Optional[str]:
    """The exit of the composite that writes ``act``'s output, directly or through a Mul/Div by a constant that
    reads it alone; None when there is none, or its output cannot be scaled from one of its factors."""
    exit_name = act.output[0]
    if exit_name not in exits and act.op_type in ("Mul", "Div") and len(index.act_inputs(act)) == 1:
        inner = index.act_inputs(act)[0]
        if act.op_type == "Div" and act.input[0] != inner:
            return None
        if not _read_by_one(index, inner):
            return None
        exit_name = inner
    node = index.producer.get(exit_name)
    if exit_name not in exits or node is None:
        return None
    return exit_name if node.op_type == "Mul" or (node.op_type == "Div" and index.is_activation(node.input[0])) \
        else None


def find_blocks(model: onnx.ModelProto) -> List[Block]:
    """The depthwise Convs whose input is an activation read by them alone that can take a per-channel factor."""
    index = GraphIndex(model.graph)
    exits, _ = composites(index, node_roles(index)[0])
    blocks: List[Block] = []
    for node in index.nodes:
        if not _depthwise(index, node) or not _read_by_one(index, node.input[0]):
            continue
        x = node.input[0]
        act = index.producer.get(x)
        if act is None:
            continue
        if act.op_type in HOMOGENEOUS:
            layer = _layer_before(index, act.input[0])
            if layer is not None and _read_by_one(index, act.input[0]):
                blocks.append(Block(_name(node), x, "relu", layer))
            continue
        if act.op_type == "HardSwish":
            exit_name, root = x, act.input[0]
        else:
            exit_name = _composite_exit(index, act, exits)
            if exit_name is None:
                continue
            root = exits[exit_name]
        kind = "hardswish" if act.op_type == "HardSwish" else "composite"
        blocks.append(Block(_name(node), x, kind, _layer_before(index, root), exit_name))
    return blocks


def channel_scales(ranges: np.ndarray) -> Optional[np.ndarray]:
    """The factors s (float32) of per-channel max|x| ``ranges``; None when no channel is narrow enough
    (EQUALIZE_BELOW) or the ranges are not finite and positive."""
    ranges = np.asarray(ranges, dtype=np.float64)
    top = float(ranges.max()) if ranges.size else 0.0
    if not np.isfinite(top) or top <= 0 or not np.all(np.isfinite(ranges)):
        return None
    scales = np.clip(ranges / top, MIN_SCALE, 1.0)
    return scales.astype(np.float32) if scales.min() < EQUALIZE_BELOW else None


@dataclass(frozen=True)
class Equalized:
    """A block as rescaled: its narrowest channel's factor (the spread of ranges the point no longer holds),
    and the model's tensors whose channel c now holds x_c / s_c (the layer output and activation of a
    ``relu`` block, the composite's exit up to the depthwise input, the depthwise input)."""

    block: Block
    min_scale: float
    rescaled: Tuple[str, ...] = ()


class _Rewriter:
    """Initializers and nodes added to a graph under fresh names."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.taken = {t.name for t in graph.initializer} | {i.name for i in graph.input}
        self.taken |= {o for n in graph.node for o in n.output} | {i for n in graph.node for i in n.input}
        self.types = {vi.name: vi for vi in graph.value_info}
        self.replaced: set = set()  # initializers no longer read where they were

    def constant(self, base: str, value: np.ndarray) -> str:
        name = unique_name(base, self.taken)
        self.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def node(self, op: str, inputs: Sequence[str], like: str, base: str, **attrs) -> str:
        """A node whose single output has the type and shape of tensor ``like``."""
        out = unique_name(base, self.taken)
        self.graph.node.append(helper.make_node(op, list(inputs), [out], name=out, **attrs))
        if like in self.types:
            info = onnx.ValueInfoProto()
            info.CopyFrom(self.types[like])
            info.name = out
            self.graph.value_info.append(info)
        return out

    def replace(self, node: onnx.NodeProto, position: int, value: np.ndarray, base: str) -> None:
        self.replaced.add(node.input[position])
        node.input[position] = self.constant(base, value)


def _per_channel(scales: np.ndarray, rank: int) -> np.ndarray:
    return scales.reshape((1, -1) + (1,) * (rank - 2))


def equalize(model: onnx.ModelProto, blocks: Sequence[Block], ranges: Dict[str, np.ndarray]
             ) -> Tuple[onnx.ModelProto, List[Equalized]]:
    """A copy of ``model`` with each block whose ``ranges`` (per-channel max|x| of ``Block.tensor``) call for
    it rescaled as the module says, and the blocks rescaled, in order; ``model`` itself when none is."""
    channels = {_name(n): n.input[1] for n in model.graph.node if n.op_type == "Conv" and len(n.input) > 1}
    weights = {t.name: t for t in model.graph.initializer}
    chosen = []
    for block in blocks:
        scales = channel_scales(ranges[block.tensor]) if block.tensor in ranges else None
        if scales is not None and scales.shape[0] == weights[channels[block.conv]].dims[0]:
            chosen.append((block, scales))
    if not chosen:
        return model, []
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    index = GraphIndex(graph)
    nodes = {_name(n): n for n in graph.node}
    rewrite = _Rewriter(graph)
    for block, scales in chosen:
        conv = nodes[block.conv]
        weight = tensor_array(index.constants[conv.input[1]]).astype(np.float32)
        act = index.producer[block.tensor]
        rank = len(weight.shape)
        factor = _per_channel(1.0 / scales, rank).astype(np.float32)
        if block.kind == "relu":
            _scale_outputs(rewrite, index, nodes[block.layer], 1.0 / scales)  # type: ignore[index]
        elif block.kind == "hardswish":
            y = act.input[0]
            gate = rewrite.node("HardSigmoid", [y], y, f"{act.output[0]}_gate", alpha=1.0 / 6, beta=0.5)
            scaled = rewrite.node("Mul", [y, rewrite.constant(f"{block.tensor}_equalize", factor)], y,
                                  f"{y}_equalized")
            act.op_type, act.domain = "Mul", ""
            del act.input[:]
            act.input.extend([scaled, gate])
        else:
            _scale_exit(rewrite, index, index.producer[block.exit], factor, block.tensor)  # type: ignore[index]
        filters = scales.reshape((-1,) + (1,) * (rank - 1))
        rewrite.replace(conv, 1, weight * filters, f"{conv.input[1]}_equalized")
    drop_unread_initializers(graph, rewrite.replaced)
    toposort_graph(graph)
    return out, [Equalized(block, float(scales.min()), _rescaled(block, nodes)) for block, scales in chosen]


def _rescaled(block: Block, nodes: Dict[str, onnx.NodeProto]) -> Tuple[str, ...]:
    """The tensors of the graph as it was that carry the block's factor 1/s after the rewrite."""
    if block.kind == "relu":
        return (nodes[block.layer].output[0], block.tensor)  # type: ignore[index]
    if block.kind == "composite" and block.exit is not None and block.exit != block.tensor:
        return (block.exit, block.tensor)
    return (block.tensor,)


def _scale_outputs(rewrite: _Rewriter, index: GraphIndex, layer: onnx.NodeProto, factors: np.ndarray) -> None:
    """Multiply a Conv's output channels by ``factors`` (its weight's axis 0 and its bias)."""
    weight = tensor_array(index.constants[layer.input[1]]).astype(np.float32)
    shape = (-1,) + (1,) * (weight.ndim - 1)
    rewrite.replace(layer, 1, weight * factors.reshape(shape).astype(np.float32), f"{layer.input[1]}_equalized")
    if len(layer.input) > 2 and layer.input[2] in index.constants:
        bias = tensor_array(index.constants[layer.input[2]]).astype(np.float32)
        rewrite.replace(layer, 2, bias * factors.astype(np.float32), f"{layer.input[2]}_equalized")


def _scale_exit(rewrite: _Rewriter, index: GraphIndex, exit_node: onnx.NodeProto, factor: np.ndarray,
                tensor: str) -> None:
    """Make a composite's exit Mul/Div (two activation operands) write its output times ``factor``: a Mul on
    its first factor (a Div's numerator), inside the composite."""
    pos = 0 if exit_node.op_type == "Div" else next(p for p, n in enumerate(exit_node.input) if index.is_activation(n))
    first = exit_node.input[pos]
    exit_node.input[pos] = rewrite.node("Mul", [first, rewrite.constant(f"{tensor}_equalize", factor)], first,
                                        f"{first}_equalized")
