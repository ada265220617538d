"""Decomposed normalizations (LayerNorm, RMSNorm, GroupNorm, InstanceNorm, L2 normalization) found
in the graph, whatever the exporter's spelling, so that they are quantized as their fused op is:
a point on the normalized (affine) output, none on any tensor computed inside.

A block is recognized by its structure, not by op sequences:

- its **entry** x is the tensor a reduction (ReduceMean, or ReduceSum then a Div/Mul by 1/N) reads,
  directly or through a square (``Pow(x, 2)``, ``Mul(x, x)``) or a cast;
- its nodes compute from x (and constants) only; tensors derived from a reduction are its
  **statistics** (mean, E[x^2], variance, standard deviation, its reciprocal), the others keep x's
  shape (x - mean, x^2, the normalized tensor);
- its **exit** is the first x-shaped tensor such that everything computed between x and it is read
  only inside (no statistic or intermediate escapes), among which a reduction of a square and a root
  (Sqrt, ``Pow(., +-0.5)``): E[(x-mean)^2] and E[x^2] - E[x]^2, Sqrt then Reciprocal or Div, eps
  before or after the root, ``x*inv - mean*inv`` all close the same way;
- the exit extends over a trailing affine (Mul/Add/Sub/Div by constants) and, for GroupNorm, the
  Reshape back from groups.

The kind: no mean subtracted -> RMSNorm (L2Norm for a plain sum); an entry reached through a Reshape
and an exit through one -> GroupNorm; a reduction over the axes after the first two of a rank >= 4
tensor -> InstanceNorm; else LayerNorm.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, FrozenSet, List, Optional, Set, Tuple

import onnx

from eptq_onnx.ops.registry import REDUCTIONS, ROOT_EXPONENTS, ROOTS, int_attr
from eptq_onnx.plan.singular import constant_scalar
from eptq_onnx.graph.tensor_store import tensor_array

if TYPE_CHECKING:
    from eptq_onnx.graph.index import GraphIndex

MAX_BLOCK_NODES = 48  # a decomposed norm (with casts and affine) is far smaller; larger regions are not one
UNARY_ENTRY_OPS = frozenset(("Cast", "Identity"))
AFFINE_OPS = frozenset(("Mul", "Add", "Sub", "Div"))
GROUP_RESHAPES = frozenset(("Reshape",))


@dataclass(frozen=True)
class NormBlock:
    """One decomposed normalization: its kind, entry and exit tensors, and what it computes inside."""

    kind: str  # "LayerNorm" | "RMSNorm" | "GroupNorm" | "InstanceNorm" | "L2Norm"
    input: str  # the tensor the statistics are computed from
    output: str  # the normalized tensor (after the affine, when there is one)
    nodes: Tuple[str, ...]  # the nodes inside, in graph order
    internal: FrozenSet[str]  # tensors computed inside (never quantization points)


def _squared_source(index: "GraphIndex", node: onnx.NodeProto) -> Optional[str]:
    """x when the node computes x*x or x**2, else None."""
    if node.op_type == "Mul" and len(node.input) == 2 and node.input[0] == node.input[1]:
        return node.input[0]
    if node.op_type == "Pow" and len(node.input) == 2 and constant_scalar(index, node.input[1]) == 2.0:
        return node.input[0]
    return None


def _entry(index: "GraphIndex", tensor: str) -> str:
    """Walk back from a reduction's input through a square and casts to the tensor it is computed from."""
    for _ in range(4):
        node = index.producer.get(tensor)
        if node is None:
            return tensor
        source = _squared_source(index, node)
        if source is None and node.op_type in UNARY_ENTRY_OPS and index.is_activation(node.input[0]):
            source = node.input[0]
        if source is None:
            return tensor
        tensor = source
    return tensor


class _Region:
    """The nodes computed from an entry tensor alone (and constants), grown in graph order."""

    def __init__(self, index: "GraphIndex", entry: str) -> None:
        self.index, self.entry = index, entry
        self.nodes: List[onnx.NodeProto] = []
        self.producer: Dict[str, onnx.NodeProto] = {}
        self.full: Set[str] = {entry}  # tensors with the entry's shape (not derived from a reduction only)
        self.squared: Set[str] = set()  # x-shaped tensors holding squares
        self.has_mean = False  # a reduction of a non-squared x-shaped tensor
        self.has_square_stat = False  # a reduction of a square
        self.has_root = False  # a root of a statistic

    def add(self, node: onnx.NodeProto) -> None:
        self.nodes.append(node)
        for out in node.output:
            if out:
                self.producer[out] = node
        acts = [i for i in node.input if self.index.is_activation(i)]
        full_in = [i for i in acts if i in self.full]
        if node.op_type in REDUCTIONS:
            square = node.op_type in ("ReduceSumSquare", "ReduceL2") or (full_in and full_in[0] in self.squared)
            self.has_square_stat |= bool(square)
            self.has_mean |= not square and bool(full_in)
            self.has_root |= node.op_type in ROOTS
            return
        if full_in:
            self.full.update(o for o in node.output if o)
            if _squared_source(self.index, node) is not None or (node.op_type == "Mul" and len(full_in) == 2):
                self.squared.update(o for o in node.output if o)
        elif node.op_type in ROOTS or (node.op_type == "Pow" and constant_scalar(self.index, node.input[1]) in ROOT_EXPONENTS):
            self.has_root = True

    def ancestors(self, tensor: str) -> List[onnx.NodeProto]:
        """The region's nodes that ``tensor`` depends on, in graph order."""
        seen: Set[int] = set()
        stack = [tensor]
        while stack:
            node = self.producer.get(stack.pop())
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            stack.extend(node.input)
        return [n for n in self.nodes if id(n) in seen]

    def closed(self, exit_name: str, inside: List[onnx.NodeProto]) -> bool:
        """Whether every tensor computed by ``inside`` other than the exit is read only inside."""
        ids = {id(n) for n in inside}
        for node in inside:
            for out in node.output:
                if not out or out == exit_name:
                    continue
                if out in self.index.outputs or any(id(c) not in ids for c in self.index.consumers.get(out, [])):
                    return False
        return True


