"""to_torch: the fx twin computes what onnxruntime computes, for every tensor, op version and zoo model."""
from __future__ import annotations

import copy
import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper, version_converter

from eptq_onnx.graph import model_io

from eptq_onnx.twin import convert as torch_convert
from eptq_onnx.twin.modules import REDUCE_OPS
from eptq_onnx.errors import ModelError
from eptq_onnx.graph.fold_bn import fold_batch_norms
from eptq_onnx.graph.normalize import normalize_model
from eptq_onnx.twin.convert import input_names, onnx_names, output_names, to_torch, with_outputs
from eptq_onnx.twin.weighted import GatherOp, WeightedOp
from models import zoo

RTOL, ATOL = 1e-4, 1e-5
WEIGHTED_TYPES = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Gather")


# ---------------------------------------------------------------- helpers


@functools.lru_cache(maxsize=None)
def _zoo_model(name: str) -> onnx.ModelProto:
    """A zoo model, normalized and BN-folded (as the pipeline feeds to_torch)."""
    return fold_batch_norms(normalize_model(zoo.ZOO[name]()))[0]


@functools.lru_cache(maxsize=None)
def _upgraded(name: str, opset: int) -> onnx.ModelProto:
    model = version_converter.convert_version(_zoo_model(name), opset)
    model.ir_version = model_io.ir_version_for(opset)
    return normalize_model(model)


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _float_node_outputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Typed value infos of every float tensor a node produces (fails on an untyped one)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v for v in [*inferred.graph.value_info, *inferred.graph.output]}
    infos = []
    for node in model.graph.node:
        for name in filter(None, node.output):
            assert name in types, f"no inferred type for {name}"
            if types[name].type.tensor_type.elem_type == TensorProto.FLOAT:
                infos.append(types[name])
    return infos


