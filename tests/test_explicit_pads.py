"""SAME_* auto_pad rewritten as explicit pads: onnxruntime computes the same outputs before and after."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from eptq_onnx.graph.explicit_pads import make_pads_explicit, same_pads
from eptq_onnx.graph.normalize import normalize_model


def _same_model(mode: str, batch: int = 1) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.normal(size=(4, 3, 3, 2)).astype(np.float32), "w")
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", auto_pad=mode, strides=[2, 3]),
        helper.make_node("MaxPool", ["c"], ["m"], name="pool", auto_pad=mode, kernel_shape=[2, 3], strides=[2, 2]),
        helper.make_node("AveragePool", ["m"], ["y"], name="avg", auto_pad=mode, kernel_shape=[3, 3], dilations=[1, 1]),
    ]
    graph = helper.make_graph(
        nodes, "same", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 13, 17])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4, 4, 3])], [weight],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.mark.parametrize("mode", ["SAME_UPPER", "SAME_LOWER"])
def test_normalized_model_has_explicit_pads_and_the_same_outputs(mode: str) -> None:
    model = _same_model(mode)
    x = np.random.default_rng(1).normal(size=(1, 3, 13, 17)).astype(np.float32)
    normalized = normalize_model(model)
    for node in normalized.graph.node:
        attrs = {a.name: a for a in node.attribute}
        assert "auto_pad" not in attrs and len(attrs["pads"].ints) == 4, node.name
    np.testing.assert_allclose(_run(normalized, x), _run(model, x), rtol=1e-5, atol=1e-5)


def test_dynamic_dims_are_rewritten_only_at_stride_one() -> None:
    """A dynamic dim fixes SAME padding only at stride 1 ((k - 1) * dilation whatever the size): the
    strided Conv and MaxPool keep auto_pad, the stride-1 AveragePool after them takes explicit pads, and
    onnxruntime computes the same at two heights."""
    model = _same_model("SAME_UPPER")
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "h"
    model.graph.output[0].type.tensor_type.shape.dim[2].dim_param = "oh"
    inferred = onnx.shape_inference.infer_shapes(model)
    assert make_pads_explicit(inferred.graph) == 1
    kept = {n.name for n in inferred.graph.node if any(a.name == "auto_pad" for a in n.attribute)}
    assert kept == {"conv", "pool"}
    for height in (13, 10):
        x = np.random.default_rng(height).normal(size=(1, 3, height, 17)).astype(np.float32)
        np.testing.assert_allclose(_run(inferred, x), _run(model, x), rtol=1e-5, atol=1e-5)


def test_same_pads_formula() -> None:
    # in 13, k 3, stride 2: out 7, total (7-1)*2+3-13 = 2; in 17, k 2, stride 3: out 6, total 15+2-17 = 0
    assert same_pads([13, 17], [3, 2], [2, 3], [1, 1], upper=True) == [1, 0, 1, 0]
    # in 6, k 4, stride 1: total 3, the odd pixel at the end (UPPER) or the beginning (LOWER)
    assert same_pads([6], [4], [1], [1], upper=True) == [1, 2]
    assert same_pads([6], [4], [1], [1], upper=False) == [2, 1]
    assert same_pads([6], [3], [1], [2], upper=True) == [2, 2]  # dilated kernel spans 5
    assert same_pads([None, 9], [2, 3], [1, 1], [1, 1], upper=True) == [0, 1, 1, 1]  # dynamic at stride 1
