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