def _ort_values(model: onnx.ModelProto, feeds: dict[str, np.ndarray], infos: list[onnx.ValueInfoProto]) -> list[np.ndarray]:
    """onnxruntime's values of the tensors in ``infos`` (added as graph outputs)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend(infos)
    return _session(probe).run(None, feeds)


def _fx_values(gm: torch.fx.GraphModule, feeds: dict[str, np.ndarray], names: Sequence[str]) -> list[np.ndarray]:
    view = with_outputs(gm, names)
    with torch.no_grad():
        values = view(*[torch.from_numpy(feeds[name]) for name in input_names(gm)])
    return [v.numpy() for v in values]


def _run_fx(gm: torch.fx.GraphModule, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    with torch.no_grad():
        out = gm(*[torch.from_numpy(np.asarray(feeds[name])) for name in input_names(gm)])
    return [o.numpy() for o in (out if isinstance(out, tuple) else (out,))]


def _assert_close(actual: np.ndarray, expected: np.ndarray, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    np.testing.assert_allclose(actual.astype(np.float64), expected.astype(np.float64), RTOL, ATOL, err_msg=what)


def _assert_every_tensor_matches(model: onnx.ModelProto) -> None:
    """Every float tensor a node produces: fx value == onnxruntime value."""
    feeds = zoo.sample_inputs(model, 3)
    infos = _float_node_outputs(model)
    names = [info.name for info in infos]
    gm = to_torch(model)
    for name, actual, expected in zip(names, _fx_values(gm, feeds, names), _ort_values(model, feeds, infos)):
        _assert_close(actual, expected, name)
    for name, actual, expected in zip(output_names(gm), _run_fx(gm, feeds), _session(model).run(None, feeds)):
        _assert_close(actual, expected, f"output {name}")


def _weighted_ops(gm: torch.fx.GraphModule) -> list[WeightedOp]:
    return [m for m in gm.modules() if isinstance(m, WeightedOp)]


def _finish(graph: onnx.GraphProto, opset: int) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    return model


def _float(*shape: int, bound: float | None = None) -> np.ndarray:
    """Deterministic float32 data: standard normal, or uniform in (-bound, bound)."""
    rng = np.random.default_rng(sum(shape))
    if bound is not None:
        return rng.uniform(-bound, bound, shape).astype(np.float32)
    return rng.standard_normal(shape).astype(np.float32)


def _ints(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


# ---------------------------------------------------------------- zoo models


@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_zoo_every_tensor_matches_onnxruntime(name: str) -> None:
    _assert_every_tensor_matches(_zoo_model(name))


@pytest.mark.parametrize("opset", [21, 26])
@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_zoo_upgraded_opsets_match_onnxruntime(name: str, opset: int) -> None:
    model = _upgraded(name, opset)
    assert model_io.default_opset(model) == opset
    _assert_every_tensor_matches(model)


@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_weights_are_parameters_in_onnx_layout(name: str) -> None:
    model = _zoo_model(name)
    initializers = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    weighted_nodes = [
        node for node in model.graph.node
        if node.op_type in WEIGHTED_TYPES and any(
            name in initializers and initializers[name].dtype == np.float32
            for name in node.input[: 1 if node.op_type == "Gather" else 2])
    ]
    modules = _weighted_ops(to_torch(model))
    assert len(modules) == len(weighted_nodes)
    for module in modules:
        assert isinstance(module.weight, torch.nn.Parameter)
        np.testing.assert_array_equal(module.weight.detach().numpy(), initializers[module.weight_name])
        if module.bias is not None:
            assert isinstance(module.bias, torch.nn.Parameter)
            np.testing.assert_array_equal(module.bias.detach().numpy(), initializers[module.bias_name])


class _Zeros(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


@pytest.mark.parametrize("name", ["residual_cnn", "transformer_block", "token_model", "mlp"])
def test_quantizer_hooks_are_live(name: str) -> None:
    model = _zoo_model(name)
    gm = to_torch(model)
    feeds = zoo.sample_inputs(model, 2)
    before = _run_fx(gm, feeds)[0]
    modules = _weighted_ops(gm)
    for module in modules:
        module.weight_quant = _Zeros()
        assert not np.allclose(_run_fx(gm, feeds)[0], before), module.weight_name
        module.weight_quant = None
    biased = [m for m in modules if m.bias is not None]
    for module in biased:  # one bias alone may not matter (e.g. the key bias before a softmax)
        module.bias_quant = _Zeros()
    assert not biased or not np.allclose(_run_fx(gm, feeds)[0], before)
    for module in biased:
        module.bias_quant = None
    np.testing.assert_array_equal(_run_fx(gm, feeds)[0], before)


@pytest.mark.parametrize("name", ["residual_cnn", "transformer_block", "token_model", "multi_input"])
def test_backward_gives_weight_gradients(name: str) -> None:
    model = _zoo_model(name)
    gm = to_torch(model)
    feeds = zoo.sample_inputs(model, 2)
    out = gm(*[torch.from_numpy(feeds[n]) for n in input_names(gm)])
    loss = sum(o.square().sum() for o in (out if isinstance(out, tuple) else (out,)))
    loss.backward()
    for module in _weighted_ops(gm):
        assert module.weight.grad is not None and torch.isfinite(module.weight.grad).all()
        assert module.weight.grad.abs().sum() > 0, module.weight_name
        if isinstance(module, GatherOp):
            continue
        assert module.bias is None or module.bias.grad is not None


# ---------------------------------------------------------------- names, outputs, errors


def _split_graph() -> onnx.ModelProto:
    """Split (2 outputs), a Relu of one half, and graph outputs that repeat, reorder and pass through."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    nodes = [
        helper.make_node("Split", ["x"], ["s0", "s1"], axis=1),
        helper.make_node("Relu", ["s0"], ["r"]),
    ]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("s1", "r", "s0", "r", "x", "c")]
    graph = helper.make_graph(nodes, "split", [x], outputs, [numpy_helper.from_array(_float(3), "c")])
    return _finish(graph, 13)


