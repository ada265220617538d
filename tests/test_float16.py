"""Float16 models (models/zoo_float16.py) quantize end to end; any valid node order is accepted.

Numerics: the quantized float16 model against the float32 model it was converted from, next to
the quantized float32 model (same calibration values): float16 weights and inputs may cost at
most FP16_MARGIN_DB of output SQNR. The written models pass onnx.checker and run in onnxruntime
with its default options, with the float16 (or float32) inputs and outputs of the user's model.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from eptq_onnx import quantize
from eptq_onnx.graph.normalize import normalize_model
from eptq_onnx.graph.toposort import toposort_graph
from models import zoo
from models.zoo_float16 import float16_cnn, float32_cnn
from tests.helpers import init_only

CALIB, HELD_OUT = 24, 16
FP16_MARGIN_DB = 1.0  # float16 rounding of weights/inputs is far below 8-bit quantization noise
MIN_W8A8_SQNR_DB = 25.0  # the float32 model's own W8A8 output SQNR on this CNN, with room
VARIANTS = [("float16", "sorted"), ("float32", "converter"), ("float16", "reversed")]


def _np_type(value: onnx.ValueInfoProto) -> type:
    return helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)


def _calib(folder: Path, dtype: type) -> Path:
    """The same calibration values for every variant, stored in the model's input type."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, feeds in enumerate(zoo.sample_inputs(float32_cnn(), 1, seed=i) for i in range(CALIB)):
        np.savez(folder / f"{i:03d}.npz", input=feeds["input"][0].astype(dtype))
    return folder


def _outputs(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """onnxruntime with its default session options, fed in the model's input type."""
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x.astype(_np_type(model.graph.input[0]))})[0]


def _sqnr(ref: np.ndarray, got: np.ndarray) -> float:
    ref = ref.astype(np.float64)
    return float(10 * np.log10(np.sum(ref**2) / np.sum((ref - got.astype(np.float64)) ** 2)))


@pytest.fixture(scope="module")
def held_out() -> tuple[np.ndarray, np.ndarray]:
    """Held-out inputs and the float32 model's outputs on them."""
    x = zoo.sample_inputs(float32_cnn(), HELD_OUT, seed=1000)["input"]
    return x, _outputs(float32_cnn(), x)


@pytest.fixture(scope="module")
def float32_sqnr(tmp_path_factory: pytest.TempPathFactory, held_out) -> float:
    """Output SQNR of the quantized float32 model (W8A8, --iters 0) against the float32 model."""
    folder = _calib(tmp_path_factory.mktemp("calib32"), np.float32)
    result = quantize(float32_cnn(), folder, init_only(weight_bits=8, act_bits=8), progress=False)
    x, ref = held_out
    return _sqnr(ref, _outputs(result.model, x))


