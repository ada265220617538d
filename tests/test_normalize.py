"""Normalization: checks, opset upgrade, constant folding, Identity removal, shapes."""
from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from eptq_onnx.graph import model_io
from eptq_onnx.errors import ModelError
from eptq_onnx.graph.normalize import normalize_model, upgrade_opset

RNG = np.random.default_rng(0)


def _model(nodes, inputs, outputs, initializers=(), opset: int = 13) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = model_io.ir_version_for(opset)
    return model


def _const(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(array, name)


def _float_info(name: str, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _assert_same_outputs(before: onnx.ModelProto, after: onnx.ModelProto, feeds: dict) -> None:
    for old, new in zip(_run(before, feeds), _run(after, feeds), strict=True):
        np.testing.assert_allclose(new, old, rtol=1e-5, atol=1e-6)


def _ops(model: onnx.ModelProto) -> list[str]:
    return [node.op_type for node in model.graph.node]


def _names(infos) -> list[str]:
    return [info.name for info in infos]


def _dims(info: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in info.type.tensor_type.shape.dim]


# ---------------------------------------------------------------- Identity removal


def test_identities_removed_and_output_names_kept() -> None:
    """x -> Identity -> Relu -> Identity -> y, plus an Identity output fed by the Relu."""
    model = _model(
        [
            helper.make_node("Identity", ["x"], ["a"]),
            helper.make_node("Relu", ["a"], ["r"]),
            helper.make_node("Identity", ["r"], ["y"]),
            helper.make_node("Sigmoid", ["r"], ["s"]),
            helper.make_node("Identity", ["s"], ["z"]),
        ],
        [_float_info("x", [2, 3])],
        [_float_info("y", [2, 3]), _float_info("z", [2, 3])],
    )
    result = normalize_model(model)
    assert "Identity" not in _ops(result)
    assert _names(result.graph.output) == ["y", "z"]
    x = RNG.standard_normal((2, 3)).astype(np.float32)
    _assert_same_outputs(model, result, {"x": x})


def test_identity_between_graph_input_and_output_stays() -> None:
    model = _model(
        [helper.make_node("Identity", ["x"], ["y"]), helper.make_node("Relu", ["x"], ["r"])],
        [_float_info("x", [2])],
        [_float_info("y", [2]), _float_info("r", [2])],
    )
    result = normalize_model(model)
    assert _names(result.graph.input) == ["x"] and _names(result.graph.output) == ["y", "r"]
    _assert_same_outputs(model, result, {"x": np.array([-1.0, 2.0], np.float32)})


def test_identities_around_if_branches() -> None:
    """An outer Identity read inside a branch goes; a branch returning an outer value keeps its own."""

    def branch(nodes: list[onnx.NodeProto]) -> onnx.GraphProto:
        return helper.make_graph(nodes, "branch", [], [_float_info("o", [2])])

    then_branch = branch([helper.make_node("Identity", ["a"], ["i"]), helper.make_node("Relu", ["i"], ["o"])])
    else_branch = branch([helper.make_node("Identity", ["n"], ["o"])])
    model = _model(
        [
            helper.make_node("Identity", ["x"], ["a"]),
            helper.make_node("Neg", ["x"], ["n"]),
            helper.make_node("ReduceSum", ["a"], ["sum"], keepdims=0),
            helper.make_node("Greater", ["sum", "zero"], ["cond"]),
            helper.make_node("If", ["cond"], ["y"], then_branch=then_branch, else_branch=else_branch),
        ],
        [_float_info("x", [2])],
        [_float_info("y", [2])],
        [_const("zero", np.array(0.0, np.float32))],
    )
    result = normalize_model(model)
    if_node = next(n for n in result.graph.node if n.op_type == "If")
    branches = {a.name: [n.op_type for n in a.g.node] for a in if_node.attribute}
    assert branches == {"then_branch": ["Relu"], "else_branch": ["Identity"]}
    assert "Identity" not in _ops(result)
    for x in ([1.0, -3.0], [-5.0, 1.0]):
        _assert_same_outputs(model, result, {"x": np.array(x, np.float32)})


# ---------------------------------------------------------------- constant folding


def _paddle_style_model() -> onnx.ModelProto:
    """Opset 11, weights in Constant nodes, Shape->Gather->Unsqueeze->Concat->Reshape flatten."""
    weight = RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)
    bias = RNG.standard_normal(4).astype(np.float32)

    def constant(name: str, array: np.ndarray) -> onnx.NodeProto:
        return helper.make_node("Constant", [], [name], value=_const(name + "_value", array))

    nodes = [
        constant("conv_w", weight),
        constant("conv_b", bias),
        helper.make_node("Conv", ["x", "conv_w", "conv_b"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node("Shape", ["relu"], ["shape"]),
        constant("zero", np.array(0, np.int64)),
        helper.make_node("Gather", ["shape", "zero"], ["batch"], axis=0),
        helper.make_node("Unsqueeze", ["batch"], ["batch_1d"], axes=[0]),
        constant("minus_one", np.array([-1], np.int64)),
        helper.make_node("Concat", ["batch_1d", "minus_one"], ["new_shape"], axis=0),
        helper.make_node("Reshape", ["relu", "new_shape"], ["y"]),
    ]
    return _model(nodes, [_float_info("x", [1, 3, 8, 8])], [_float_info("y", [1, 256])], opset=11)


def test_paddle_style_model_is_folded_and_upgraded() -> None:
    model = _paddle_style_model()
    result = normalize_model(model)
    assert _ops(result) == ["Conv", "Relu", "Reshape"]
    assert model_io.default_opset(result) == 13
    assert sorted(t.name for t in result.graph.initializer) == ["conv_b", "conv_w", "new_shape"]
    new_shape = next(t for t in result.graph.initializer if t.name == "new_shape")
    assert numpy_helper.to_array(new_shape).tolist() == [1, -1]
    onnx.checker.check_model(result, full_check=True)
    _assert_same_outputs(model, result, {"x": RNG.standard_normal((1, 3, 8, 8)).astype(np.float32)})


def test_dynamic_batch_kept_and_static_dims_folded() -> None:
    model = _paddle_style_model()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    result = normalize_model(model)
    assert _dims(result.graph.input[0]) == ["batch", 3, 8, 8]
    assert _dims(result.graph.output[0]) == ["batch", 256]
    assert "Shape" in _ops(result)  # the batch size is only known at run time
    _assert_same_outputs(model, result, {"x": RNG.standard_normal((5, 3, 8, 8)).astype(np.float32)})


def test_intermediate_tensors_get_shapes() -> None:
    result = normalize_model(_paddle_style_model())
    shapes = {vi.name: _dims(vi) for vi in result.graph.value_info}
    assert shapes["conv"] == [1, 4, 8, 8] and shapes["relu"] == [1, 4, 8, 8]


# ---------------------------------------------------------------- opsets and checks


def test_opset_12_upgraded_to_13() -> None:
    model = _model(
        [helper.make_node("Squeeze", ["x"], ["y"], axes=[0])],
        [_float_info("x", [1, 3])],
        [_float_info("y", [3])],
        opset=12,
    )
    result = normalize_model(model)
    assert model_io.default_opset(result) == 13
    assert result.ir_version == model_io.ir_version_for(13)
    _assert_same_outputs(model, result, {"x": np.ones((1, 3), np.float32)})


def test_upgrade_opset_to_21() -> None:
    model = normalize_model(_paddle_style_model())
    upgraded = upgrade_opset(model, 21)
    assert model_io.default_opset(upgraded) == 21 and upgraded.ir_version == 10
    assert upgrade_opset(upgraded, 13) is upgraded
    _assert_same_outputs(model, upgraded, {"x": np.ones((1, 3, 8, 8), np.float32)})


def test_opset_9_refused() -> None:
    relu = helper.make_node("Relu", ["x"], ["y"])
    model = _model([relu], [_float_info("x", [2])], [_float_info("y", [2])], opset=9)
    with pytest.raises(ModelError, match="opset 9 is older than 11: re-export with opset >= 13"):
        normalize_model(model)


def _wrong_rank_output_model() -> onnx.ModelProto:
    """MatMul then Reshape to rank 3, the graph output declared rank 2 (an exporter's stale shape)."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Reshape", ["m", "s"], ["y"])]
    consts = [_const("w", RNG.standard_normal((8, 8)).astype(np.float32)), _const("s", np.array([0, 2, -1], np.int64))]
    return _model(nodes, [_float_info("x", ["n", 8])], [_float_info("y", [1, "seq"])], consts)


def test_output_declared_with_the_wrong_rank_takes_the_inferred_shape() -> None:
    model = _wrong_rank_output_model()
    with pytest.raises(onnx.shape_inference.InferenceError, match="differ in rank"):
        onnx.checker.check_model(model, full_check=True)
    result = normalize_model(model)
    assert _dims(result.graph.output[0]) == ["n", 2, 4]
    _assert_same_outputs(model, result, {"x": RNG.standard_normal((3, 8)).astype(np.float32)})
    assert _dims(upgrade_opset(result, 21).graph.output[0]) == ["n", 2, 4]


def test_checker_failure_is_a_model_error() -> None:
    model = _model(
        [helper.make_node("Add", ["x", "missing"], ["y"])], [_float_info("x", [2])], [_float_info("y", [2])]
    )
    with pytest.raises(ModelError, match="onnx.checker") as info:
        normalize_model(model)
    assert "\n" not in str(info.value) and "missing" in str(info.value)


def test_large_model_checked_from_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model_io, "EXTERNAL_DATA_THRESHOLD", 0)
    result = normalize_model(_paddle_style_model())
    assert _ops(result) == ["Conv", "Relu", "Reshape"]


# ---------------------------------------------------------------- inputs, types, custom ops


def test_initializer_listed_as_input_is_dropped() -> None:
    weight = RNG.standard_normal((3, 2)).astype(np.float32)
    model = _model(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        [_float_info("x", ["N", 3]), _float_info("W", [3, 2])],
        [_float_info("y", ["N", 2])],
        [_const("W", weight)],
    )
    result = normalize_model(model)
    assert _names(result.graph.input) == ["x"]
    assert _names(result.graph.initializer) == ["W"]
    _assert_same_outputs(model, result, {"x": np.ones((4, 3), np.float32)})


def test_int64_input_kept() -> None:
    table = RNG.standard_normal((10, 4)).astype(np.float32)
    model = _model(
        [helper.make_node("Gather", ["table", "ids"], ["y"], axis=0)],
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N"])],
        [_float_info("y", ["N", 4])],
        [_const("table", table)],
    )
    result = normalize_model(model)
    assert result.graph.input[0].type.tensor_type.elem_type == TensorProto.INT64
    assert _dims(result.graph.input[0]) == ["N"]
    _assert_same_outputs(model, result, {"ids": np.array([3, 1, 9], np.int64)})


def test_custom_domain_op_passes_through() -> None:
    """Custom ops stay (even on constant inputs), and the rest is still folded."""
    model = _model(
        [
            helper.make_node("Constant", [], ["c"], value=_const("c_value", np.ones(2, np.float32))),
            helper.make_node("Mystery", ["c"], ["w"], domain="com.example", alpha=0.5),
            helper.make_node("Relu", ["x"], ["r"]),
            helper.make_node("Identity", ["r"], ["i"]),
            helper.make_node("Mystery", ["i", "w"], ["m"], domain="com.example"),
            helper.make_node("Sigmoid", ["m"], ["y"]),
        ],
        [_float_info("x", [2])],
        [_float_info("y", [2])],
    )
    model.opset_import.append(helper.make_opsetid("com.example", 3))
    result = normalize_model(model)
    assert sorted(_ops(result)) == ["Mystery", "Mystery", "Relu", "Sigmoid"]
    assert _names(result.graph.initializer) == ["c"]
    assert {(o.domain, o.version) for o in result.opset_import} == {("", 13), ("com.example", 3)}


def test_torch_export_is_cleaned_and_argument_untouched() -> None:
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU()).eval()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, (torch.randn(1, 3, 8, 8),), buffer, dynamo=False, opset_version=13,
            training=torch.onnx.TrainingMode.PRESERVE, input_names=["x"], output_names=["y"],
            dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
        )
    model = onnx.load_from_string(buffer.getvalue())
    before = model.SerializeToString()
    result = normalize_model(model)
    assert model.SerializeToString() == before
    assert _ops(result) == ["Conv", "BatchNormalization", "Relu"]
    _assert_same_outputs(model, result, {"x": RNG.standard_normal((2, 3, 8, 8)).astype(np.float32)})
