"""Position axes (layout.py) on hand-built graphs and on the zoo's CNN, transformer and NHWC models."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from eptq_onnx.graph.layout import position_axes
from eptq_onnx.graph.normalize import normalize_model
from models import zoo


def _model(nodes, inputs, inits, opset=13) -> onnx.ModelProto:
    """Every node output is a graph output, so every tensor gets an inferred shape."""
    outputs = [o for n in nodes for o in n.output]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
        initializer=[numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return onnx.shape_inference.infer_shapes(model)


def _axes(model: onnx.ModelProto) -> dict:
    names = [o for n in model.graph.node for o in n.output]
    return position_axes(model, names).axes


CONV_W = np.ones((4, 3, 3, 3), np.float32)
LIN_W = np.ones((4, 6), np.float32)


def test_conv_family_is_channels_first_and_elementwise_ops_pass_it_on() -> None:
    m = _model([helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["r"]),
                helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
                helper.make_node("GlobalAveragePool", ["p"], ["g"]), helper.make_node("Flatten", ["g"], ["f"])],
               [("x", ["N", 3, 8, 8])], {"w": CONV_W})
    assert _axes(m) == {"c": (2, 3), "r": (2, 3), "p": (2, 3), "g": (), "f": ()}  # size-1 axes dropped


def test_matmul_with_a_weight_shares_it_over_every_leading_axis() -> None:
    m = _model([helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("MatMul", ["t", "w"], ["z"]),
                helper.make_node("Gemm", ["v", "w"], ["g"])],
               [("x", ["N", 5, 4]), ("t", ["N", 7, 5, 4]), ("v", ["N", 4])], {"w": LIN_W})
    assert _axes(m) == {"y": (1,), "z": (1, 2), "g": ()}  # NHWC-style linear: both spatial axes


def test_activation_matmul_keeps_heads_apart() -> None:
    m = _model([helper.make_node("MatMul", ["q", "k"], ["s"]), helper.make_node("Softmax", ["s"], ["p"], axis=-1)],
               [("q", ["N", 2, 5, 8]), ("k", ["N", 2, 8, 5])], {})
    axes = _axes(m)
    assert axes == {"s": (2,), "p": (2,)}  # rows (queries) only: each head has its own projection


def test_transpose_permutes_and_nhwc_reduce_mean_drops_axes() -> None:
    m = _model([helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
                helper.make_node("Transpose", ["c"], ["t"], perm=[0, 2, 3, 1]),
                helper.make_node("ReduceMean", ["t"], ["m"], axes=[1], keepdims=0),
                helper.make_node("ReduceMean", ["t"], ["k"], axes=[2], keepdims=1)],
               [("x", ["N", 3, 8, 6])], {"w": CONV_W})
    assert _axes(m) == {"c": (2, 3), "t": (1, 2), "m": (1,), "k": (1,)}


def test_reduce_axes_given_as_an_input_at_opset_18() -> None:
    m = _model([helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("ReduceMean", ["y", "ax"], ["m"], keepdims=0)],
               [("x", ["N", 5, 3, 4])], {"w": LIN_W, "ax": np.array([2], np.int64)}, opset=18)
    assert _axes(m) == {"y": (1, 2), "m": (1,)}


def test_reshape_keeps_axes_only_where_the_leading_sizes_stay() -> None:
    m = _model([helper.make_node("MatMul", ["x", "w"], ["y"]),
                helper.make_node("Reshape", ["y", "heads"], ["h"]),  # [N,5,6] -> [N,5,2,3]: tokens stay
                helper.make_node("Reshape", ["y", "flat"], ["f"])],  # [N,5,6] -> [N,30]: tokens merged
               [("x", [1, 5, 4])], {"w": LIN_W, "heads": np.array([1, 5, 2, 3], np.int64), "flat": np.array([1, 30], np.int64)})
    layout = position_axes(m, ["y", "h", "f"])
    assert layout.axes == {"y": (1,), "h": (1,), "f": ()}
    assert layout.unknown == ["f"]  # made from a layer's output, but no rule tells: reported


def test_inputs_and_what_they_alone_make_are_not_unknown() -> None:
    """No weighted layer upstream: only independent activation rounding, the elementwise trace is right."""
    m = _model([helper.make_node("Relu", ["x"], ["r"]), helper.make_node("MatMul", ["r", "w"], ["y"]),
                helper.make_node("Relu", ["x2"], ["r2"]), helper.make_node("Add", ["y", "r2"], ["s"])],
               [("x", ["N", 5, 4]), ("x2", ["N", 5, 6])], {"w": LIN_W})
    layout = position_axes(m, ["r", "y", "s"])
    assert layout.axes == {"r": (), "y": (1,), "s": (1,)} and layout.unknown == []


def test_a_sum_is_correlated_only_along_the_axes_all_its_terms_share() -> None:
    m = _model([helper.make_node("MatMul", ["x", "w"], ["y"]),  # [N,5,6] rows: axis 1
                helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 1]),
                helper.make_node("MatMul", ["xt", "w5"], ["z"]),  # [N,4,5]: axis 1 = the features
                helper.make_node("Transpose", ["z"], ["zt"], perm=[0, 2, 1]),  # [N,5,4]: axis 2
                helper.make_node("Add", ["zt", "x"], ["mix"]), helper.make_node("MatMul", ["mix", "w"], ["m2"]),
                helper.make_node("Add", ["m2", "y"], ["s"])],
               [("x", ["N", 5, 4])], {"w": LIN_W, "w5": np.ones((5, 5), np.float32)})
    axes = _axes(m)
    assert axes["zt"] == (2,) and axes["mix"] == (2,)  # the input adds no error: the token MLP's axes
    assert axes["s"] == (1,)
    m2 = _model([helper.make_node("MatMul", ["x", "w4"], ["y"]), helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 1]),
                 helper.make_node("MatMul", ["xt", "w5"], ["z"]), helper.make_node("Transpose", ["z"], ["zt"], perm=[0, 2, 1]),
                 helper.make_node("Add", ["y", "zt"], ["s"])],
                [("x", ["N", 5, 4])], {"w4": np.ones((4, 4), np.float32), "w5": np.ones((5, 5), np.float32)})
    assert _axes(m2)["s"] == ()  # rows (1,) + features (2,): no axis common to both


def test_recurrent_and_opaque_ops_are_unknown() -> None:
    m = _model([helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Einsum", ["y"], ["e"], equation="bti->bit")],
               [("x", ["N", 5, 4])], {"w": LIN_W})
    layout = position_axes(m, ["y", "e"])
    assert layout.axes["e"] == () and layout.unknown == ["e"]


@pytest.mark.parametrize("name, expected", [
    ("residual_cnn", {"Conv": (2, 3), "Relu": (2, 3), "GlobalAveragePool": (), "Gemm": ()}),
    ("nhwc_tf_style", {"Relu": (2, 3), "ReduceMean": (), "MatMul": ()}),
    ("transformer_block", {"MatMul": None, "LayerNormalization": None, "Softmax": (2,)}),
])
def test_zoo_models(name: str, expected: dict) -> None:
    """Every quantization point of the zoo's models gets axes from a rule (none unknown)."""
    model = normalize_model(zoo.ZOO[name]())
    names = [o for n in model.graph.node for o in n.output]
    layout = position_axes(model, names)
    assert layout.unknown == []
    ops = {o: n.op_type for n in model.graph.node for o in n.output}
    for tensor, axes in layout.axes.items():
        if expected.get(ops[tensor]) is not None:
            assert axes == expected[ops[tensor]], tensor
    if name == "transformer_block":
        projections = [t for t, op in ops.items() if op == "MatMul" and len(layout.axes[t]) == 1]
        assert {layout.axes[t] for t in projections} == {(1,), (2,)}  # token rows; attention rows (queries)