def test_outputs_follow_onnx_order_with_duplicates_passthrough_and_constants() -> None:
    model = _split_graph()
    gm = to_torch(model)
    assert input_names(gm) == ["x"]
    assert output_names(gm) == ["s1", "r", "s0", "r", "x", "c"]
    feeds = {"x": _float(3, 4)}
    for actual, expected, name in zip(_run_fx(gm, feeds), _session(model).run(None, feeds), output_names(gm)):
        _assert_close(actual, expected, name)
    names = onnx_names(gm)
    assert {"x", "s0", "s1", "r"} <= set(names)
    assert names["x"].op == "placeholder"


def test_missing_getitem_nodes_are_created() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6])
    nodes = [helper.make_node("Split", ["x"], ["a", "b", "c"], axis=1), helper.make_node("Relu", ["a"], ["y"])]
    model = _finish(helper.make_graph(nodes, "g", [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]), 13)
    gm = to_torch(model)
    feeds = {"x": _float(2, 6)}
    c = _fx_values(gm, feeds, ["c", "b"])
    np.testing.assert_array_equal(c[0], feeds["x"][:, 4:])
    np.testing.assert_array_equal(c[1], feeds["x"][:, 2:4])
    assert output_names(gm) == ["y"]  # the module itself is unchanged


def test_deepcopy_keeps_names() -> None:
    gm = copy.deepcopy(to_torch(_zoo_model("multi_input")))
    assert input_names(gm) == ["image", "features"] and output_names(gm) == ["logits", "embedding"]


def test_with_outputs_shares_parameters_and_keeps_names() -> None:
    gm = to_torch(_zoo_model("mlp"))
    first = _zoo_model("mlp").graph.node[0].output[0]
    view = with_outputs(gm, [first])
    assert input_names(view) == input_names(gm) and output_names(view) == [first]
    assert {id(p) for p in view.parameters()} <= {id(p) for p in gm.parameters()}
    with pytest.raises(KeyError):
        with_outputs(gm, ["no such tensor"])


def test_unsupported_ops_are_listed_at_once() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    cond = helper.make_tensor_value_info("cond", TensorProto.BOOL, [])
    branch = helper.make_graph([helper.make_node("Relu", ["x"], ["b"])], "branch", [],
                               [helper.make_tensor_value_info("b", TensorProto.FLOAT, [2])])
    nodes = [
        helper.make_node("MyOp", ["x"], ["m"], domain="com.example"),
        helper.make_node("If", ["cond"], ["i"], then_branch=branch, else_branch=branch),
        helper.make_node("Add", ["m", "i"], ["y"]),
        helper.make_node("MyOp", ["y"], ["z"], domain="com.example"),
    ]
    graph = helper.make_graph(nodes, "g", [x, cond], [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("com.example", 1)])
    with pytest.raises(ModelError) as info:
        to_torch(model)
    message = str(info.value)
    assert "\n" not in message and message.startswith("cannot convert to torch: ops ")
    assert "com.example:MyOp (opset 1)" in message and "If (opset 13)" in message
    assert message.count("MyOp") == 1 and "Add" not in message


def test_ai_onnx_domain_spelling() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])
    node = helper.make_node("Relu", ["x"], ["y"], domain="ai.onnx")
    model = _finish(helper.make_graph([node], "g", [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])]), 13)
    feeds = {"x": _float(3)}
    np.testing.assert_array_equal(_run_fx(to_torch(model), feeds)[0], np.maximum(feeds["x"], 0))


def test_converter_failures_become_model_errors() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])
    node = helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[2, 2], dilations=[2, 2])
    model = _finish(helper.make_graph([node], "g", [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]), 19)
    with pytest.raises(ModelError, match="dilations"):
        to_torch(model)


def test_registration_is_idempotent_and_keeps_originals() -> None:
    torch_convert.register_converters()
    registry = dict(torch_convert.registry._CONVERTER_REGISTRY)
    torch_convert.register_converters()
    assert torch_convert.registry._CONVERTER_REGISTRY == registry
    assert set(torch_convert.ORIGINALS) >= {"Conv", "ConvTranspose", "Gemm", "MatMul", "Gather"}


