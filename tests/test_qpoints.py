"""Quantization points (paper A.1) on small hand-built graphs."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from eptq_onnx.plan.qpoints import build_plan


def _model(nodes, inputs, outputs, inits, opset=13, domains=()) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
        initializer=[numpy_helper.from_array(np.asarray(v, dtype=np.float32), k) for k, v in inits.items()],
    )
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in domains]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    return onnx.shape_inference.infer_shapes(model)


def _points(plan) -> dict:
    return {t: g.id for g in plan.groups for t in g.tensors}


W = np.ones((4, 3, 1, 1))
B = np.zeros(4)


def test_conv_relu_fused_point_after_relu_and_input_quantized() -> None:
    m = _model(
        [helper.make_node("Conv", ["x", "w", "b"], ["c"]), helper.make_node("Relu", ["c"], ["r"]),
         helper.make_node("Conv", ["r", "w2"], ["y"])],
        [("x", [1, 3, 4, 4])], ["y"], {"w": W, "b": B, "w2": np.ones((2, 4, 1, 1))},
    )
    plan = build_plan(m)
    assert set(_points(plan)) == {"x", "r"}  # not "c"; output "y" stays float
    assert [(w.weight, w.axis, w.bias, w.input) for w in plan.weights] == [("w", 0, "b", "x"), ("w2", 0, None, "r")]
    assert set(_points(build_plan(m, quantize_outputs=True))) == {"x", "r", "y"}


def test_silu_and_gelu_composites_get_one_point_at_their_end() -> None:
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["m"]),
        helper.make_node("Sigmoid", ["m"], ["sig"]),
        helper.make_node("Mul", ["m", "sig"], ["silu"]),
        helper.make_node("Div", ["silu", "sqrt2"], ["d"]),
        helper.make_node("Erf", ["d"], ["e"]),
        helper.make_node("Add", ["e", "one"], ["e1"]),
        helper.make_node("Mul", ["silu", "e1"], ["g"]),
        helper.make_node("Mul", ["g", "half"], ["gelu"]),
        helper.make_node("MatMul", ["gelu", "w2"], ["y"]),
    ]
    m = _model(nodes, [("x", [2, 8])], ["y"], {"w": np.ones((8, 8)), "w2": np.ones((8, 3)), "sqrt2": 1.41, "one": 1.0, "half": 0.5})
    plan = build_plan(m)
    assert set(_points(plan)) == {"x", "gelu"}
    assert plan.weights[0].axis == 1  # MatMul constant B [K, N]: channels on N


def test_residual_add_relu_and_data_movement_share_the_grid() -> None:
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["a"]),
        helper.make_node("Add", ["a", "a2"], ["s"]),
        helper.make_node("Relu", ["s"], ["r"]),
        helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2]),
        helper.make_node("Reshape", ["p", "shape"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fw"], ["y"], transB=1),
    ]
    m = _model(nodes, [("x", [1, 3, 4, 4]), ("a2", [1, 4, 4, 4])], ["y"], {"w": W, "fw": np.ones((5, 16))})
    m.graph.initializer.append(numpy_helper.from_array(np.array([1, 16], dtype=np.int64), "shape"))
    m = onnx.shape_inference.infer_shapes(m)
    points = _points(build_plan(m))
    assert "s" not in points and "a" in points  # Add fused with its Relu
    assert points["r"] == points["p"] == points["flat"]  # MaxPool/Reshape share r's parameters
    plan = build_plan(m)
    assert plan.weights[-1].axis == 0  # Gemm transB=1: [N, K]


def test_global_pool_before_gemm_gets_a_point_and_gemm_axis_without_transb() -> None:
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"]),
        helper.make_node("GlobalAveragePool", ["c"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["f"]),
        helper.make_node("Gemm", ["f", "fw"], ["y"]),
    ]
    plan = build_plan(_model(nodes, [("x", [1, 3, 4, 4])], ["y"], {"w": W, "fw": np.ones((4, 5))}))
    points = _points(plan)
    assert points["gap"] == points["f"]
    assert plan.weights[-1].axis == 1


def test_activation_matmul_softmax_and_layernorm_points() -> None:
    nodes = [
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["s"]),
        helper.make_node("Softmax", ["s"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "v"], ["o"]),
        helper.make_node("LayerNormalization", ["o", "gamma", "beta"], ["ln"], axis=-1),
        helper.make_node("MatMul", ["ln", "w"], ["y"]),
    ]
    m = _model(nodes, [("q", [1, 4, 8]), ("k", [1, 4, 8]), ("v", [1, 4, 8])], ["y"],
               {"gamma": np.ones(8), "beta": np.zeros(8), "w": np.ones((8, 2))}, opset=17)
    points = _points(build_plan(m))
    assert {"q", "k", "kt", "s", "p", "v", "o", "ln"} <= set(points)
    assert points["k"] == points["kt"]


def test_concat_sole_use_inputs_share_the_concat_scale() -> None:
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["a"]),
        helper.make_node("Conv", ["x", "w"], ["b"]),
        helper.make_node("Concat", ["a", "b"], ["c"], axis=1),
        helper.make_node("Conv", ["c", "w3"], ["y"]),
    ]
    plan = build_plan(_model(nodes, [("x", [1, 3, 4, 4])], ["y"], {"w": W, "w3": np.ones((2, 8, 1, 1))}))
    points = _points(plan)
    assert points["a"] == points["b"] == points["c"]
    group = next(g for g in plan.groups if "c" in g.tensors)
    assert set(group.roots) == {"a", "b", "c"}
    assert len(plan.weights) == 3 and plan.weights[0].weight == plan.weights[1].weight


def test_unknown_and_custom_ops_stay_float_and_are_listed() -> None:
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"]),
        helper.make_node("MyOp", ["c"], ["u"], domain="com.example"),
        helper.make_node("Conv", ["u", "w2"], ["y"]),
    ]
    m = _model(nodes, [("x", [1, 3, 4, 4])], ["y"], {"w": W, "w2": np.ones((2, 4, 1, 1))}, domains=["com.example"])
    m.graph.value_info.append(helper.make_tensor_value_info("u", TensorProto.FLOAT, [1, 4, 4, 4]))
    plan = build_plan(m)
    assert [(op, why) for _, op, why in plan.float_ops] == [("MyOp", "custom domain com.example")]
    assert {"x", "c", "u"} <= set(_points(plan))  # u is read by a Conv


def test_conv_transpose_axis_and_embedding_gather() -> None:
    nodes = [helper.make_node("ConvTranspose", ["x", "w"], ["y"])]
    plan = build_plan(_model(nodes, [("x", [1, 3, 4, 4])], ["y"], {"w": np.ones((3, 5, 2, 2))}))
    assert plan.weights[0].axis == 1
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["e"]), helper.make_node("MatMul", ["e", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(np.ones((10, 4), np.float32), "table"),
                     numpy_helper.from_array(np.ones((4, 2), np.float32), "w")],
    )
    m = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    plan = build_plan(m)
    assert [(w.weight, w.op_type) for w in plan.weights] == [("table", "Gather"), ("w", "MatMul")]
    assert set(_points(plan)) == {"e"}  # int ids are never quantized


def test_a_detector_head_after_its_last_quantized_layer_stays_float() -> None:
    # Conv -> SiLU -> head Conv -> Split: Softmax -> DFL Conv -> decode (Sub, Add, Concat, Mul by strides),
    # Sigmoid scores; Concat of boxes and scores is the output. Only what feeds a Conv is quantized.
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"]), helper.make_node("Sigmoid", ["c"], ["s"]),
        helper.make_node("Mul", ["c", "s"], ["f"]),
        helper.make_node("Conv", ["f", "wh"], ["h"]),
        helper.make_node("Split", ["h"], ["box", "cls"], axis=1, split=[4, 2]),
        helper.make_node("Softmax", ["box"], ["p"], axis=1),
        helper.make_node("Conv", ["p", "dfl"], ["d"]),
        helper.make_node("Sub", ["grid", "d"], ["x1"]), helper.make_node("Add", ["grid", "d"], ["x2"]),
        helper.make_node("Add", ["x1", "x2"], ["sum"]), helper.make_node("Sub", ["x2", "x1"], ["wide"]),
        helper.make_node("Concat", ["sum", "wide"], ["xywh"], axis=1),
        helper.make_node("Mul", ["xywh", "stride"], ["pix"]),
        helper.make_node("Sigmoid", ["cls"], ["prob"]),
        helper.make_node("Concat", ["pix", "prob"], ["y"], axis=1),
    ]
    inits = {"w": W, "b": B, "wh": np.ones((6, 4, 1, 1)), "dfl": np.ones((1, 4, 1, 1)), "grid": np.ones((1, 1, 4, 4)),
             "stride": 8.0}
    m = _model(nodes, [("x", [1, 3, 4, 4])], ["y"], inits, opset=11)
    points = _points(build_plan(m))
    assert set(points) == {"x", "f", "h", "box", "cls", "p"}  # the Convs' inputs, and the logits the Softmax reads
    assert points["cls"] == points["h"]  # the scores' Sigmoid reads the Split of the quantized logits
    assert {"h", "sum", "pix", "prob", "y"} <= set(_points(build_plan(m, quantize_outputs=True)))


def test_points_that_only_feed_a_float_recurrent_op_are_dropped() -> None:
    """An LSTM stays float: its state inputs and its input get no point (no integer kernel reads them;
    rounded state carried through every step costs fidelity), the Gemms around it keep theirs."""
    from eptq_onnx.graph.normalize import normalize_model
    from models.zoo_recurrent import stateful_lstm

    model = normalize_model(stateful_lstm())
    plan = build_plan(model)
    roots = {r for g in plan.groups for r in g.roots}
    lstm = next(n for n in model.graph.node if n.op_type == "LSTM")
    assert not roots & {"h", "c", lstm.input[0]}
    assert "input" in roots and lstm.output[0] in roots  # the first Gemm's input, the head Gemm's input
    assert {w.weight for w in plan.weights} == {"encoder.0.weight", "head.weight"}
