"""Batch-norm folding: every foldable layer type gives onnxruntime outputs equal to the unfolded model."""
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
from eptq_onnx.graph.fold_bn import fold_batch_norms
from eptq_onnx.graph.normalize import normalize_model

RNG = np.random.default_rng(0)


# ---------------------------------------------------------------- helpers


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _ops(model: onnx.ModelProto) -> list[str]:
    return [node.op_type for node in model.graph.node]


def _fold_and_compare(model: onnx.ModelProto, x: np.ndarray) -> tuple[onnx.ModelProto, list[str]]:
    """Fold, check the result, and compare outputs within 1e-4 relative."""
    folded, names = fold_batch_norms(model)
    onnx.checker.check_model(folded, full_check=True)
    assert [o.name for o in folded.graph.output] == [o.name for o in model.graph.output]
    expected, actual = _run(model, x), _run(folded, x)
    assert actual.shape == expected.shape
    assert np.max(np.abs(actual - expected)) <= 1e-4 * np.max(np.abs(expected))
    return folded, names


def _randomize_bn(module: torch.nn.Module) -> None:
    """Non-trivial running statistics and affine parameters on every BN."""
    generator = torch.Generator().manual_seed(0)
    for bn in module.modules():
        if isinstance(bn, torch.nn.modules.batchnorm._BatchNorm):
            shape = bn.running_mean.shape
            bn.running_mean.copy_(torch.randn(shape, generator=generator))
            bn.running_var.copy_(torch.rand(shape, generator=generator) * 2 + 0.1)
            bn.weight.data.copy_(torch.randn(shape, generator=generator))
            bn.bias.data.copy_(torch.randn(shape, generator=generator))


def _export(module: torch.nn.Module, shape: tuple[int, ...]) -> onnx.ModelProto:
    """Export in eval mode, keeping BNs (TrainingMode.PRESERVE skips torch's own Conv+BN fusion)."""
    with torch.no_grad():
        _randomize_bn(module)
    module.eval()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, (torch.randn(*shape),), buffer, dynamo=False, opset_version=13,
            training=torch.onnx.TrainingMode.PRESERVE, input_names=["x"], output_names=["y"],
        )
    model = normalize_model(onnx.load_from_string(buffer.getvalue()))
    assert "BatchNormalization" in _ops(model)
    return model


def _bn_nodes(
    channels: int, x: str, y: str, prefix: str = "bn"
) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    """A named BatchNormalization x -> y with random parameters, and those parameters."""
    params = {
        "scale": RNG.standard_normal(channels),
        "bias": RNG.standard_normal(channels),
        "mean": RNG.standard_normal(channels),
        "var": RNG.random(channels) + 0.1,
    }
    tensors = [numpy_helper.from_array(v.astype(np.float32), f"{prefix}_{k}") for k, v in params.items()]
    inputs = [x, *(t.name for t in tensors)]
    node = helper.make_node("BatchNormalization", inputs, [y], name=prefix, epsilon=1e-3)
    return node, tensors


def _graph_model(nodes, initializers, x_shape, y_shape) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = model_io.ir_version_for(13)
    return model


def _weight(name: str, *shape: int) -> onnx.TensorProto:
    return numpy_helper.from_array(RNG.standard_normal(shape).astype(np.float32), name)


# ---------------------------------------------------------------- torch layers


TORCH_CASES = {
    "conv2d": (lambda: torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8)), (2, 3, 9, 9)),
    "conv2d_no_bias": (
        lambda: torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, bias=False), torch.nn.BatchNorm2d(8)),
        (2, 3, 9, 9),
    ),
    "depthwise": (
        lambda: torch.nn.Sequential(torch.nn.Conv2d(6, 6, 3, groups=6), torch.nn.BatchNorm2d(6)), (1, 6, 7, 7)
    ),
    "grouped_conv1d": (
        lambda: torch.nn.Sequential(torch.nn.Conv1d(4, 6, 3, groups=2), torch.nn.BatchNorm1d(6)), (2, 4, 10)
    ),
    "conv_transpose": (
        lambda: torch.nn.Sequential(torch.nn.ConvTranspose2d(4, 6, 3, stride=2), torch.nn.BatchNorm2d(6)),
        (1, 4, 5, 5),
    ),
    "grouped_conv_transpose": (
        lambda: torch.nn.Sequential(
            torch.nn.ConvTranspose2d(4, 6, 3, groups=2, bias=False), torch.nn.BatchNorm2d(6)
        ),
        (2, 4, 5, 5),
    ),
    "linear": (lambda: torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.BatchNorm1d(7)), (4, 5)),
    "conv_bn_relu_twice": (
        lambda: torch.nn.Sequential(
            torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
            torch.nn.Conv2d(4, 5, 1), torch.nn.BatchNorm2d(5), torch.nn.ReLU(),
        ),
        (1, 3, 8, 8),
    ),
}


