"""Empirical bias correction (init/bias_correction.py), against numpy/onnxruntime references."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from eptq_onnx import CalibOptions, quantize
from eptq_onnx.graph.runtime import make_session, with_outputs
from eptq_onnx.graph.tensor_store import tensor_array
from tests.helpers import init_only

DEMO = Path(__file__).resolve().parents[1] / "models" / "demo"


def _biased_conv_model(seed: int = 0) -> onnx.ModelProto:
    """Sigmoid -> Conv -> Relu -> Conv -> Relu -> GlobalAveragePool -> Gemm, with first-layer weights that sit
    just under a rounding boundary (w = (k + 0.45) steps) and positive inputs, so that 4-bit rounding shifts
    every channel's mean output the same way: the shift bias correction exists for."""
    rng = np.random.default_rng(seed)
    c1, c2, classes = 8, 16, 10
    w1 = rng.normal(0, 0.3, (c1, 3, 3, 3)).astype(np.float32)
    step = np.abs(w1).reshape(c1, -1).max(axis=1).reshape(c1, 1, 1, 1) / 7
    w1 = ((np.floor(w1 / step) + 0.45) * step).astype(np.float32)
    w2 = rng.normal(0, 0.15, (c2, c1, 3, 3)).astype(np.float32)
    fc = rng.normal(0, 0.3, (classes, c2)).astype(np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in (
        (w1, "w1"), (np.full(c1, 0.05, np.float32), "b1"), (w2, "w2"), (np.full(c2, 0.02, np.float32), "b2"),
        (fc, "fc"), (np.zeros(classes, np.float32), "fcb"))]
    nodes = [
        helper.make_node("Sigmoid", ["x"], ["s"], name="sigmoid"),
        helper.make_node("Conv", ["s", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc", "fcb"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(nodes, "biased", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, 16, 16])],
                              [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["N", classes])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _bias_step(model: onnx.ModelProto, name: str) -> np.ndarray:
    """The int32 step of a written bias (input step x weight step, per channel)."""
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == f"{name}_scale")


def _channel_means(model: onnx.ModelProto, feeds: dict, tensor: str, optimize: bool = True) -> np.ndarray:
    session = make_session(with_outputs(model, [tensor]), optimize=optimize)
    value = session.run([tensor], feeds)[0].astype(np.float64)
    return value.mean(axis=tuple(d for d in range(value.ndim) if d != 1))


def test_corrected_first_layer_matches_float_channel_means(calib_for) -> None:
    """On the samples it was measured on, the written model's first Conv output has the float model's
    channel means up to the rounding of its int32 bias, computed independently by onnxruntime."""
    model = _biased_conv_model()
    calib = calib_for(model, 16)
    result = quantize(model, calib, init_only(weight_bits=4, calib=CalibOptions(batch_size=16)), progress=False)
    bc = result.report.bias_correction
    assert bc["kept"] and bc["layers"] == 3 and bc["samples"] == 16
    feeds = {"x": np.stack([np.load(p)["x"] for p in sorted(calib.glob("*.npz"))])}
    dq = {n.output[0] for n in result.model.graph.node if n.op_type == "DequantizeLinear"}
    assert "c1" not in dq  # the Conv output itself, before its QuantizeLinear
    float_means = _channel_means(model, feeds, "c1")
    uncorrected = quantize(model, calib, init_only(weight_bits=4, bias_correction=False), progress=False)
    before = _channel_means(uncorrected.model, feeds, "c1", optimize=False)
    after = _channel_means(result.model, feeds, "c1", optimize=False)
    step = _bias_step(result.model, "b1__conv1")
    assert np.mean(np.abs(before - float_means)) > 3 * np.mean(step)  # the trap: a real shift
    # left over: the int32 bias rounding, float32 sums and the rare rounding tie that torch and onnxruntime
    # put on different sides
    left = np.abs(after - float_means)
    assert np.all(left <= step + 1e-4) and np.mean(left) < np.mean(np.abs(before - float_means)) / 5


def test_bias_correction_improves_demo_w4_output_and_the_written_model_agrees(tmp_path: Path) -> None:
    calib = DEMO / "calib"
    on = quantize(DEMO / "digits_resnet.onnx", calib, init_only(weight_bits=4), progress=False)
    off = quantize(DEMO / "digits_resnet.onnx", calib, init_only(weight_bits=4, bias_correction=False), progress=False)
    bc = on.report.bias_correction
    assert bc["kept"] and bc["sqnr_after_db"] > bc["sqnr_before_db"] + 2.0
    sqnr_on = on.report.validation["output_sqnr_db"]["logits"]
    sqnr_off = off.report.validation["output_sqnr_db"]["logits"]
    assert sqnr_on > sqnr_off + 2.0
    # the twin's measurement is what onnxruntime computes on the written model
    assert abs(sqnr_on - bc["sqnr_after_db"]) < 0.5
    assert off.report.bias_correction == {}


def test_written_biases_are_the_corrected_float_biases(calib_for) -> None:
    """The int32 bias codes in the file dequantize to the corrected biases (state.float_model), not the originals."""
    model = _biased_conv_model(seed=1)
    result = quantize(model, calib_for(model, 16), init_only(weight_bits=4), progress=False)
    assert result.report.bias_correction["kept"]
    corrected = {t.name: tensor_array(t) for t in result.state.float_model.graph.initializer}
    original = {t.name: tensor_array(t) for t in model.graph.initializer}
    assert not np.allclose(corrected["b1"], original["b1"])
    inits = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    codes, scale = inits["b1__conv1_quantized"], inits["b1__conv1_scale"]
    np.testing.assert_allclose(codes * scale, corrected["b1"], atol=float(np.max(scale)) / 2 + 1e-7)


def test_model_without_biases_is_left_as_it_is(calib_for) -> None:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "nobias",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    result = quantize(model, calib_for(model, 8), init_only(weight_bits=8), progress=False)
    assert result.report.bias_correction["skipped"] == "no quantized layer with a bias"
    session = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert session.run(None, {"x": np.ones((1, 8), np.float32)})[0].shape == (1, 4)