def test_aliases_name_real_versions() -> None:
    history: dict[str, set[int]] = {}
    for schema in onnx.defs.get_all_schemas_with_history():
        if schema.domain == "":
            history.setdefault(schema.name, set()).add(schema.since_version)
    for op, alias in torch_convert.VERSION_ALIASES.items():
        assert alias.source in history[op] and set(alias.targets) <= history[op], op
        assert max(alias.targets) <= torch_convert.MAX_OPSET
        between = {v for v in history[op] if alias.source < v <= torch_convert.MAX_OPSET}
        assert between == set(alias.targets), f"{op}: versions {sorted(between)} vs aliases {alias.targets}"


# ---------------------------------------------------------------- one op at a time

CASES: list[Any] = []


def case(op: str, opset: int, inputs: dict[str, np.ndarray], consts: dict[str, np.ndarray] | None = None, *,
         args: Sequence[str] | None = None, outputs: int = 1, tag: str = "", **attrs: Any) -> None:
    """One single-node model: ``inputs`` are graph inputs, ``consts`` initializers, ``args`` the node inputs."""
    consts = consts or {}
    args = list(args if args is not None else [*inputs, *consts])
    CASES.append(pytest.param(op, opset, inputs, consts, args, outputs, attrs, id=f"{op}-{opset}{tag and '-' + tag}"))


def _single(op: str, opset: int, inputs: dict[str, np.ndarray], consts: dict[str, np.ndarray], args: Sequence[str],
            outputs: int, attrs: dict[str, Any]) -> onnx.ModelProto:
    values = [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape) for k, v in inputs.items()]
    names = [f"y{i}" for i in range(outputs)]
    node = helper.make_node(op, list(args), names, **attrs)
    inits = [numpy_helper.from_array(v, k) for k, v in consts.items()]
    untyped = [helper.make_value_info(n, onnx.TypeProto()) for n in names]
    model = _finish(helper.make_graph([node], op, values, untyped, inits), opset)
    return onnx.shape_inference.infer_shapes(model)


X = _float(2, 4, 6, 6)
X3 = _float(2, 4, 8)
X5 = _float(1, 4, 4, 6, 6)
V = _float(3, 5)

# weighted ops
for opset in (10, 13, 22):
    case("Conv", opset, {"x": X}, {"w": _float(8, 4, 3, 3), "b": _float(8)}, pads=[1, 1, 1, 1])
    case("ConvTranspose", opset, {"x": X}, {"w": _float(4, 3, 3, 3), "b": _float(3)}, strides=[2, 2], pads=[1, 1, 1, 1],
         output_padding=[1, 1])
case("Conv", 13, {"x": X}, {"w": _float(6, 4, 3, 2)}, pads=[0, 1, 2, 0], strides=[2, 1], tag="asym")
for auto_pad in ("SAME_UPPER", "SAME_LOWER", "VALID"):
    case("Conv", 13, {"x": _float(1, 4, 7, 6)}, {"w": _float(4, 2, 4, 3)}, auto_pad=auto_pad, strides=[2, 2], group=2,
         tag=auto_pad)
    case("ConvTranspose", 13, {"x": _float(1, 4, 5, 5)}, {"w": _float(4, 2, 3, 4), "b": _float(2)}, auto_pad=auto_pad,
         strides=[2, 3], tag=auto_pad)
case("Conv", 13, {"x": X3}, {"w": _float(8, 1, 3), "b": _float(8)}, group=4, dilations=[2], tag="1d")
case("Conv", 13, {"x": X5}, {"w": _float(2, 4, 3, 3, 3)}, pads=[1, 0, 1, 1, 0, 1], tag="3d")
case("Conv", 13, {"x": X}, {"w": _float(4, 1, 3, 3), "b": _float(4)}, group=4, dilations=[2, 2], pads=[2, 2, 2, 2],
     tag="depthwise")
case("ConvTranspose", 13, {"x": X}, {"w": _float(4, 2, 3, 3)}, strides=[2, 2], pads=[0, 1, 2, 0], tag="asym")
case("ConvTranspose", 13, {"x": X}, {"w": _float(4, 1, 3, 3), "b": _float(2)}, strides=[2, 2], group=2,
     output_shape=[12, 13], tag="output_shape")