def _grow(index: "GraphIndex", entry: str, position: Dict[int, int],
          taken: Set[int]) -> Optional[Tuple[_Region, str, List[onnx.NodeProto]]]:
    """Grow the region of ``entry`` in graph order (``position``: node id -> index) until its first
    closed normalization exit; None when there is none within MAX_BLOCK_NODES nodes."""
    region = _Region(index, entry)
    heap: List[Tuple[int, int]] = []
    queued: Set[int] = set()

    def push_consumers(tensor: str) -> None:
        for c in index.consumers.get(tensor, []):
            if id(c) not in queued and id(c) not in taken:
                queued.add(id(c))
                heapq.heappush(heap, (position[id(c)], id(c)))

    by_id = {id(n): n for n in index.nodes}
    push_consumers(entry)
    while heap and len(region.nodes) < MAX_BLOCK_NODES:
        _, node_id = heapq.heappop(heap)
        node = by_id[node_id]
        queued.discard(node_id)
        acts = [i for i in node.input if index.is_activation(i)]
        if not acts or not all(i in region.producer or i == entry for i in acts):
            continue  # reads another activation (it may become ready: it is queued again when it does)
        region.add(node)
        out = node.output[0]
        if out in region.full and region.has_square_stat and region.has_root:
            inside = region.ancestors(out)
            if region.closed(out, inside):
                block = _Region(index, entry)  # the signature of the block itself, not of the whole region
                for n in inside:
                    block.add(n)
                if block.has_square_stat and block.has_root:
                    return block, out, inside
        for o in node.output:
            if o:
                push_consumers(o)
    return None


def _extend(index: "GraphIndex", exit_name: str, grouped: bool) -> Tuple[str, List[onnx.NodeProto]]:
    """Extend the exit over a trailing affine by constants (and, for groups, the Reshape back)."""
    extra: List[onnx.NodeProto] = []
    while exit_name not in index.outputs:
        consumers = index.consumers.get(exit_name, [])
        if len(consumers) != 1:
            break
        node = consumers[0]
        others = [i for i in node.input if i != exit_name]
        if node.op_type in AFFINE_OPS and len(others) == 1 and index.is_float_constant(others[0]):
            pass
        elif grouped and node.op_type in GROUP_RESHAPES and not extra:
            pass
        else:
            break
        extra.append(node)
        exit_name = node.output[0]
    return exit_name, extra


def _axes(index: "GraphIndex", node: onnx.NodeProto) -> Optional[List[int]]:
    """A reduction's axes (attribute, or constant second input), None for all axes or unknown."""
    for a in node.attribute:
        if a.name == "axes":
            return list(onnx.helper.get_attribute_value(a))
    if len(node.input) > 1 and node.input[1] in index.constants:
        return [int(v) for v in tensor_array(index.constants[node.input[1]]).reshape(-1)]
    return None


def _rank(index: "GraphIndex", name: str) -> Optional[int]:
    for vi in list(index.graph.input) + list(index.graph.value_info) + list(index.graph.output):
        if vi.name == name and vi.type.tensor_type.HasField("shape"):
            return len(vi.type.tensor_type.shape.dim)
    return None


def _kind(index: "GraphIndex", region: _Region, inside: List[onnx.NodeProto], grouped: bool) -> str:
    if not region.has_mean:
        scaled = any(n.op_type == "ReduceMean" or (n.op_type in ("Div", "Mul") and any(index.is_float_constant(i) for i in n.input)
                                                   and n.output[0] not in region.full) for n in inside)
        return "RMSNorm" if scaled else "L2Norm"
    if grouped:
        return "GroupNorm"
    first = next(n for n in inside if n.op_type in REDUCTIONS)
    axes, rank = _axes(index, first), _rank(index, region.entry)
    if axes is not None and rank is not None and rank >= 4 and int_attr(first, "keepdims", 1):
        if sorted(a % rank for a in axes) == list(range(2, rank)):
            return "InstanceNorm"
    return "LayerNorm"


def find_norm_blocks(index: "GraphIndex") -> List[NormBlock]:
    """Every decomposed normalization of the graph, in graph order."""
    position = {id(n): i for i, n in enumerate(index.nodes)}
    taken: Set[int] = set()
    blocks: List[NormBlock] = []
    for node in index.nodes:
        if node.op_type not in REDUCTIONS or id(node) in taken or not index.is_activation(node.input[0]):
            continue
        entry = _entry(index, node.input[0])
        found = _grow(index, entry, position, taken)
        if found is None:
            continue
        region, exit_name, inside = found
        producer = index.producer.get(entry)
        grouped = producer is not None and producer.op_type in GROUP_RESHAPES
        output, extra = _extend(index, exit_name, grouped)
        grouped = grouped and any(n.op_type in GROUP_RESHAPES for n in extra)
        if extra and extra[-1].op_type in GROUP_RESHAPES:  # without an affine after it, the Reshape back
            extra.pop()  # only moves the normalized values: they are the output (the Reshape shares its point)
            output = extra[-1].output[0] if extra else exit_name
        nodes = inside + extra
        taken.update(id(n) for n in nodes)
        internal = frozenset(o for n in nodes for o in n.output if o and o != output)
        source = producer.input[0] if grouped else entry
        blocks.append(NormBlock(_kind(index, region, inside, grouped), source, output,
                                tuple(n.name or n.output[0] for n in nodes), internal))
    return blocks