@pytest.mark.parametrize("io,order", VARIANTS, ids=[f"{io}-io-{order}" for io, order in VARIANTS])
def test_w8a8_float16_close_to_float32(io: str, order: str, tmp_path: Path, held_out, float32_sqnr: float) -> None:
    model = float16_cnn(io, order)
    folder = _calib(tmp_path / "calib", _np_type(model.graph.input[0]))
    result = quantize(model, folder, init_only(weight_bits=8, act_bits=8), progress=False)
    written = result.model
    onnx.checker.check_model(written, full_check=True)
    for original, value in zip([*model.graph.input, *model.graph.output], [*written.graph.input, *written.graph.output]):
        assert (value.name, value.type.tensor_type.elem_type) == (original.name, original.type.tensor_type.elem_type)
    ops = {n.op_type for n in written.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    # timed against the model as read where it takes the prepared model's float32 inputs, else the prepared one
    as_read = model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert result.report.latency["float_model"] == ("as read" if as_read else "prepared"), result.report.latency
    x, ref = held_out
    got = _outputs(written, x)
    assert got.dtype == _np_type(model.graph.output[0])
    sqnr = _sqnr(ref, got)
    assert float32_sqnr > MIN_W8A8_SQNR_DB
    assert sqnr > float32_sqnr - FP16_MARGIN_DB, f"float16 {sqnr:.2f} dB vs float32 {float32_sqnr:.2f} dB"


def test_cli_w4a8_eptq_quiet(tmp_path: Path) -> None:
    """The default W4A8 EPTQ command on the reversed float16 model, -q: written, runs, prints nothing
    (onnx2torch's Slice converter warns about list indexing on every run of the twin otherwise)."""
    model_path, out = tmp_path / "f16.onnx", tmp_path / "q.onnx"
    onnx.save(float16_cnn("float16", "reversed"), model_path)
    folder = _calib(tmp_path / "calib", np.float16)
    run = subprocess.run([sys.executable, "-m", "eptq_onnx.cli", str(model_path), str(out), "--calib", str(folder),
                          "--time-budget", "0.05", "-q"], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr
    assert (run.stdout, run.stderr) == ("", "")
    written = onnx.load(out)
    onnx.checker.check_model(written, full_check=True)
    codes = {t.data_type for t in written.graph.initializer}
    assert TensorProto.INT4 in codes
    x = zoo.sample_inputs(float32_cnn(), 2, seed=7)["input"]
    assert np.isfinite(_outputs(written, x)).all()


# ------------------------------------------------------------------ node order


def _if_model(sorted_nodes: bool) -> onnx.ModelProto:
    """y = If(c, then: a + 1, else: a - 1) where a = Relu(x) comes after the If when unsorted: the
    If reads a only from its branches (outer scope)."""
    one = helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])
    branch = lambda op: helper.make_graph(  # noqa: E731
        [helper.make_node(op, ["a", "one"], [f"{op}_out"])], op, [],
        [helper.make_tensor_value_info(f"{op}_out", TensorProto.FLOAT, [2])])
    relu = helper.make_node("Relu", ["x"], ["a"])
    cond = helper.make_node("ReduceMax", ["x"], ["m"], keepdims=0)
    less = helper.make_node("Less", ["m", "one"], ["c"])
    branch_if = helper.make_node("If", ["c"], ["y"], then_branch=branch("Add"), else_branch=branch("Sub"))
    nodes = [relu, cond, less, branch_if] if sorted_nodes else [branch_if, less, cond, relu]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])], [one])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def test_toposort_respects_subgraph_reads() -> None:
    model = _if_model(sorted_nodes=False)
    assert toposort_graph(model.graph)
    onnx.checker.check_model(model, full_check=True)
    assert [n.op_type for n in model.graph.node] == ["ReduceMax", "Less", "Relu", "If"]  # stable: Relu only for If
    x = np.array([0.5, -0.2], np.float32)
    np.testing.assert_array_equal(_run_x(model, x), _run_x(_if_model(sorted_nodes=True), x))


def _run_x(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_toposort_is_stable() -> None:
    """A sorted graph keeps its order exactly (no change reported); a reversed one is sorted."""
    model = float32_cnn()
    order = [n.SerializeToString() for n in model.graph.node]
    assert not toposort_graph(model.graph)
    reversed_model = float16_cnn("float16", "reversed")
    assert toposort_graph(reversed_model.graph)
    onnx.checker.check_model(reversed_model, full_check=True)
    assert not toposort_graph(reversed_model.graph)
    assert [n.SerializeToString() for n in model.graph.node] == order


@pytest.mark.parametrize("order", ["converter", "reversed"])
def test_normalize_accepts_any_order(order: str) -> None:
    """onnxruntime runs these; normalization sorts them and computes in float32."""
    normalized = normalize_model(float16_cnn("float32", order))
    onnx.checker.check_model(normalized, full_check=True)
    assert not any(n.op_type == "Cast" for n in normalized.graph.node)  # the boundary casts are gone
    assert all(t.data_type != TensorProto.FLOAT16 for t in normalized.graph.initializer)