case("ConvTranspose", 13, {"x": X3}, {"w": _float(4, 3, 4)}, strides=[3], dilations=[2], output_padding=[1], tag="1d")
case("ConvTranspose", 13, {"x": X5}, {"w": _float(4, 2, 2, 2, 2), "b": _float(2)}, strides=[2, 2, 2], tag="3d")
for opset in (9, 11, 13):
    case("Gemm", opset, {"a": V}, {"w": _float(5, 4), "c": _float(4)})
case("Gemm", 13, {"a": _float(5, 3)}, {"w": _float(4, 5), "c": _float(3, 4)}, transA=1, transB=1, alpha=0.5, beta=2.0,
     tag="trans")
case("Gemm", 13, {"a": V}, {"w": _float(4, 5), "c": _float(1)}, transB=1, tag="scalar_c")
case("Gemm", 13, {"a": V}, {"w": _float(5, 4)}, alpha=3.0, tag="no_c")
for opset in (8, 9, 13):
    case("MatMul", opset, {"x": X3}, {"w": _float(8, 5)})
case("MatMul", 13, {"x": _float(2, 3, 4, 5)}, {"w": _float(3, 5, 2)}, tag="batched_weight")
case("MatMul", 13, {"x": _float(2, 5, 3)}, {"w": _float(4, 5)}, args=["w", "x"], tag="constant_a")
case("MatMul", 13, {"x": X3}, {"w": _float(8)}, tag="vector")
case("Gather", 10, {"i": _ints(0, 2, 4, 1).reshape(2, 2)}, {"w": _float(5, 3)}, args=["w", "i"])
for opset in (11, 13):
    case("Gather", opset, {"i": _ints(0, 2, -1, 1).reshape(2, 2)}, {"w": _float(5, 3)}, args=["w", "i"])
case("Gather", 13, {"i": _ints(-2)}, {"w": _float(2, 5, 3)}, args=["w", "i"], axis=1, tag="axis1")
case("Gather", 13, {"i": np.array(1, np.int64)}, {"w": _float(2, 5, 3)}, args=["w", "i"], axis=-1, tag="scalar")

# our converters
for op in REDUCE_OPS:
    positive = op in ("ReduceLogSum", "ReduceL1")
    data = np.abs(X3) + 0.1 if positive else X3
    case(op, 18, {"x": data}, {"axes": _ints(1, -1)}, keepdims=0)
    case(op, 18, {"x": data}, {"axes": _ints(0)}, tag="keep")
    case(op, 18, {"x": data}, tag="all")
case("ReduceMean", 18, {"x": X3}, {"axes": np.zeros(0, np.int64)}, noop_with_empty_axes=1, tag="noop")
case("ReduceSum", 13, {"x": X3}, {"axes": np.zeros(0, np.int64)}, keepdims=0, tag="empty_axes")
for op in ("ReduceMax", "ReduceMin"):
    case(op, 20, {"x": X3}, {"axes": _ints(2)}, keepdims=0)
for opset in (11, 13, 18, 19, 21, 23, 24, 25):
    case("Pad", opset, {"x": X}, {"pads": _ints(0, 0, 1, 2, 0, 0, 2, 1), "v": np.array(1.5, np.float32)})
for mode in ("reflect", "edge"):
    case("Pad", 13, {"x": X}, {"pads": _ints(0, 0, 0, 2, 0, 0, 0, 1)}, mode=mode, tag=mode)
case("Pad", 13, {"x": X}, {"pads": _ints(0, 1, -1, 2, 0, 0, -2, 0)}, tag="negative")
case("Pad", 13, {"x": V}, {"pads": _ints(0, 1, 0, 2)}, mode="reflect", tag="2d")
case("Pad", 18, {"x": X}, {"pads": _ints(1, 2, 3, 0), "axes": _ints(1, -1)}, args=["x", "pads", "", "axes"], mode="reflect",
     tag="axes")
