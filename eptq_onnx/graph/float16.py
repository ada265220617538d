"""Float16 models (GPU exports, onnxconverter-common's float16 converter): quantized in float32.

:func:`to_float32` turns every float16 tensor, type and cast target of a model into float32
(Cast nodes that then cast float32 to float32, the boundary casts of ``keep_io_types`` models,
become Identity, which normalization removes), so every stage works on one float type and the
QDQ ops are those of float32 (QuantizeLinear reads float16 only from opset 19 on).
:func:`restore_io_types` gives the written model back the float16 inputs and outputs of the
user's model, with a Cast at each: between them the quantized model computes in float32.
"""
from __future__ import annotations

from typing import Dict, Iterator, List

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from eptq_onnx.graph.tensor_store import tensor_array
from eptq_onnx.graph.toposort import subgraphs

HALF = TensorProto.FLOAT16
FLOAT = TensorProto.FLOAT
_DTYPE_ATTRIBUTES = ("to", "dtype")  # Cast's target; EyeLike/Random*/Bernoulli output types


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for sub in subgraphs(node):
            yield from _graphs(sub)


def _types(graph: onnx.GraphProto) -> Iterator[onnx.TypeProto]:
    for value in (*graph.input, *graph.output, *graph.value_info):
        yield value.type


def _half_type(type_proto: onnx.TypeProto) -> bool:
    """Does this type hold float16 (a tensor, or a sequence/optional/map of them)?"""
    kind = type_proto.WhichOneof("value")
    if kind == "tensor_type":
        return type_proto.tensor_type.elem_type == HALF
    if kind in ("sequence_type", "optional_type"):
        return _half_type(getattr(type_proto, kind).elem_type)
    return kind == "map_type" and _half_type(type_proto.map_type.value_type)


def _to_float_type(type_proto: onnx.TypeProto) -> None:
    kind = type_proto.WhichOneof("value")
    if kind == "tensor_type" and type_proto.tensor_type.elem_type == HALF:
        type_proto.tensor_type.elem_type = FLOAT
    elif kind in ("sequence_type", "optional_type"):
        _to_float_type(getattr(type_proto, kind).elem_type)
    elif kind == "map_type":
        _to_float_type(type_proto.map_type.value_type)


def has_float16(model: onnx.ModelProto) -> bool:
    """Does the model hold any float16 tensor, value type or cast to float16?"""
    for graph in _graphs(model.graph):
        if any(t.data_type == HALF for t in graph.initializer) or any(_half_type(t) for t in _types(graph)):
            return True
        for node in graph.node:
            for attr in node.attribute:
                if (attr.type == onnx.AttributeProto.INT and attr.name in _DTYPE_ATTRIBUTES and attr.i == HALF) or (
                        attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == HALF):
                    return True
    return False


def _float_tensor(tensor: TensorProto) -> TensorProto:
    return numpy_helper.from_array(tensor_array(tensor).astype(np.float32), tensor.name)


def to_float32(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with float32 wherever it had float16 (changed in place and returned)."""
    for graph in _graphs(model.graph):
        for index, tensor in enumerate(graph.initializer):
            if tensor.data_type == HALF:
                graph.initializer[index].CopyFrom(_float_tensor(tensor))
        for type_proto in _types(graph):
            _to_float_type(type_proto)
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.INT and attr.name in _DTYPE_ATTRIBUTES and attr.i == HALF:
                    attr.i = FLOAT
                elif attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == HALF:
                    attr.t.CopyFrom(_float_tensor(attr.t))
                elif attr.type == onnx.AttributeProto.TENSORS:
                    for t in attr.tensors:
                        if t.data_type == HALF:
                            t.CopyFrom(_float_tensor(t))
    _float_casts_to_identity(model)
    return model


def _elem_types(model: onnx.ModelProto) -> Dict[str, int]:
    """Element type of every tensor whose type shape inference (or the graph) knows."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - inference is best effort: unknown types keep their Cast
        inferred = model
    types: Dict[str, int] = {}
    for graph in _graphs(inferred.graph):
        types.update({t.name: t.data_type for t in graph.initializer})
        for value in (*graph.input, *graph.output, *graph.value_info):
            if value.type.WhichOneof("value") == "tensor_type":
                types[value.name] = value.type.tensor_type.elem_type
    return types


def _float_casts_to_identity(model: onnx.ModelProto) -> None:
    """Cast to float32 of a float32 tensor (a float16 model's boundary cast, now) becomes Identity."""
    types = _elem_types(model)
    for graph in _graphs(model.graph):
        for node in graph.node:
            if node.op_type != "Cast" or node.domain not in ("", "ai.onnx"):
                continue
            target = next((a.i for a in node.attribute if a.name == "to"), None)
            if target == FLOAT and types.get(node.input[0]) == FLOAT:
                node.op_type = "Identity"
                del node.attribute[:]


def _rename_reads(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Every node of ``graph`` (and its subgraphs) reading ``old`` reads ``new``."""
    for g in _graphs(graph):
        for node in g.node:
            for i, name in enumerate(node.input):
                if name == old:
                    node.input[i] = new


def restore_io_types(model: onnx.ModelProto, original: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` (float32 inside) with the float16 graph inputs and outputs of ``original``.

    A float16 input ``x`` is read through ``Cast(x) -> x_float32``; a float16 output ``y`` is
    ``Cast(y_float32) -> y``, its producer writing ``y_float32``. Names and order are kept."""
    half = {v.name for v in (*original.graph.input, *original.graph.output) if _half_type(v.type)}
    graph = model.graph
    taken = {o for n in graph.node for o in n.output} | {v.name for v in graph.input} | {t.name for t in graph.initializer}
    first: List[onnx.NodeProto] = []
    last: List[onnx.NodeProto] = []

    def inner(name: str) -> str:
        candidate, i = f"{name}_float32", 1
        while candidate in taken:
            i += 1
            candidate = f"{name}_float32_{i}"
        taken.add(candidate)
        return candidate

    outputs = {v.name for v in graph.output}
    produced = {o for n in graph.node for o in n.output}
    for value in graph.input:
        if value.name in half and value.name not in outputs and value.type.tensor_type.elem_type == FLOAT:
            internal = inner(value.name)
            _rename_reads(graph, value.name, internal)
            first.append(helper.make_node("Cast", [value.name], [internal], name=f"{value.name}_Cast_float32", to=FLOAT))
            value.type.tensor_type.elem_type = HALF
    for value in graph.output:
        if value.name in half and value.name in produced and value.type.tensor_type.elem_type == FLOAT:
            internal = inner(value.name)
            _rename_reads(graph, value.name, internal)
            for node in graph.node:
                for i, name in enumerate(node.output):
                    if name == value.name:
                        node.output[i] = internal
            for info in graph.value_info:
                if info.name == value.name:
                    info.name = internal
            last.append(helper.make_node("Cast", [internal], [value.name], name=f"{value.name}_Cast_float16", to=HALF))
            value.type.tensor_type.elem_type = HALF
    nodes = first + list(graph.node) + last
    del graph.node[:]
    graph.node.extend(nodes)
    return model
