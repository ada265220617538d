"""Float16 models as users have them: GPU exports and onnxconverter-common's float16 converter.

:func:`to_float16` converts a float32 model the way ``onnxconverter_common.float16.
convert_float_to_float16`` does (float16 initializers, value types and Constant tensors; with
``keep_io_types`` the graph inputs and outputs stay float32 behind Cast nodes named
``graph_input_cast_<i>`` / ``graph_output_cast_<i>``; the converter appends them after the
other nodes, :func:`converter_order`: its graphs are not topologically sorted, and onnxruntime
runs them).
:func:`float16_cnn` is a small CNN (conv-BN-ReLU, a channel Slice, a residual add, GAP, Linear)
in three spellings: float16 I/O, float32 I/O with boundary Casts, and nodes in reverse order.
"""
from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from models.zoo import _perturb_norms, _seeded, exported, finalize

__all__ = ["ORDERS", "Float16CNN", "converter_order", "float16_cnn", "float32_cnn", "to_float16"]


class Float16CNN(nn.Module):
    """conv-BN-ReLU, a second conv-BN-ReLU on the first half of the channels (a Slice) added back
    to the other half, GAP, Linear."""

    def __init__(self, width: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        half = width // 2
        self.branch = nn.Sequential(nn.Conv2d(half, half, 3, padding=1, bias=False), nn.BatchNorm2d(half), nn.ReLU())
        self.head = nn.Linear(half, classes)
        self.half = half

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        y = self.branch(y[:, : self.half]) + y[:, self.half:]
        return self.head(y.mean(dim=(2, 3)))


def float32_cnn(opset: int = 13) -> onnx.ModelProto:
    """The float32 model that :func:`float16_cnn` converts, on [N,3,32,32] -> logits [N,10]."""
    with _seeded(5):
        net = Float16CNN()
        _perturb_norms(net)
        x = torch.randn(2, 3, 32, 32)
    return exported(net, (x,), opset=opset, input_names=["input"], output_names=["logits"])


def _half(tensor: TensorProto) -> TensorProto:
    return numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float16), tensor.name)


def to_float16(model: onnx.ModelProto, keep_io_types: bool = False) -> onnx.ModelProto:
    """A float16 copy of a float32 model, in onnxconverter-common's style (see the module docstring)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    for index, tensor in enumerate(graph.initializer):
        if tensor.data_type == TensorProto.FLOAT:
            graph.initializer[index].CopyFrom(_half(tensor))
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == TensorProto.FLOAT:
                attr.t.CopyFrom(_half(attr.t))
            if node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.FLOAT:
                attr.i = TensorProto.FLOAT16
    for value in graph.value_info:
        if value.type.tensor_type.elem_type == TensorProto.FLOAT:
            value.type.tensor_type.elem_type = TensorProto.FLOAT16
    first, last = [], []  # the boundary Casts of keep_io_types
    for kind, values in (("input", graph.input), ("output", graph.output)):
        for i, value in enumerate(values):
            if value.type.tensor_type.elem_type != TensorProto.FLOAT:
                continue
            if not keep_io_types:
                value.type.tensor_type.elem_type = TensorProto.FLOAT16
                continue
            inner = f"graph_{kind}_cast_{i}"
            for node in graph.node:
                names = node.input if kind == "input" else node.output
                for k, name in enumerate(names):
                    if name == value.name:
                        names[k] = inner
            if kind == "input":
                first.append(helper.make_node("Cast", [value.name], [inner], name=inner, to=TensorProto.FLOAT16))
            else:
                last.append(helper.make_node("Cast", [inner], [value.name], name=inner, to=TensorProto.FLOAT))
    _set_nodes(graph, first + list(graph.node) + last)
    return finalize(out)


def _set_nodes(graph: onnx.GraphProto, nodes: list[onnx.NodeProto]) -> None:
    del graph.node[:]
    graph.node.extend(nodes)


def converter_order(model: onnx.ModelProto) -> onnx.ModelProto:
    """The nodes in the order onnxconverter-common writes them: its boundary Casts after every
    other node (the graph is then not topologically sorted; onnxruntime runs it)."""
    casts = [n for n in model.graph.node if n.op_type == "Cast" and n.name.startswith("graph_")]
    _set_nodes(model.graph, [n for n in model.graph.node if n not in casts] + casts)
    return model


ORDERS = ("sorted", "converter", "reversed")


def float16_cnn(io: str = "float16", order: str = "sorted") -> onnx.ModelProto:
    """:func:`float32_cnn` in float16: ``io`` "float16" (every tensor float16) or "float32"
    (keep_io_types: float32 inputs/outputs behind Casts); ``order`` "sorted", "converter"
    (:func:`converter_order`) or "reversed" (every node; onnxruntime runs it, onnx.checker refuses it)."""
    model = to_float16(float32_cnn(), keep_io_types=io == "float32")
    if order == "converter":
        converter_order(model)
    elif order == "reversed":
        _set_nodes(model.graph, list(model.graph.node)[::-1])
    return model

