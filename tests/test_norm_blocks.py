"""Normalization statistics stay float: decomposed norms are recognized in every spelling and quantized
as their fused op (a point on the normalized output, none inside), and no point feeds a singular op."""
from __future__ import annotations

import functools
import itertools
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from eptq_onnx import quantize
from eptq_onnx.plan.norm_blocks import find_norm_blocks
from eptq_onnx.graph.normalize import normalize_model
from eptq_onnx.ops.registry import singular_inputs
from eptq_onnx.plan.qpoints import build_plan
from eptq_onnx.graph.index import GraphIndex
from eptq_onnx.report import Report, statistics_line
from eptq_onnx.graph.runtime import make_session
from models import zoo, zoo_norms
from tests.helpers import assert_student_matches_onnxruntime, init_only
from models.calib_files import write_calib

EPS = 1e-5
MIN_SQNR_DB = 30.0  # W8A8 --iters 0 output SQNR vs the float model, every zoo norm model
# what main (before this rule) scored on the same check: the statistics were quantized
MAIN_SQNR_DB = {"jax2tf_layernorm": 18.7, "groupnorm": 7.1, "instancenorm": 21.3}
CALIB, TEST_SEED = 16, 123


# ------------------------------------------------------------------------------- spellings (matcher)


class _Spelling:
    """Builds one decomposed normalization from ops, as a small model x -> norm -> 1x1 linear layer."""

    def __init__(self, kind: str, mean: str, square: str, variance: str, inverse: str, eps_after_root: bool,
                 affine: str) -> None:
        self.kind, self.mean_op, self.square_op, self.variance = kind, mean, square, variance
        self.inverse, self.eps_after_root, self.affine = inverse, eps_after_root, affine
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, np.ndarray] = {}
        self.shape = {"LayerNorm": [2, 8, 16], "RMSNorm": [2, 8, 16], "InstanceNorm": [2, 4, 5, 6],
                      "GroupNorm": [2, 8, 4, 4]}[kind]

    def const(self, value) -> str:
        name = f"c{len(self.inits)}"
        self.inits[name] = np.asarray(value, np.float32 if np.asarray(value).dtype.kind == "f" else np.int64)
        return name

    def op(self, op_type: str, *inputs: str, **attrs) -> str:
        out = f"t{len(self.nodes)}_{op_type}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], out, **attrs))
        return out

    def mean(self, t: str, axes: list[int], n: int) -> str:
        if self.mean_op == "ReduceMean":
            return self.op("ReduceMean", t, axes=axes, keepdims=1)
        total = self.op("ReduceSum", t, self.const(axes), keepdims=1)
        return self.op("Div", total, self.const(float(n))) if self.mean_op == "ReduceSum/Div" else \
            self.op("Mul", total, self.const(1.0 / n))

    def square(self, t: str) -> str:
        return self.op("Mul", t, t) if self.square_op == "Mul" else self.op("Pow", t, self.const(2.0))

    def normalized(self, value: str, var: str) -> str:
        eps = self.const(EPS)
        if self.inverse == "Pow-0.5":
            return self.op("Mul", value, self.op("Pow", self.op("Add", var, eps), self.const(-0.5)))
        std = self.op("Add", self.op("Sqrt", var), eps) if self.eps_after_root else self.op("Sqrt", self.op("Add", var, eps))
        if self.inverse == "Div":
            return self.op("Div", value, std)
        inv = self.op("Reciprocal", std) if self.inverse == "Reciprocal" else self.op("Div", self.const(1.0), std)
        return self.op("Mul", value, inv)

    def build(self) -> tuple[onnx.ModelProto, str, str]:
        """The model, its normalized tensor (before the affine) and the block's output tensor."""
        rank = len(self.shape)
        x = "x"
        if self.kind == "GroupNorm":
            x = self.op("Reshape", "x", self.const([2, 2, -1]))
        axes = [2, 3] if self.kind == "InstanceNorm" else [-1]
        n = {"LayerNorm": 16, "RMSNorm": 16, "InstanceNorm": 30, "GroupNorm": 64}[self.kind]
        if self.kind == "RMSNorm":
            value, var = x, self.mean(self.square(x), axes, n)
        else:
            mean = self.mean(x, axes, n)
            value = self.op("Sub", x, mean)
            if self.variance == "centered":
                var = self.mean(self.square(value), axes, n)
            else:
                var = self.op("Sub", self.mean(self.square(x), axes, n), self.square(mean))
        y = grouped = self.normalized(value, var)
        if self.kind == "GroupNorm":
            y = self.op("Reshape", y, self.const(self.shape))
        normalized = y
        channels = self.shape[-1] if rank == 3 else self.shape[1]
        param_shape = [channels] if rank == 3 else [channels, 1, 1]
        rng = np.random.default_rng(0)
        if self.affine in ("Mul", "Mul+Add"):
            y = self.op("Mul", y, self.const(rng.uniform(0.5, 1.5, param_shape)))
        if self.affine == "Mul+Add":
            y = self.op("Add", y, self.const(rng.uniform(-0.2, 0.2, param_shape)))
        if rank == 3:
            out = self.op("MatMul", y, self.const(rng.standard_normal((channels, 4))))
        else:
            out = self.op("Conv", y, self.const(rng.standard_normal((3, channels, 1, 1))))
        graph = helper.make_graph(
            self.nodes, "norm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, self.shape)],
            [helper.make_tensor_value_info(out, TensorProto.FLOAT, [f"d{i}" for i in range(rank)])],
            initializer=[numpy_helper.from_array(v, k) for k, v in self.inits.items()],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        model.ir_version = 8
        # without an affine, a GroupNorm's Reshape back only moves its output (and shares its point)
        return model, normalized, grouped if self.kind == "GroupNorm" and self.affine == "none" else y

    def reference(self, x: np.ndarray) -> np.ndarray:
        """The normalization in numpy (before the affine)."""
        g = x.reshape(2, 2, -1) if self.kind == "GroupNorm" else x
        axes = (2, 3) if self.kind == "InstanceNorm" else (-1,)
        centered = g if self.kind == "RMSNorm" else g - g.mean(axis=axes, keepdims=True)
        var = np.mean(centered**2 if self.kind != "RMSNorm" else g**2, axis=axes, keepdims=True)
        std = np.sqrt(var) + EPS if self.eps_after_root and self.inverse != "Pow-0.5" else np.sqrt(var + EPS)
        return (centered / std).reshape(x.shape)


MEANS = ("ReduceMean", "ReduceSum/Div", "ReduceSum/Mul")
SQUARES = ("Pow", "Mul")
INVERSES = ("Div", "Reciprocal", "Div1", "Pow-0.5")
AFFINES = ("none", "Mul", "Mul+Add")


def _spellings():
    for i, (mean, square, variance, inverse) in enumerate(itertools.product(MEANS, SQUARES, ("centered", "moments"), INVERSES)):
        yield "LayerNorm", mean, square, variance, inverse, i % 2 == 1, AFFINES[i % 3]
    for i, (kind, mean, inverse) in enumerate(itertools.product(("RMSNorm", "GroupNorm", "InstanceNorm"), MEANS, INVERSES)):
        yield kind, mean, SQUARES[i % 2], ("centered", "moments")[i // 2 % 2], inverse, i % 3 == 0, AFFINES[i % 3]


@pytest.mark.parametrize("kind,mean,square,variance,inverse,eps_after_root,affine", list(_spellings()),
                         ids=lambda v: str(v))
def test_every_spelling_is_one_block(kind, mean, square, variance, inverse, eps_after_root, affine) -> None:
    spelling = _Spelling(kind, mean, square, variance, inverse, eps_after_root, affine)
    model, normalized, output = spelling.build()
    x = np.random.default_rng(1).standard_normal(spelling.shape).astype(np.float32) * 0.3 + 2.0
    (value,) = make_session(_with_output(model, normalized)).run([normalized], {"x": x})
    np.testing.assert_allclose(value, spelling.reference(x), rtol=1e-3, atol=1e-3)  # it is a normalization
    index = GraphIndex(normalize_model(model).graph)
    (block,) = find_norm_blocks(index)
    assert (block.kind, block.input, block.output) == (kind, "x", output)
    plan = build_plan(normalize_model(model))
    quantized = {t for g in plan.groups for t in g.tensors}
    assert output in quantized and not quantized & block.internal


def _with_output(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    del copy.graph.output[:]
    copy.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))  # for onnxruntime only
    return copy


# ------------------------------------------------------------------------------- the general rule


def test_singular_inputs_of_the_op_registry() -> None:
    node = lambda op: helper.make_node(op, ["a", "b"], ["c"])  # noqa: E731
    assert singular_inputs(node("Div"), None) == (1,)
    assert singular_inputs(node("Reciprocal"), None) == (0,) and singular_inputs(node("Log"), None) == (0,)
    assert singular_inputs(node("Pow"), 2.0) == () and singular_inputs(node("Pow"), 3.0) == ()
    assert singular_inputs(node("Pow"), -0.5) == (0,) and singular_inputs(node("Pow"), 0.5) == (0,)
    assert singular_inputs(node("Pow"), None) == (0,) and singular_inputs(node("Mul"), None) == ()


def _linear_graph(nodes: list[onnx.NodeProto], out: str, weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N", 8])],
                              initializer=[numpy_helper.from_array(v, k) for k, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return normalize_model(model)


def test_no_point_reaches_a_singular_input_only() -> None:
    """A magnitude sqrt(re*re + im*im) and a Clip'ed count in a Div denominator stay float up to the
    singular op; the point sits after it (where the next layer reads)."""
    rng = np.random.default_rng(0)
    w = {k: rng.standard_normal((8, 8)).astype(np.float32) for k in ("wr", "wi", "wd", "wo", "wm")}
    w["lo"] = np.array(0.1, np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "wr"], ["re"]), helper.make_node("MatMul", ["x", "wi"], ["im"]),
        helper.make_node("Mul", ["re", "re"], ["re2"]), helper.make_node("Mul", ["im", "im"], ["im2"]),
        helper.make_node("Add", ["re2", "im2"], ["power"]), helper.make_node("Sqrt", ["power"], ["mag"]),
        helper.make_node("MatMul", ["x", "wd"], ["d"]), helper.make_node("Clip", ["d", "lo"], ["count"]),
        helper.make_node("Div", ["mag", "count"], ["ratio"]), helper.make_node("MatMul", ["ratio", "wo"], ["y"]),
        helper.make_node("MatMul", ["mag", "wm"], ["m"]), helper.make_node("Add", ["y", "m"], ["out"]),
    ]
    plan = build_plan(_linear_graph(nodes, "out", w))
    quantized = {t for g in plan.groups for t in g.tensors}
    assert not quantized & {"re", "im", "re2", "im2", "power", "d", "count"}
    assert {"mag", "ratio"} <= quantized
    assert set(plan.singular_float) == {"re2", "im2", "count"}  # the joins' points (power's moves past the Sqrt)


def test_a_point_with_other_readers_stays() -> None:
    """A tensor that also reaches the network other than through the singular op keeps its point."""
    rng = np.random.default_rng(0)
    w = {k: rng.standard_normal((8, 8)).astype(np.float32) for k in ("wd", "wo", "wi")}
    nodes = [helper.make_node("MatMul", ["x", "wd"], ["d"]), helper.make_node("Relu", ["d"], ["r"]),
             helper.make_node("Reciprocal", ["r"], ["inv"]), helper.make_node("MatMul", ["r", "wo"], ["y"]),
             helper.make_node("MatMul", ["inv", "wi"], ["z"]), helper.make_node("Add", ["y", "z"], ["out"])]
    plan = build_plan(_linear_graph(nodes, "out", w))
    assert "r" in {t for g in plan.groups for t in g.tensors} and not plan.singular_float


# ------------------------------------------------------------------------------- zoo models, end to end

SCOPES = {  # node-name prefix of each norm in the zoo model -> kind (read from the builders' names)
    "jax2tf_layernorm": {"model/block/ln1/": "LayerNorm", "model/block/ln2/": "LayerNorm"},
    "torch_layernorm": {"/norm1/": "LayerNorm", "/norm2/": "LayerNorm"},
    "rmsnorm": {"/norm1/": "RMSNorm", "/norm2/": "RMSNorm"},
    "groupnorm": {"/norm1/": "GroupNorm", "/norm2/": "GroupNorm"},
    "instancenorm": {"/norm1/": "InstanceNorm", "/norm2/": "InstanceNorm"},
}


@functools.lru_cache(maxsize=None)
def _quantized(name: str, folder: str):
    model = zoo_norms.NORMS[name]()
    calib = write_calib(model, Path(folder) / name, CALIB)
    return model, quantize(model, calib, init_only(weight_bits=8, act_bits=8), progress=False)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("norms"))
    return lambda name: _quantized(name, folder)


