"""Composite activations (GELU, SiLU, HardSwish, ... as the exporter spelled them): the chains of elementwise nodes that run as one op, so that a quantization point sits at the composite's exit only."""
from __future__ import annotations

from typing import Dict, FrozenSet, List, Optional, Set, Tuple
import numpy as np
import onnx
from eptq_onnx.ops.registry import op_info
from eptq_onnx.graph.tensor_store import tensor_array
from eptq_onnx.graph.index import FLOAT_TYPES, GraphIndex
from eptq_onnx.ops.registry import BINARY_MATH


FUSIBLE_ROLES = frozenset(("activation", "elementwise"))


def elementwise_root(
    index: GraphIndex, tensor: str, roles: Dict[str, str], memo: Dict[str, Tuple[str, FrozenSet[str]]]
) -> Tuple[str, FrozenSet[str]]:
    """Follow a tensor back through elementwise math on a single activation to its source.

    Returns the source tensor and the tensors passed through on the way (memoized: shared
    sub-expressions are visited once).
    """
    if tensor in memo:
        return memo[tensor]
    result: Tuple[str, FrozenSet[str]] = (tensor, frozenset())
    node = index.producer.get(tensor)
    role = roles.get(node.output[0]) if node is not None else None
    if node is not None and (role in ("activation", "elementwise") or (role == "join" and node.op_type in BINARY_MATH)):
        acts = index.act_inputs(node)
        traced = [elementwise_root(index, a, roles, memo) for a in acts]
        roots = {root for root, _ in traced}
        if len(roots) == 1:
            inside = frozenset().union(*(passed for _, passed in traced)) | {tensor}
            result = (roots.pop(), inside)
    memo[tensor] = result
    return result

def composites(index: GraphIndex, roles: Dict[str, str]) -> Tuple[Dict[str, str], Set[str]]:
    """Composite activations (GELU, SiLU, HardSwish, ... written as elementwise ops).

    Returns (exit tensor -> root tensor) for the outermost composites and the set of tensors
    inside them, which never become quantization points.
    """
    exits: Dict[str, Tuple[str, FrozenSet[str]]] = {}
    memo: Dict[str, Tuple[str, FrozenSet[str]]] = {}
    for node in index.nodes:
        acts = index.act_inputs(node)
        if len(acts) < 2 or node.op_type not in BINARY_MATH:
            continue
        traced = [elementwise_root(index, a, roles, memo) for a in acts]
        roots = {root for root, _ in traced}
        if len(roots) == 1:
            exits[node.output[0]] = (roots.pop(), frozenset().union(*(passed for _, passed in traced)))
    internal: Set[str] = set()
    for _, (_, inside) in exits.items():
        internal |= inside
    outer = {e: root for e, (root, inside) in exits.items() if e not in internal}
    for e in outer:
        internal.discard(e)
    return outer, internal

def fuse_forward(index: GraphIndex, tensor: str, composite_of_root: Dict[str, str],
                  fusible: Optional[FrozenSet[str]] = None) -> List[str]:
    """The chain of tensors a point at ``tensor`` moves along (ending at the new point).

    A point moves past a single elementwise consumer (a non-linearity, or affine math with a
    constant) and past a composite activation whose root it is; with ``fusible`` (a target's
    rule) only past those op types.
    """
    chain = [tensor]
    while True:
        t = chain[-1]
        if t in index.outputs:
            return chain
        consumers = index.consumers.get(t, [])
        if t in composite_of_root and fusible is None:
            chain.append(composite_of_root[t])
            continue
        if len(consumers) != 1:
            return chain
        node = consumers[0]
        if fusible is not None and node.op_type not in fusible:
            return chain
        role = op_info(node).role
        if role not in FUSIBLE_ROLES or len(index.act_inputs(node)) != 1 or len(node.output) != 1:
            return chain
        if not index.is_activation(node.output[0]) or _rescales_unevenly(index, node):
            return chain
        chain.append(node.output[0])

UNEVEN_SCALE_RATIO = 16.0  # a Mul/Div by constants spanning more than this is not fused over

def _rescales_unevenly(index: GraphIndex, node: onnx.NodeProto) -> bool:
    """Mul/Div by a constant whose magnitudes differ a lot (or include 0) across elements.

    A point after it would put e.g. tokens scaled by 1 and by 1e-3 on one grid (the small ones
    round to 0); before it, each element keeps its relative precision.
    """
    if node.op_type not in ("Mul", "Div"):
        return False
    for name in node.input:
        if name in index.constants and index.constants[name].data_type in FLOAT_TYPES:
            c = np.abs(tensor_array(index.constants[name]).astype(np.float64))
            if c.size > 1 and (c.min() == 0 or c.max() / c.min() > UNEVEN_SCALE_RATIO):
                return True
    return False


def before_blocks(chain: List[str], in_blocks: Set[str]) -> List[str]:
    """The chain cut before the first tensor computed inside a normalization block."""
    for i, tensor in enumerate(chain[1:], start=1):
        if tensor in in_blocks:
            return chain[:i]
    return chain

def composite_of_root(index: GraphIndex, exits: Dict[str, str]) -> Dict[str, str]:
    """Root -> exit for the composites that are their root's only readers (the point moves)."""
    result: Dict[str, str] = {}
    for exit_name, root in exits.items():
        inside = _nodes_between(index, root, exit_name)
        readers = index.consumers.get(root, [])
        if root not in result and inside is not None and all(id(c) in inside for c in readers):
            result[root] = exit_name
    return result

def _nodes_between(index: GraphIndex, root: str, exit_name: str) -> Optional[Set[int]]:
    """ids of the nodes on paths from root to exit_name (None if exit is not reachable)."""
    found: Set[int] = set()
    reaches: Dict[str, bool] = {root: True}

    def visit(t: str) -> bool:
        if t not in reaches:
            node = index.producer.get(t)
            reaches[t] = False
            if node is not None:
                hits = [visit(i) for i in index.act_inputs(node)]
                if any(hits):
                    found.add(id(node))
                    reaches[t] = True
        return reaches[t]

    return found if visit(exit_name) else None
