"""Small hand-built models whose node and tensor names are known, for the user's control over what is
quantized (``--exclude``)."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from models.zoo import _float_io, _graph_model, _weights

NAMED_CNN_CONVS = ("stem", "block/conv1", "block/conv2", "proj")


def named_cnn(seed: int = 0) -> onnx.ModelProto:
    """x [N, 3, 12, 12] -> Conv ``stem`` -> Relu -> a residual block (Conv ``block/conv1`` -> Relu ->
    Conv ``block/conv2`` -> Add ``block/add`` -> Relu) -> Conv ``proj`` (stride 2) -> Relu -> MaxPool
    -> GlobalAveragePool -> Flatten -> Gemm ``head`` -> logits [N, 10]. Every node is named."""
    rng = np.random.default_rng(seed)
    inits = {}

    def conv(name: str, x: str, cin: int, cout: int, stride: int = 1) -> onnx.NodeProto:
        inits[f"{name}.weight"] = _weights(rng, cout, cin, 3, 3)
        inits[f"{name}.bias"] = (0.1 * rng.standard_normal(cout)).astype(np.float32)
        return helper.make_node("Conv", [x, f"{name}.weight", f"{name}.bias"], [f"{name}_out"], name=name,
                                kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[stride, stride])

    def relu(name: str, x: str) -> onnx.NodeProto:
        return helper.make_node("Relu", [x], [f"{name}_out"], name=name)

    inits["head.weight"] = _weights(rng, 10, 16, fan_in=16)
    inits["head.bias"] = np.zeros(10, np.float32)
    nodes = [
        conv("stem", "x", 3, 8), relu("stem_relu", "stem_out"),
        conv("block/conv1", "stem_relu_out", 8, 8), relu("block/relu1", "block/conv1_out"),
        conv("block/conv2", "block/relu1_out", 8, 8),
        helper.make_node("Add", ["block/conv2_out", "stem_relu_out"], ["block/add_out"], name="block/add"),
        relu("block/relu2", "block/add_out"),
        conv("proj", "block/relu2_out", 8, 16, stride=2), relu("proj_relu", "proj_out"),
        helper.make_node("MaxPool", ["proj_relu_out"], ["pool_out"], name="pool", kernel_shape=[2, 2], strides=[1, 1]),
        helper.make_node("GlobalAveragePool", ["pool_out"], ["gap_out"], name="gap"),
        helper.make_node("Flatten", ["gap_out"], ["flat_out"], name="flatten"),
        helper.make_node("Gemm", ["flat_out", "head.weight", "head.bias"], ["logits"], name="head", transB=1),
    ]
    return _graph_model("named_cnn", nodes, [_float_io("x", ["N", 3, 12, 12])], [_float_io("logits", ["N", 10])],
                        inits, opset=13, producer="eptq-onnx-tests")
