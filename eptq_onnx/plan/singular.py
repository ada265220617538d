"""Tensors that stay float because their rounding would feed a singular op.

A singular input (ops.SINGULAR_INPUTS: Reciprocal, a Div denominator, Log, Sqrt, Pow with a negative
or fractional exponent) turns a value near 0 rounded to 0 into inf, NaN or an unbounded relative
error: a variance quantized on a grid set by its largest value gives 1/sqrt(0) for every token of
small variance. A tensor is kept float when all of its values reach the rest of the network only
through such inputs, via ops that do not requantize (elementwise math, non-linearities, joins, data
movement, reductions, casts; a Concat only when its output stays float too): e.g. ``x*x -> ReduceSum -> Div -> Sqrt`` or
``re*re + im*im + eps -> Log``. The op after the singular one (the Log's output, a normalized tensor)
is where the point goes.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict, Optional, Set

import numpy as np
import onnx

from eptq_onnx.ops.registry import REDUCTIONS, singular_inputs
from eptq_onnx.graph.tensor_store import tensor_array

if TYPE_CHECKING:
    from eptq_onnx.graph.index import GraphIndex

PASS_ROLES = frozenset(("elementwise", "activation", "data"))  # carry a value's rounding on unchanged
PASS_OPS = REDUCTIONS | {"Cast", "Identity"}


def constant_scalar(index: "GraphIndex", name: str) -> Optional[float]:
    """The value of a float constant that holds one element, else None."""
    tensor = index.constants.get(name)
    if tensor is None or int(np.prod(tensor.dims)) != 1:
        return None
    return float(tensor_array(tensor).reshape(-1)[0])


def node_singular_inputs(index: "GraphIndex", node: onnx.NodeProto) -> tuple:
    """Positions of ``node``'s inputs at which it is singular (ops.singular_inputs)."""
    exponent = constant_scalar(index, node.input[1]) if node.op_type == "Pow" and len(node.input) > 1 else None
    return singular_inputs(node, exponent)


def _passes_on(node: onnx.NodeProto, role: str) -> bool:
    """Whether the op carries its inputs' rounding to its outputs without a quantization point of its own."""
    return role in PASS_ROLES or role == "join" or node.op_type in PASS_OPS


def singular_feeders(index: "GraphIndex", roles: Dict[str, str]) -> Set[str]:
    """Activations that reach the network only through singular inputs (and stay float)."""
    marked: Set[str] = set()

    def feeds_only_singular(tensor: str) -> bool:
        consumers = index.consumers.get(tensor, [])
        if not consumers or tensor in index.outputs:
            return False
        for node in consumers:
            singular = node_singular_inputs(index, node)
            for pos, name in enumerate(node.input):
                if name != tensor or pos in singular:
                    continue
                outs = [o for o in node.output if o]
                if not _passes_on(node, roles.get(node.output[0], "float")) or not all(o in marked for o in outs):
                    return False
        return True

    for node in reversed(index.nodes):  # consumers are decided before their inputs
        for out in node.output:
            if index.is_activation(out) and feeds_only_singular(out):
                marked.add(out)
    for name in index.inputs:
        if index.is_activation(name) and feeds_only_singular(name):
            marked.add(name)
    return marked
