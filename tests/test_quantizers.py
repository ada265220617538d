"""Quantizers and step-size search against onnxruntime and brute-force numpy references."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from eptq_onnx.quantizers import (
    Histogram,
    fake_quant,
    int_range,
    params_for_range,
    params_mse,
    params_percentile,
    quantize,
    sqnr_db,
    weight_scales,
)
from eptq_onnx.runtime import make_session


def _ort_qdq(x: np.ndarray, scale: float, zero_point: int, dtype: int) -> tuple[np.ndarray, np.ndarray]:
    np_type = helper.tensor_dtype_to_np_dtype(dtype)
    graph = helper.make_graph(
        [
            helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
            helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"]),
        ],
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("q", dtype, list(x.shape)), helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))],
        initializer=[
            onnx.numpy_helper.from_array(np.array(scale, dtype=np.float32), "s"),
            onnx.numpy_helper.from_array(np.array(zero_point, dtype=np_type), "z"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    q, y = make_session(model, optimize=False).run(None, {"x": x})
    return q, y


@pytest.mark.parametrize("signed", [False, True])
def test_quantize_matches_onnxruntime_including_ties_and_saturation(signed: bool) -> None:
    rng = np.random.default_rng(0)
    scale = np.float32(0.05)
    zero_point = 0 if signed else 100
    ties = (np.arange(-300, 300) + 0.5).astype(np.float32) * scale  # exact .5 ties and saturation
    x = np.concatenate([rng.normal(0, 3, 1000).astype(np.float32), ties])
    qmin, qmax = int_range(8, signed)
    q_ort, y_ort = _ort_qdq(x, float(scale), zero_point, TensorProto.INT8 if signed else TensorProto.UINT8)
    np.testing.assert_array_equal(quantize(x, scale, zero_point, qmin, qmax), q_ort.astype(np.float64))
    np.testing.assert_array_equal(fake_quant(x, scale, zero_point, qmin, qmax), y_ort)


def test_int_range() -> None:
    assert int_range(8, True) == (-128, 127)
    assert int_range(8, False) == (0, 255)
    assert int_range(4, True) == (-8, 7)
    assert int_range(2, True) == (-2, 1)


def _channel_mse(w2: np.ndarray, scale: np.ndarray, bits: int) -> np.ndarray:
    qmin, qmax = int_range(bits, True)
    return ((fake_quant(w2, scale[:, None], 0, qmin, qmax) - w2) ** 2).sum(axis=1)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_weight_mse_scales_near_brute_force_optimum(bits: int) -> None:
    rng = np.random.default_rng(bits)
    w = rng.standard_t(4, size=(6, 3, 3, 3)).astype(np.float32)  # heavy tails: clipping pays off
    w2 = w.reshape(6, -1)
    qmax = int_range(bits, True)[1]
    mse = _channel_mse(w2, weight_scales(w, 0, bits, "mse"), bits)
    minmax = _channel_mse(w2, weight_scales(w, 0, bits, "minmax"), bits)
    maxabs = np.abs(w2).max(axis=1)
    brute = np.min(
        [_channel_mse(w2, (a * maxabs / qmax).astype(np.float32), bits) for a in np.linspace(0.01, 1.0, 2000)], axis=0
    )
    assert np.all(mse <= minmax + 1e-9)
    assert np.all(mse <= brute * 1.02 + 1e-12)


def test_weight_scales_axis_and_zero_channel() -> None:
    w = np.zeros((4, 5), dtype=np.float32)
    w[:, 0] = [1.0, 2.0, 3.0, 4.0]
    s = weight_scales(w, 1, 8, "minmax")
    assert s.shape == (5,)
    assert s[0] == pytest.approx(4.0 / 127)
    assert np.all(s[1:] == s[0])  # all-zero channels take the median live step
    assert np.all(s > 0)


@pytest.mark.parametrize("lo,hi,symmetric", [(-1.3, 4.1, False), (0.0, 6.0, False), (0.5, 2.0, False), (-3.0, 1.0, True)])
def test_params_for_range_covers_range_and_keeps_zero_exact(lo: float, hi: float, symmetric: bool) -> None:
    p = params_for_range(lo, hi, 8, symmetric)
    qmin, qmax = p.qrange
    low, high = p.bounds
    assert low <= min(lo, 0) + p.scale and high >= hi - p.scale
    assert fake_quant(np.float32(0.0), p.scale, p.zero_point, qmin, qmax) == 0.0


def _samples(kind: str) -> np.ndarray:
    rng = np.random.default_rng(1)
    if kind == "relu":
        return np.maximum(rng.standard_t(3, 200_000), 0).astype(np.float32)
    return rng.standard_t(3, 200_000).astype(np.float32) + 0.3


@pytest.mark.parametrize("kind,symmetric", [("relu", False), ("signed", False), ("signed", True)])
def test_activation_mse_close_to_brute_force_on_raw_data(kind: str, symmetric: bool) -> None:
    x = _samples(kind)
    hist = Histogram(float(x.min()), float(x.max()))
    for chunk in np.array_split(x, 7):  # streaming
        hist.add(chunk)
    chosen = params_mse(hist, 8, symmetric)

    def true_mse(p) -> float:
        qmin, qmax = p.qrange
        return float(((fake_quant(x, p.scale, p.zero_point, qmin, qmax) - x) ** 2).mean())

    lo, hi = float(x.min()), float(x.max())
    candidates = [
        params_for_range(a * lo, b * hi, 8, symmetric) for a in np.linspace(0.02, 1, 50) for b in np.linspace(0.02, 1, 50)
    ]
    best = min(true_mse(p) for p in candidates)
    assert true_mse(chosen) <= best * 1.15
    assert true_mse(chosen) < true_mse(params_for_range(lo, hi, 8, symmetric))  # clipping the tail helps here


def test_histogram_streaming_equals_one_shot() -> None:
    x = _samples("signed")
    one = Histogram(float(x.min()), float(x.max()))
    one.add(x)
    many = Histogram(float(x.min()), float(x.max()))
    for chunk in np.array_split(x, 13):
        many.add(chunk)
    np.testing.assert_array_equal(one.counts, many.counts)
    assert one.zeros == many.zeros


def test_histogram_ignores_non_finite_values() -> None:
    h = Histogram(-1.0, 1.0)
    h.add(np.array([np.nan, np.inf, -np.inf, 0.5, 0.0], dtype=np.float32))
    assert h.total() == 2


def test_percentile_matches_numpy() -> None:
    x = _samples("signed")
    hist = Histogram(float(x.min()), float(x.max()))
    hist.add(x)
    p = params_percentile(hist, 8, False, 99.9)
    low, high = p.bounds
    width = hist.edges[1] - hist.edges[0]
    assert low == pytest.approx(np.percentile(x, 0.1), abs=2 * width + p.scale)
    assert high == pytest.approx(np.percentile(x, 99.9), abs=2 * width + p.scale)
    sym = params_percentile(hist, 8, True, 99.9)
    assert sym.bounds[1] == pytest.approx(np.percentile(np.abs(x), 99.9), abs=2 * width + sym.scale)


def test_sqnr_db() -> None:
    ref = np.ones(100)
    assert sqnr_db(ref, ref) == float("inf")
    assert sqnr_db(ref, ref * 1.1) == pytest.approx(20.0)


def test_output_aware_scales_near_brute_force_on_layer_outputs() -> None:
    rng = np.random.default_rng(3)
    w = rng.standard_t(4, size=(4, 2, 3)).astype(np.float32)  # 4 channels, 2 groups of 2, K = 3 per group... flattened below
    w = w.reshape(4, 6)
    x = rng.normal(size=(200, 2, 6)).astype(np.float32)
    x[:, :, 0] *= 5.0  # a dominant input direction: clipping the weight on it costs output error
    bits = 4
    qmax = int_range(bits, True)[1]
    chosen = weight_scales(w, 0, bits, "mse", inputs=x)
    maxabs = np.abs(w).max(axis=1)

    def output_error(scale: np.ndarray) -> np.ndarray:
        d = fake_quant(w, scale[:, None], 0, -8, 7) - w
        group = np.repeat(np.arange(2), 2)
        return np.array([((x[:, group[c]] @ d[c]) ** 2).sum() for c in range(4)])

    brute = np.min([output_error((a * maxabs / qmax).astype(np.float32)) for a in np.linspace(0.01, 1, 2000)], axis=0)
    assert np.all(output_error(chosen) <= brute * 1.02 + 1e-9)
    weight_only = weight_scales(w, 0, bits, "mse")
    assert np.all(output_error(chosen) <= output_error(weight_only) + 1e-9)


@pytest.mark.parametrize("method_inputs", [False, True])
def test_weights_on_an_integer_grid_are_stored_exactly(method_inputs: bool) -> None:
    # a DFL head's expectation Conv (weights 0..15) and a channel of halves; a random channel keeps its search
    rng = np.random.default_rng(0)
    w = np.stack([np.arange(16.0), 0.5 * np.arange(-8.0, 8.0), rng.normal(size=16)]).reshape(3, 16, 1, 1).astype(np.float32)
    inputs = rng.uniform(0, 1, (64, 1, 16)).astype(np.float32) if method_inputs else None
    scale = weight_scales(w, 0, 7, inputs=inputs)  # 7 bits: codes up to 63
    qmin, qmax = int_range(7, True)
    deq = fake_quant(w.reshape(3, -1), scale[:, None], 0, qmin, qmax)
    np.testing.assert_array_equal(deq[:2], w.reshape(3, -1)[:2])
    assert scale[2] <= np.abs(w[2]).max() / qmax + 1e-7