case("Pad", 19, {"x": X}, {"pads": _ints(0, 0, 2, 1, 0, 0, 1, 3)}, mode="wrap", tag="wrap")
case("Split", 18, {"x": _float(2, 7)}, axis=1, num_outputs=3, outputs=3)
case("Split", 18, {"x": _float(6, 3)}, {"split": _ints(1, 5)}, outputs=2, tag="sizes")
NO_ROI = {"roi": np.zeros(0, np.float32), "none": np.zeros(0, np.float32)}  # opset 11 needs roi and scales
for opset in (11, 13, 18, 19):
    case("Resize", opset, {"x": X}, {**NO_ROI, "scales": np.array([1, 1, 2, 2], np.float32)}, args=["x", "roi", "scales"],
         mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor")
    case("Resize", opset, {"x": X}, {**NO_ROI, "sizes": _ints(2, 4, 9, 4)}, args=["x", "roi", "none", "sizes"],
         tag="nearest_sizes")
    case("Resize", opset, {"x": X}, {**NO_ROI, "scales": np.array([1, 1, 1.7, 0.6], np.float32)},
         args=["x", "roi", "scales"], mode="linear", tag="linear")
RESIZE_MODES = [
    dict(mode="nearest", nearest_mode="round_prefer_ceil", coordinate_transformation_mode="half_pixel"),
    dict(mode="nearest", nearest_mode="ceil", coordinate_transformation_mode="align_corners"),
    dict(mode="linear", coordinate_transformation_mode="align_corners"),
    dict(mode="linear", coordinate_transformation_mode="pytorch_half_pixel"),
    dict(mode="linear", coordinate_transformation_mode="asymmetric"),
    dict(mode="cubic"),
    dict(mode="cubic", exclude_outside=1, cubic_coeff_a=-0.5, coordinate_transformation_mode="asymmetric"),
]
for i, modes in enumerate(RESIZE_MODES):
    case("Resize", 13, {"x": X}, {"sizes": _ints(2, 4, 11, 3)}, args=["x", "", "", "sizes"], tag=f"mode{i}", **modes)
case("Resize", 18, {"x": X}, {"sizes": _ints(9, 4)}, args=["x", "", "", "sizes"], axes=[3, 2], mode="linear",
     tag="axes")
case("Resize", 18, {"x": X}, {"sizes": _ints(10, 8)}, args=["x", "", "", "sizes"], axes=[2, 3],
     keep_aspect_ratio_policy="not_larger", tag="not_larger")
case("Resize", 19, {"x": X}, {"scales": np.array([1, 1, 1.3, 0.7], np.float32)}, args=["x", "", "scales"],
     mode="linear", coordinate_transformation_mode="half_pixel_symmetric", tag="symmetric")
for opset in (11, 12, 13):
    case("Clip", opset, {"x": X}, {"lo": np.array(-0.5, np.float32), "hi": np.array(0.7, np.float32)})
case("Clip", 13, {"x": X}, {"hi": np.array(0.7, np.float32)}, args=["x", "", "hi"], tag="no_min")
case("Clip", 13, {"x": X}, tag="no_bounds")
case("LayerNormalization", 17, {"x": X3}, {"s": _float(8), "b": _float(8)})
case("LayerNormalization", 17, {"x": X}, {"s": _float(6, 6)}, axis=2, epsilon=1e-3, tag="axis2")
case("RMSNormalization", 23, {"x": X3}, {"s": _float(8)})
case("GroupNormalization", 18, {"x": X}, {"s": _float(2), "b": _float(2)}, num_groups=2)
case("GroupNormalization", 21, {"x": X}, {"s": _float(4), "b": _float(4)}, num_groups=2, epsilon=1e-3)
case("Gelu", 20, {"x": X})
case("Gelu", 20, {"x": X}, approximate="tanh", tag="tanh")
for opset in (18, 22):
    case("Mish", opset, {"x": X})
case("Swish", 24, {"x": X}, alpha=1.5)
for opset in (10, 22):
    case("ThresholdedRelu", opset, {"x": X}, alpha=0.3)
for opset in (13, 22):
    case("GlobalMaxPool", opset, {"x": X})
for opset in (12, 13):
    case("SpaceToDepth", opset, {"x": X}, blocksize=2)
for opset in (15, 19, 21, 23, 24, 25):
    case("CastLike", opset, {"x": X, "like": _ints(1)})
for opset in (5, 13, 14):
    case("Reshape", opset, {"x": X}, {"shape": _ints(0, -1, 12)})
case("Reshape", 14, {"x": X}, {"shape": _ints(2, -1, 12)}, allowzero=1, tag="allowzero")

# version aliases of onnx2torch's converters
for op in ("Acos", "Asin", "Atan", "Cos", "Sin", "Tan", "Elu", "Selu", "HardSigmoid", "Softplus", "Softsign",
           "HardSwish", "Round", "GlobalAveragePool", "Dropout"):
    case(op, 22, {"x": _float(2, 4, 6, 6, bound=0.9)})
case("InstanceNormalization", 22, {"x": X}, {"s": _float(4), "b": _float(4)})
case("MaxPool", 22, {"x": X}, kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
case("Equal", 19, {"a": np.array([1, 2, 3], np.float32), "b": np.array([1, 0, 3], np.float32)})
for op in ("GreaterOrEqual", "LessOrEqual"):
    case(op, 16, {"a": np.array([1, 2, 3], np.float32), "b": np.array([2, 2, 2], np.float32)})
for opset in (19, 22):
    case("AveragePool", opset, {"x": X}, kernel_shape=[2, 2], strides=[2, 2], dilations=[1, 1])
for opset in (19, 21, 23, 24, 25):
    case("Cast", opset, {"x": X}, to=TensorProto.INT32)
    case("Constant", opset, {}, value=numpy_helper.from_array(_float(2, 3)))
    case("Identity", opset, {"x": X})
    case("Reshape", opset, {"x": X}, {"shape": _ints(0, -1, 12)})
    case("Shape", opset, {"x": X}, start=1, end=-1)
    case("ConstantOfShape", opset if opset != 19 else 20, {"shape": _ints(2, 3)},
         value=numpy_helper.from_array(np.array([0.5], np.float32)))
for opset in (21, 23, 24, 25):
    case("Flatten", opset, {"x": X}, axis=2)
    case("Transpose", opset, {"x": X}, perm=[0, 2, 3, 1])
    case("Unsqueeze", opset, {"x": X}, {"axes": _ints(1, -1)})
for opset in (23, 24, 25):
    case("Squeeze", opset, {"x": _float(2, 1, 3, 1)}, {"axes": _ints(-1)})


for opset in (7, 14, 22):  # recurrent ops stay float; tests/test_recurrent.py covers directions and states
    for op, gates, outs in (("LSTM", 4, 3), ("GRU", 3, 2)):
        case(op, opset, {"x": _float(5, 2, 3)}, {"W": _float(1, gates * 4, 3, bound=0.5),
             "R": _float(1, gates * 4, 4, bound=0.5), "B": _float(1, 2 * gates * 4, bound=0.5)},
             outputs=outs, hidden_size=4)


@pytest.mark.parametrize("op,opset,inputs,consts,args,outputs,attrs", CASES)
def test_single_op_matches_onnxruntime(op: str, opset: int, inputs: dict[str, np.ndarray], consts: dict[str, np.ndarray],
                                       args: Sequence[str], outputs: int, attrs: dict[str, Any]) -> None:
    model = _single(op, opset, inputs, consts, args, outputs, attrs)
    expected = _session(model).run(None, inputs)
    actual = _run_fx(to_torch(model), inputs)
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        _assert_close(a, e, f"{op} output {i}")


def test_every_registered_version_has_a_case() -> None:
    tested = {(p.values[0], onnx.defs.get_schema(p.values[0], p.values[1], "").since_version) for p in CASES}
    registered = set(torch_convert._OWN)
    registered |= {(op, v) for op, alias in torch_convert.VERSION_ALIASES.items() for v in alias.targets}
    assert not registered - tested, sorted(registered - tested)