@pytest.mark.parametrize("name", list(zoo_norms.NORMS))
def test_zoo_norms_are_recognized_and_reported(name: str, quantized) -> None:
    _, result = quantized(name)
    kinds = sorted(b["kind"] for b in result.report.norm_blocks)
    assert kinds == sorted(SCOPES[name].values())
    kind = kinds[0]
    assert f"norm blocks kept float: 2 {kind} (decomposed)" in statistics_line(result.report)
    inside = {n for b in result.report.norm_blocks for n in b["nodes"]}
    assert not [op for op in result.report.float_ops if op["node"] in inside]  # the block accounts for them


@pytest.mark.parametrize("name", list(zoo_norms.NORMS))
def test_no_quantizer_inside_a_norm_of_the_written_model(name: str, quantized) -> None:
    """Read from the written QDQ model and the builders' node names (not from the matcher): inside each
    norm's scope only its last op's output (the normalized, affine output) is quantized."""
    model, result = quantized(name)
    quantized_tensors = {n.input[0] for n in result.model.graph.node if n.op_type == "QuantizeLinear"}
    for prefix in SCOPES[name]:
        scope = [n for n in model.graph.node if n.name.startswith(prefix)]
        assert len(scope) >= 7
        inside = {o for n in scope for o in n.output}
        moved_input = {n.output[0] for n in scope if n.op_type == "Reshape" and n.input[0] not in inside}
        inside -= moved_input  # GroupNorm's Reshape to groups moves the input (it shares its point)
        assert quantized_tensors & inside == {scope[-1].output[0]}, prefix


