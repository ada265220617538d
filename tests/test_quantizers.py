"""Quantizers and step-size search against onnxruntime and brute-force numpy references."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from eptq_onnx.init.quantizers import (
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
from eptq_onnx.init.quantizers import _output_error
from eptq_onnx.graph.runtime import make_session


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


def test_histogram_counts_values_outside_its_range_in_the_end_bins() -> None:
    """Values beyond the range (mask fills left out of the range pass) count as the range's ends, as if clipped."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=5000).astype(np.float32) * 3
    h = Histogram(-2.0, 2.5, bins=64)
    h.add(x)
    ref, _ = np.histogram(np.clip(x[x != 0], -2.0, 2.5), bins=np.linspace(-2.0, 2.5, 65))
    np.testing.assert_array_equal(h.counts, ref)
    assert h.counts[0] > 100 and h.counts[-1] > 100


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


def _direct_output_error(w2: np.ndarray, scale: np.ndarray, x: np.ndarray, bits: int) -> np.ndarray:
    """Per-channel ||X_g d_c||^2 of the rounding error d_c, row by row in float64 (x: [P, G, K])."""
    qmin, qmax = int_range(bits, True)
    d = (fake_quant(w2, scale[:, None], 0, qmin, qmax) - w2).astype(np.float64)
    per_group = len(w2) // x.shape[1]
    return np.array([((x[:, c // per_group].astype(np.float64) @ d[c]) ** 2).sum() for c in range(len(w2))])


@pytest.mark.parametrize("samples,groups,k", [(300, 1, 20), (300, 4, 9), (40, 1, 64), (40, 2, 96)])
def test_output_error_matches_direct_computation(samples: int, groups: int, k: int) -> None:
    """The Gram form (K < samples) and the direct form (K >= samples) both equal sum_p (x_p . d_c)^2."""
    rng = np.random.default_rng(samples + k)
    x = rng.normal(size=(samples, groups, k)).astype(np.float32)
    x[:, :, 0] *= 10.0
    w2 = rng.standard_t(4, size=(8 * groups, k)).astype(np.float32)
    scales = (np.abs(w2).max(axis=1) / 7 * rng.uniform(0.3, 1.0, size=(5, 1))).astype(np.float32)  # 5 candidates
    got = _output_error(x)(w2, scales, -8, 7)
    want = np.stack([_direct_output_error(w2, s, x, 4) for s in scales])
    np.testing.assert_allclose(got, want, rtol=2e-5)


def _sequential_steps(w2: np.ndarray, bits: int, error) -> np.ndarray:
    """The step search one candidate at a time: coarse grid of max|w| fractions, fine grid around the best,
    a channel moving to a candidate only when strictly better (all channels live)."""
    qmin, qmax = int_range(bits, True)
    maxabs = np.abs(w2).max(axis=1)
    best_alpha, best_err = np.ones_like(maxabs), np.full(maxabs.shape, np.inf)
    for fine in (False, True):
        alphas = ([np.clip(best_alpha + d, 0.01, 1.0) for d in np.linspace(-0.01, 0.01, 21)] if fine
                  else [np.full_like(maxabs, a) for a in np.linspace(0.05, 1.0, 96)])
        for alpha in alphas:
            err = error((alpha * maxabs / qmax).astype(np.float32))
            better = err < best_err
            best_err, best_alpha = np.where(better, err, best_err), np.where(better, alpha, best_alpha)
    return (best_alpha * maxabs / qmax).astype(np.float32)


def test_step_search_matches_one_candidate_at_a_time() -> None:
    """All candidates of a block at once choose the steps a one-by-one search chooses: exactly for the
    weight's MSE, and for the output MSE (Gram and direct forms) but for near-ties of the error."""
    rng = np.random.default_rng(5)
    w2 = rng.standard_t(3, size=(48, 36)).astype(np.float32)

    def weight_error(s: np.ndarray) -> np.ndarray:
        return ((fake_quant(w2, s[:, None], 0, -8, 7) - w2) ** 2).sum(axis=1)

    np.testing.assert_array_equal(weight_scales(w2, 0, 4, "mse"), _sequential_steps(w2, 4, weight_error))
    for samples in (500, 20):  # Gram form, direct form
        x = rng.normal(size=(samples, 1, 36)).astype(np.float32)
        chosen = weight_scales(w2, 0, 4, "mse", inputs=x)
        ref = _sequential_steps(w2, 4, lambda s: _direct_output_error(w2, s, x, 4))
        assert np.mean(chosen == ref) > 0.9
        np.testing.assert_allclose(_direct_output_error(w2, chosen, x, 4), _direct_output_error(w2, ref, x, 4),
                                   rtol=1e-5)


def _scalar_range_params(lo: float, hi: float, bits: int, symmetric: bool) -> tuple[float, int]:
    """Scale and zero point of [lo, hi] widened to 0, in Python floats (float32-rounded step)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    qmin, qmax = int_range(bits, signed=symmetric)
    if symmetric:
        amax = max(-lo, hi)
        return float(np.float32(amax / qmax if amax > 0 else 1.0)), 0
    scale = float(np.float32((hi - lo) / (qmax - qmin) if hi > lo else 1.0))
    return scale, int(np.clip(np.rint(qmin - lo / scale), qmin, qmax))


@pytest.mark.parametrize("symmetric", [False, True])
def test_activation_range_search_is_the_one_by_one_search(symmetric: bool) -> None:
    """params_mse evaluates every candidate range at once; it picks what trying each in turn picks."""
    rng = np.random.default_rng(9)
    for trial in range(12):
        lo, hi = (-abs(rng.normal()) * 4, abs(rng.normal()) * 4) if trial % 3 else (0.0, abs(rng.normal()) * 4)
        hist = Histogram(lo, hi)
        hist.add(np.clip(rng.standard_t(3, size=20000) + rng.normal(), lo, hi).astype(np.float32))
        lo, hi = float(hist.edges[0]), float(hist.edges[-1])
        fractions = np.linspace(0.05, 1.0, 96)
        if symmetric:
            pairs = [(-f * max(-lo, hi), f * max(-lo, hi)) for f in fractions]
        else:
            pairs = [(a, f * hi) for a in (fractions * lo if lo < 0 else [0.0]) for f in fractions]
        qmin, qmax = int_range(8, symmetric)
        best, best_err = None, np.inf
        for a, b in pairs:
            scale, zp = _scalar_range_params(float(a), float(b), 8, symmetric)
            low, high = (qmin - zp) * scale, (qmax - zp) * scale
            c, h = hist.centers, hist.counts
            err = float((h * np.where(c < low, (c - low) ** 2, np.where(c > high, (c - high) ** 2, scale**2 / 12))).sum())
            if err < best_err * (1 - 1e-9):
                best, best_err = (scale, zp), err
        got = params_mse(hist, 8, symmetric)
        assert (got.scale, got.zero_point) == best
        for a, b in pairs[::7]:
            p = params_for_range(a, b, 8, symmetric)
            assert (p.scale, p.zero_point) == _scalar_range_params(float(a), float(b), 8, symmetric)


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
