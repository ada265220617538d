"""Float weights where 8 bits lose what a layer computes (init/float_weights.py, --float-weights-below)."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from eptq_onnx import quantize
from eptq_onnx.calib.layer_inputs import LayerRowSampler
from eptq_onnx.config import OptimizeOptions, QuantConfig
from eptq_onnx.errors import UsageError
from eptq_onnx.graph.runtime import make_session, run, with_outputs
from eptq_onnx.init.float_weights import weight_output_sqnr
from eptq_onnx.init.quantizers import sqnr_db
from eptq_onnx.init.weights import quantize_weight
from eptq_onnx.plan.overrides import Override
from eptq_onnx.plan.qpoints import build_plan

TAPS = 63


def _lowpass(cutoff: float = 0.2) -> np.ndarray:
    """A Hamming-windowed sinc FIR lowpass [1, 1, 1, TAPS]: most taps are tiny, as a decimation filter's are."""
    n = np.arange(TAPS) - (TAPS - 1) / 2
    return (np.sinc(2 * cutoff * n) * 2 * cutoff * np.hamming(TAPS)).astype(np.float32).reshape(1, 1, 1, -1)


def _shared_filter_model(length: int) -> onnx.ModelProto:
    """lo, hi [1, 1, 1, length] -> one shared lowpass Conv each (smooth_lo reads it first) -> Add -> a learned
    Conv head [4, 1, 1, 5]."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(_lowpass(), "lowpass"),
             numpy_helper.from_array(rng.normal(0, 0.3, (4, 1, 1, 5)).astype(np.float32), "head_w")]
    pads = [0, TAPS // 2, 0, TAPS // 2]
    nodes = [helper.make_node("Conv", ["lo", "lowpass"], ["a"], name="smooth_lo", pads=pads),
             helper.make_node("Conv", ["hi", "lowpass"], ["b"], name="smooth_hi", pads=pads),
             helper.make_node("Add", ["a", "b"], ["s"], name="sum"),
             helper.make_node("Conv", ["s", "head_w"], ["out"], name="head", pads=[0, 2, 0, 2])]
    value = lambda name, channels: helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, channels, 1, length])
    graph = helper.make_graph(nodes, "filters", [value("lo", 1), value("hi", 1)], [value("out", 4)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def _feeds(n: int, length: int, seed: int = 0) -> list:
    """lo: low-frequency sines (the filter's passband); hi: mostly a sine in its stopband, which the float filter
    removes and 8-bit taps let through."""
    rng = np.random.default_rng(seed)
    t = np.arange(length)
    sine = lambda lo, hi: np.sin(2 * np.pi * rng.uniform(lo, hi) * t + rng.uniform(0, 6))
    shape = (1, 1, 1, length)
    return [{"lo": (sine(0.005, 0.1) + 0.01 * rng.normal(size=length)).reshape(shape).astype(np.float32),
             "hi": (0.05 * sine(0.005, 0.1) + sine(0.3, 0.45)).reshape(shape).astype(np.float32)} for _ in range(n)]


def _run(model: onnx.ModelProto, feeds: list) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, f)[0] for f in feeds])


def _with_weight(model: onnx.ModelProto, name: str, value: np.ndarray) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for init in out.graph.initializer:
        if init.name == name:
            init.CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))
    return out


def test_every_reader_of_a_shared_weight_gets_its_own_rows_and_its_sqnr_is_what_onnxruntime_computes() -> None:
    """With every im2col row sampled (2 x 64 positions < 512 per reader), the first reader's rows are the
    weight's rows (what weight init reads), the second reader has rows of its own input, and the rows-based
    SQNR of each reader's output with only the weight on 8-bit codes is the one onnxruntime gives between the
    float model and the model with the dequantized weight."""
    length = 64
    model, feeds = _shared_filter_model(length), _feeds(2, length)
    sampler = LayerRowSampler(model, build_plan(model))
    tapped = make_session(with_outputs(model, sampler.names))
    for feed in feeds:
        sampler.offer(run(tapped, feed, sampler.names), 1)
    rows, per_reader = sampler.rows(), sampler.reader_rows()
    assert {"smooth_lo", "smooth_hi"} <= set(per_reader) and per_reader["smooth_hi"].shape == (128, 1, TAPS)
    assert per_reader["smooth_lo"] is rows["lowpass"]
    w = _lowpass()
    quantized = quantize_weight("lowpass", w, 0, 8, "mse").dequantized()
    outputs = lambda m: [np.concatenate(o) for o in zip(*(ort.InferenceSession(
        with_outputs(m, ["a", "b"]).SerializeToString(), providers=["CPUExecutionProvider"]).run(["a", "b"], f)
        for f in feeds))]
    float_out, rounded = outputs(model), outputs(_with_weight(model, "lowpass", quantized))
    for node, exact, approx in zip(("smooth_lo", "smooth_hi"), float_out, rounded):
        assert weight_output_sqnr(per_reader[node], w, quantized, 0) == pytest.approx(sqnr_db(exact, approx), abs=1e-3)
    assert weight_output_sqnr(per_reader["smooth_hi"], w, quantized, 0) < 30.0  # the stopband sine leaks through
    assert weight_output_sqnr(per_reader["smooth_lo"], w, quantized, 0) > 36.0


@pytest.mark.parametrize("weight_bits, reduce_range", [(8, None), (4, None), (8, True)])
def test_a_shared_filter_that_8_bits_lose_on_its_second_reader_stays_float_with_every_reader(
        weight_bits: int, reduce_range) -> None:
    """The lowpass's 8-bit codes lose smooth_hi's output (12.5 dB; smooth_lo, its first reader, keeps 40+), so
    the filter and both its readers stay float while the learned head stays quantized; the written model is
    far closer to the float model in onnxruntime than with --float-weights-below 0. The same at W4 and with
    the 7-bit U8S8 range: the check judges full-range 8-bit codes whatever the run's width."""
    length = 512
    model, feeds = _shared_filter_model(length), _feeds(32, length)
    settings = dict(weight_bits=weight_bits, act_bits=8, reduce_range=reduce_range, optimize=OptimizeOptions(iters=0),
                    measure_latency=False)
    floated = quantize(model, feeds, QuantConfig(**settings))
    quantized = quantize(model, feeds, QuantConfig(float_weights_below=0.0, **settings))
    [entry] = floated.report.float_weights
    assert entry["weight"] == "lowpass" and entry["nodes"] == ["smooth_lo", "smooth_hi"]
    assert entry["layer"] == "smooth_hi" and entry["db_8"] < 20.0
    check = floated.report.float_weights_output_sqnr_db
    assert check["float"] > check["quantized"] and check["samples"] == 16
    assert any(w.startswith("FLOAT: 1 weight(s)") for w in floated.report.warnings)
    assert not quantized.report.float_weights
    graph = floated.model.graph
    readers = {n.name: n for n in graph.node}
    assert readers["smooth_lo"].input[1] == readers["smooth_hi"].input[1] == "lowpass"  # the float initializer
    assert any(n.op_type == "DequantizeLinear" and n.output[0] == readers["head"].input[1] for n in graph.node)
    test = _feeds(16, length, seed=1)
    reference = _run(model, test)
    db_float, db_quantized = sqnr_db(reference, _run(floated.model, test)), sqnr_db(reference, _run(quantized.model, test))
    assert db_float > db_quantized + 5.0


def test_a_weight_whose_width_the_user_set_stays_quantized() -> None:
    """--overrides {"lowpass": {"bits": 8}}: the user chose the width, the check leaves the weight alone."""
    length = 256
    model, feeds = _shared_filter_model(length), _feeds(16, length)
    result = quantize(model, feeds, QuantConfig(weight_bits=8, act_bits=8, optimize=OptimizeOptions(iters=0),
                                                measure_latency=False, overrides=(Override("lowpass", bits=8),)))
    assert not result.report.float_weights
    readers = {n.name: n for n in result.model.graph.node}
    assert readers["smooth_lo"].input[1] != "lowpass" and readers["smooth_hi"].input[1] != "lowpass"  # dequantized


def test_a_negative_threshold_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="--float-weights-below"):
        QuantConfig(float_weights_below=-1.0)
