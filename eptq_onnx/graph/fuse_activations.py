"""HardSwish spelled as elementwise ops, written as one activation op.

paddle2onnx (PP-LCNet, PP-OCR, PicoDet) and older exporters write HardSwish as
x * clip(x + 3, 0, 6) / 6: four elementwise nodes that onnxruntime runs as four passes over the
tensor (and, in a QDQ model, between a DequantizeLinear and a QuantizeLinear). The same function is
HardSwish(x) from opset 14, and x * HardSigmoid(x) (alpha 1/6, beta 1/2) at any opset, which
onnxruntime runs in one or two passes. The exit tensor keeps its name; the values agree to float
rounding.

Spellings matched (every intermediate read by the pattern alone and no graph output):
``(x * clip(x + 3, 0, 6)) / 6``, ``x * clip(x + 3, 0, 6) * (1/6)`` and ``x * (clip(x + 3, 0, 6) / 6)``,
with the operands of Add and Mul in either order and Clip's bounds as inputs or (opset < 11) attributes.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import onnx
from onnx import helper

from eptq_onnx.graph.index import GraphIndex, drop_unread_initializers, unique_name
from eptq_onnx.graph.tensor_store import tensor_array

HARDSWISH_OPSET = 14  # the opset that defines HardSwish
_TOL = 1e-6


def _scalar(index: GraphIndex, name: str) -> Optional[float]:
    """The value of a one-element float constant (None for anything else)."""
    if not index.is_float_constant(name):
        return None
    value = tensor_array(index.constants[name])
    return float(value.reshape(-1)[0]) if value.size == 1 else None


def _is(value: Optional[float], expected: float) -> bool:
    return value is not None and abs(value - expected) <= _TOL * max(1.0, abs(expected))


def _producer_read_once(index: GraphIndex, tensor: str, op_type: str) -> Optional[onnx.NodeProto]:
    """The node writing ``tensor`` when it is an ``op_type`` and ``tensor`` has one reader (the pattern's) and is
    no graph output."""
    node = index.producer.get(tensor)
    if node is None or node.op_type != op_type or len(index.consumers.get(tensor, [])) != 1 \
            or tensor in index.outputs:
        return None
    return node


def _clip_bounds(index: GraphIndex, clip: onnx.NodeProto) -> Tuple[Optional[float], Optional[float]]:
    attrs = {a.name: a.f for a in clip.attribute}
    if "min" in attrs or "max" in attrs:
        return attrs.get("min"), attrs.get("max")
    low = _scalar(index, clip.input[1]) if len(clip.input) > 1 and clip.input[1] else None
    high = _scalar(index, clip.input[2]) if len(clip.input) > 2 and clip.input[2] else None
    return low, high


def _relu6_of_x_plus_3(index: GraphIndex, tensor: str) -> Optional[Tuple[str, List[onnx.NodeProto]]]:
    """(x, [Clip, Add]) when ``tensor`` is clip(x + 3, 0, 6), read by the pattern alone."""
    clip = _producer_read_once(index, tensor, "Clip")
    if clip is None:
        return None
    low, high = _clip_bounds(index, clip)
    if not (_is(low, 0.0) and _is(high, 6.0)):
        return None
    add = _producer_read_once(index, clip.input[0], "Add")
    if add is None or len(add.input) != 2:
        return None
    for x, three in (add.input, add.input[::-1]):
        if index.is_activation(x) and _is(_scalar(index, three), 3.0):
            return x, [clip, add]
    return None


def _times_x(index: GraphIndex, mul: onnx.NodeProto, gate_of: Callable) -> Optional[Tuple[str, List[onnx.NodeProto]]]:
    """(x, nodes) when Mul ``mul`` multiplies x by gate_of's pattern over that same x."""
    if mul.op_type != "Mul" or len(mul.input) != 2:
        return None
    for x, gate in (mul.input, mul.input[::-1]):
        found = gate_of(index, gate)
        if found is not None and found[0] == x:
            return x, found[1]
    return None


def _gate_over_6(index: GraphIndex, tensor: str) -> Optional[Tuple[str, List[onnx.NodeProto]]]:
    """(x, nodes) when ``tensor`` is clip(x + 3, 0, 6) / 6 (or times 1/6)."""
    node = index.producer.get(tensor)
    if node is None or _producer_read_once(index, tensor, node.op_type) is None:
        return None
    scaled = _divided_by_6(index, node)
    found = _relu6_of_x_plus_3(index, scaled) if scaled is not None else None
    return (found[0], [node] + found[1]) if found is not None else None


def _divided_by_6(index: GraphIndex, node: Optional[onnx.NodeProto]) -> Optional[str]:
    """The tensor that ``node`` divides by 6 (or multiplies by 1/6); None when it does not."""
    if node is None or len(node.input) != 2:
        return None
    if node.op_type == "Div" and _is(_scalar(index, node.input[1]), 6.0):
        return node.input[0]
    if node.op_type == "Mul":
        for value, const in (node.input, node.input[::-1]):
            if _is(_scalar(index, const), 1.0 / 6):
                return value
    return None


def _match(index: GraphIndex, exit_node: onnx.NodeProto) -> Optional[Tuple[str, List[onnx.NodeProto]]]:
    """(x, the pattern's nodes other than ``exit_node``) when ``exit_node`` writes HardSwish(x)."""
    product = _divided_by_6(index, exit_node)
    if product is not None:  # (x * relu6(x + 3)) / 6
        mul = _producer_read_once(index, product, "Mul")
        found = _times_x(index, mul, _relu6_of_x_plus_3) if mul is not None else None
        if found is not None:
            return found[0], [mul] + found[1]
    return _times_x(index, exit_node, _gate_over_6)  # x * (relu6(x + 3) / 6)


def fuse_hardswish(model: onnx.ModelProto, opset: int) -> int:
    """Rewrite every decomposed HardSwish of ``model``'s main graph in place (HardSwish at ``opset`` >= 14,
    else x * HardSigmoid(x)); returns how many were rewritten."""
    graph = model.graph
    index = GraphIndex(graph)
    taken = {o for n in graph.node for o in n.output} | {i for n in graph.node for i in n.input}
    dropped: set = set()
    replaced: set = set()
    gates: dict = {}  # id(exit node) -> the HardSigmoid that goes before it
    types = {vi.name: vi for vi in list(graph.input) + list(graph.value_info) + list(graph.output)}
    count = 0
    for node in index.nodes:
        if id(node) in dropped or node.op_type not in ("Div", "Mul"):
            continue
        found = _match(index, node)
        if found is None or any(id(n) in dropped for n in found[1]):
            continue
        x, inner = found
        dropped.update(id(n) for n in inner)
        replaced.update(i for n in inner + [node] for i in n.input if i in index.constants)
        del node.attribute[:]
        del node.input[:]
        if opset >= HARDSWISH_OPSET:
            node.op_type = "HardSwish"
            node.input.append(x)
        else:
            gate = unique_name(f"{node.output[0]}_gate", taken)
            gates[id(node)] = helper.make_node("HardSigmoid", [x], [gate], name=gate, alpha=1.0 / 6, beta=0.5)
            typed = types.get(x)
            if typed is not None:  # the gate has x's type and shape
                info = onnx.ValueInfoProto()
                info.CopyFrom(typed)
                info.name = gate
                graph.value_info.append(info)
            node.op_type = "Mul"
            node.input.extend([x, gate])
        count += 1
    if count:
        kept: Sequence[onnx.NodeProto] = [n for n in graph.node if id(n) not in dropped]
        nodes = []
        for n in kept:
            if id(n) in gates:
                nodes.append(gates[id(n)])
            nodes.append(n)
        del graph.node[:]
        graph.node.extend(nodes)
        gone = {o for n in index.nodes if id(n) in dropped for o in n.output}
        infos = [vi for vi in graph.value_info if vi.name not in gone]
        del graph.value_info[:]
        graph.value_info.extend(infos)
        drop_unread_initializers(graph, replaced)
    return count