def _sqnr_db(ref: np.ndarray, test: np.ndarray) -> float:
    err = np.sum((ref.astype(np.float64) - test) ** 2)
    return float(10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / err)) if np.isfinite(err) else -np.inf


@pytest.mark.parametrize("name", list(zoo_norms.NORMS))
def test_w8a8_output_sqnr(name: str, quantized) -> None:
    model, result = quantized(name)
    feeds = zoo.sample_inputs(model, 16, seed=TEST_SEED)
    (ref,), (out,) = make_session(model).run(None, feeds), make_session(result.model).run(None, feeds)
    sqnr = _sqnr_db(ref, out)
    assert sqnr >= MIN_SQNR_DB, f"{name}: {sqnr:.1f} dB (main: {MAIN_SQNR_DB.get(name, 'the same')})"
    assert sqnr >= MAIN_SQNR_DB.get(name, -np.inf) + 10.0


@pytest.mark.parametrize("name", list(zoo_norms.NORMS))
def test_twin_computes_what_onnxruntime_computes(name: str, quantized) -> None:
    model, result = quantized(name)
    assert_student_matches_onnxruntime(model, result)


def test_statistics_line() -> None:
    report = Report(input="m", output=None, config={})
    assert statistics_line(report) == ""
    report.norm_blocks = [{"kind": "LayerNorm"}] * 4 + [{"kind": "RMSNorm"}]
    report.singular_float = ["a"]
    assert statistics_line(report).startswith("norm blocks kept float: 4 LayerNorm (decomposed), 1 RMSNorm (decomposed); "
                                              "1 activation(s) kept float before a singular op")
