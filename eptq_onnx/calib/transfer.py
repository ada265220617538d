"""The elementwise function a point's values pass through before anything else reads them.

onnxruntime's CPU fuses a Conv with its output point (QLinearConv), so under the ort-cpu target a
point sits on the Conv output in front of a HardSwish, SiLU, Relu or Sigmoid, and the activation's
own output is the next point. Everything downstream sees the point's values only through that
activation: a HardSwish maps every x <= -3 to 0, a Relu every x <= 0. A range chosen for the
values themselves spends its codes on what the activation throws away; chosen for the
activation's output (``params_mse`` with a transfer) it keeps them where they count.

A transfer is found for a group of a single tensor whose every reader is an elementwise chain
(unary activations, and math with scalar constants, in any spelling: HardSigmoid then Mul,
x * Sigmoid(x), ...) that ends at one tensor that is a point of another group. The chain is
evaluated by onnxruntime on the histogram's bin centers, so every spelling has the function it
computes.
"""
from __future__ import annotations

import heapq
from typing import Dict, List, Optional, Set

import numpy as np
import onnx

from eptq_onnx.graph.index import GraphIndex
from eptq_onnx.graph.runtime import make_session
from eptq_onnx.init.quantizers import Transfer
from eptq_onnx.ops.registry import BINARY_MATH, op_info
from eptq_onnx.plan.qpoints import QuantPlan

_CHAIN_ROLES = ("activation", "elementwise")
MAX_CHAIN_NODES = 8  # longer chains are not an activation's spelling


def point_transfers(model: onnx.ModelProto, plan: QuantPlan) -> Dict[int, Transfer]:
    """Group id -> the elementwise function between the group's point and the next point, for the
    groups that have one (see the module docstring)."""
    index = GraphIndex(model.graph)
    points = set(plan.group_of())
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    order = {id(n): i for i, n in enumerate(index.nodes)}
    result: Dict[int, Transfer] = {}
    for g in plan.groups:
        if len(g.tensors) != 1:
            continue
        chain = _chain(index, order, g.tensors[0], points)
        if chain is not None:
            result[g.id] = _evaluator(index, g.tensors[0], chain[0], chain[1], opset)
    return result


def _chain(index: GraphIndex, order: Dict[int, int], start: str,
           points: Set[str]) -> Optional[tuple[List[onnx.NodeProto], str]]:
    """The nodes from ``start`` to the one point they reach, in graph order, and that point (None if
    there is no such chain). Readers are taken in graph order, so that a node reading two chain
    tensors (x * HardSigmoid(x)) comes after both; ``order`` is node id -> position in the graph."""
    if start in index.outputs or not index.consumers.get(start):
        return None
    inside, nodes, exits = {start}, [], set()
    heap = [(order[id(n)], n) for n in index.consumers[start]]
    queued = {id(n) for _, n in heap}
    heapq.heapify(heap)
    while heap:
        _, node = heapq.heappop(heap)
        if len(nodes) == MAX_CHAIN_NODES or not _elementwise(index, node, inside):
            return None
        nodes.append(node)
        out = node.output[0]
        if out in points:
            exits.add(out)
            continue
        readers = index.consumers.get(out, [])
        if out in index.outputs or not readers:
            return None
        inside.add(out)
        for reader in readers:
            if id(reader) not in queued:
                queued.add(id(reader))
                heapq.heappush(heap, (order[id(reader)], reader))
    return (nodes, exits.pop()) if len(exits) == 1 else None


def _elementwise(index: GraphIndex, node: onnx.NodeProto, inside: Set[str]) -> bool:
    """An elementwise op of values computed from the chain's start and scalar constants only."""
    role = op_info(node).role
    if len(node.output) != 1 or not (role in _CHAIN_ROLES or node.op_type in BINARY_MATH):
        return False
    for name in node.input:
        if not name:
            continue
        if name in index.constants:
            if int(np.prod(index.constants[name].dims)) != 1:
                return False
        elif name not in inside:
            return False
    return True


def _evaluator(index: GraphIndex, start: str, nodes: List[onnx.NodeProto], exit_name: str, opset: int) -> Transfer:
    """The chain as a one-input model over a 1-D tensor, run by onnxruntime."""
    dtype = index.elem_type.get(start, onnx.TensorProto.FLOAT)
    constants = [index.constants[i] for n in nodes for i in n.input if i in index.constants]
    graph = onnx.helper.make_graph(
        nodes, "transfer",
        [onnx.helper.make_tensor_value_info(start, dtype, ["n"])],
        [onnx.helper.make_tensor_value_info(exit_name, dtype, None)],  # scalar constants may broadcast to a higher rank
        initializer=list({c.name: c for c in constants}.values()),
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    session = make_session(model, optimize=False)
    np_type = onnx.helper.tensor_dtype_to_np_dtype(dtype)

    def apply(x: np.ndarray) -> np.ndarray:
        (y,) = session.run([exit_name], {start: np.asarray(x, dtype=np_type).ravel()})
        return np.asarray(y, dtype=np.float64).reshape(np.shape(x))

    return apply