@pytest.mark.parametrize("case", sorted(TORCH_CASES))
def test_torch_layers_fold(case: str) -> None:
    make, shape = TORCH_CASES[case]
    model = _export(make(), shape)
    bn_count = _ops(model).count("BatchNormalization")
    folded, names = _fold_and_compare(model, RNG.standard_normal(shape).astype(np.float32))
    assert "BatchNormalization" not in _ops(folded)
    assert len(names) == bn_count


# ---------------------------------------------------------------- Gemm and MatMul graphs


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("bias_shape", [None, (6,), (1, 6), ()])
def test_gemm_folds(trans_b: int, bias_shape: tuple[int, ...] | None) -> None:
    weight = _weight("B", *((6, 5) if trans_b else (5, 6)))
    inputs, initializers = ["x", "B"], [weight]
    if bias_shape is not None:
        initializers.append(_weight("C", *bias_shape))
        inputs.append("C")
    gemm = helper.make_node("Gemm", inputs, ["h"], transB=trans_b, alpha=0.7, beta=1.3)
    bn, params = _bn_nodes(6, "h", "y")
    model = _graph_model([gemm, bn], initializers + params, [3, 5], [3, 6])
    folded, names = _fold_and_compare(model, RNG.standard_normal((3, 5)).astype(np.float32))
    assert _ops(folded) == ["Gemm"] and names == ["bn"]
    assert folded.graph.node[0].output == ["y"]
    assert not {p.name for p in params} & {t.name for t in folded.graph.initializer}


def test_matmul_with_2d_input_becomes_gemm() -> None:
    matmul = helper.make_node("MatMul", ["x", "B"], ["h"], name="mm")
    bn, params = _bn_nodes(6, "h", "y")
    model = _graph_model([matmul, bn], [_weight("B", 5, 6), *params], ["N", 5], ["N", 6])
    folded, names = _fold_and_compare(model, RNG.standard_normal((4, 5)).astype(np.float32))
    assert _ops(folded) == ["Gemm"] and names == ["bn"]


def test_matmul_with_3d_input_is_left_alone() -> None:
    """BN's channel axis 1 is the sequence axis here, not the MatMul output channel."""
    matmul = helper.make_node("MatMul", ["x", "B"], ["h"])
    bn, params = _bn_nodes(6, "h", "y")
    model = _graph_model([matmul, bn], [_weight("B", 5, 6), *params], [2, 6, 5], [2, 6, 6])
    folded, names = fold_batch_norms(model)
    assert names == [] and _ops(folded) == ["MatMul", "BatchNormalization"]


# ---------------------------------------------------------------- cases that must not fold


def test_layer_output_with_another_consumer_is_left_alone() -> None:
    conv = helper.make_node("Conv", ["x", "W"], ["h"])
    bn, params = _bn_nodes(4, "h", "b")
    add = helper.make_node("Add", ["h", "b"], ["y"])
    model = _graph_model([conv, bn, add], [_weight("W", 4, 3, 1, 1), *params], [1, 3, 4, 4], [1, 4, 4, 4])
    folded, names = fold_batch_norms(model)
    assert names == [] and _ops(folded) == ["Conv", "BatchNormalization", "Add"]


def test_non_constant_weight_is_left_alone() -> None:
    graph_input = helper.make_tensor_value_info("W", TensorProto.FLOAT, [4, 3, 1, 1])
    conv = helper.make_node("Conv", ["x", "W"], ["h"])
    bn, params = _bn_nodes(4, "h", "y")
    model = _graph_model([conv, bn], params, [1, 3, 4, 4], [1, 4, 4, 4])
    model.graph.input.append(graph_input)
    folded, names = fold_batch_norms(model)
    assert names == [] and "BatchNormalization" in _ops(folded)


def test_shared_weight_gets_a_copy_per_fold() -> None:
    nodes, initializers = [], [_weight("W", 4, 3, 1, 1)]
    for branch in ("a", "b"):
        nodes.append(helper.make_node("Conv", ["x", "W"], [f"conv_{branch}"], name=f"conv_{branch}"))
        bn, params = _bn_nodes(4, f"conv_{branch}", f"bn_{branch}", prefix=f"bn_{branch}")
        nodes.append(bn)
        initializers += params
    nodes.append(helper.make_node("Add", ["bn_a", "bn_b"], ["y"]))
    model = _graph_model(nodes, initializers, [1, 3, 4, 4], [1, 4, 4, 4])
    folded, names = _fold_and_compare(model, RNG.standard_normal((1, 3, 4, 4)).astype(np.float32))
    assert sorted(names) == ["bn_a", "bn_b"] and _ops(folded) == ["Conv", "Conv", "Add"]
    weights = {node.input[1] for node in folded.graph.node if node.op_type == "Conv"}
    assert len(weights) == 2


def test_input_model_is_not_changed() -> None:
    conv = helper.make_node("Conv", ["x", "W"], ["h"])
    bn, params = _bn_nodes(4, "h", "y")
    model = _graph_model([conv, bn], [_weight("W", 4, 3, 1, 1), *params], [1, 3, 4, 4], [1, 4, 4, 4])
    before = model.SerializeToString()
    fold_batch_norms(model)
    assert model.SerializeToString() == before
