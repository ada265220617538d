"""Small models for the analysis (eptq-onnx-analyze), built with onnx.helper from fixed random weights.

- :func:`outlier_channel_mlp`: one activation with an outlier channel (1000x the others) that the next
  layer does not read: its per-tensor 8-bit grid, set by the outlier, leaves the channels that matter
  on a few codes. The culprit is the activation point ``h2`` (output of node ``relu2``).
- :func:`tiny_mlp`: x -> MatMul -> Relu -> MatMul -> y, small enough to recompute in numpy.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OUTLIER_GAIN = 1000.0  # channel 0 of h2 against the others
CULPRIT = "h2"  # the activation point the analysis must rank first in outlier_channel_mlp
CULPRIT_NODE = "relu2"


def _model(nodes: list, weights: dict, inputs: int, outputs: int, name: str) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", inputs])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", outputs])],
        [numpy_helper.from_array(w.astype(np.float32), k) for k, w in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def outlier_channel_mlp(seed: int = 0) -> onnx.ModelProto:
    """x[N,16] -> MatMul w1 -> Relu (h1) -> MatMul w2 (column 0 x OUTLIER_GAIN) -> Relu (h2) ->
    MatMul w3 (row 0 zero) -> y[N,8]."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.5, (16, 32))
    w2 = rng.normal(0, 0.3, (32, 32))
    w2[:, 0] = np.abs(w2[:, 0]) * OUTLIER_GAIN  # channel 0 of h2 is large and positive
    w3 = rng.normal(0, 0.3, (32, 8))
    w3[0, :] = 0.0  # ... and unread by the next layer
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["m1"], name="fc1"),
        helper.make_node("Relu", ["m1"], ["h1"], name="relu1"),
        helper.make_node("MatMul", ["h1", "w2"], ["m2"], name="fc2"),
        helper.make_node("Relu", ["m2"], [CULPRIT], name=CULPRIT_NODE),
        helper.make_node("MatMul", [CULPRIT, "w3"], ["y"], name="fc3"),
    ]
    return _model(nodes, {"w1": w1, "w2": w2, "w3": w3}, 16, 8, "outlier_channel_mlp")


def tiny_mlp(seed: int = 1) -> onnx.ModelProto:
    """x[N,8] -> MatMul w1 [8,16] -> Relu -> MatMul w2 [16,4] -> y[N,4]."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["m1"], name="fc1"),
        helper.make_node("Relu", ["m1"], ["h1"], name="relu1"),
        helper.make_node("MatMul", ["h1", "w2"], ["y"], name="fc2"),
    ]
    return _model(nodes, {"w1": rng.normal(0, 0.5, (8, 16)), "w2": rng.normal(0, 0.5, (16, 4))}, 8, 4, "tiny_mlp")


def spread_stem_cnn(seed: int = 2) -> onnx.ModelProto:
    """x[N,3,12,12] -> Conv 3->8 (output channels 0.02x to 20x apart, as a BN-folded stem's are) ->
    HardSwish (h1) -> depthwise Conv 3x3 with bias (the small channels' weights large, so they matter)
    -> y[N,8,12,12]. At 8 bits the per-tensor grid of h1 (and of the Conv output in front of it,
    where onnxruntime's placement puts a point) loses the small channels."""
    rng = np.random.default_rng(seed)
    gains = np.geomspace(0.02, 20.0, 8)
    w1 = rng.normal(0, 0.5, (8, 3, 3, 3)) * gains[:, None, None, None]
    w2 = rng.normal(0, 0.5, (8, 1, 3, 3)) / np.sqrt(gains)[:, None, None, None]
    b2 = rng.normal(0, 0.5, 8)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="stem", pads=[1, 1, 1, 1]),
        helper.make_node("HardSwish", ["c1"], ["h1"], name="stem_act"),
        helper.make_node("Conv", ["h1", "w2", "b2"], ["y"], name="dw", pads=[1, 1, 1, 1], group=8),
    ]
    graph = helper.make_graph(
        nodes, "spread_stem_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 12, 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 12, 12])],
        [numpy_helper.from_array(w.astype(np.float32), k) for k, w in {"w1": w1, "w2": w2, "b2": b2}.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model
