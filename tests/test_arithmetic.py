"""The quantized-arithmetic reference (eptq_onnx.ops.arithmetic) against onnxruntime's QuantizeLinear and
DequantizeLinear: rounding ties, saturation, zero points, per tensor and per axis, every storage type."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from eptq_onnx.ops.arithmetic import QTYPES, QType, dequantize, fake_quant, quantize, quantize_codes
from eptq_onnx.graph.runtime import make_session

SCALES = (2.0**-4, 0.0123, 3.7, 1e-3)


def _opset(qt: QType) -> int:
    return max(13, qt.min_opset)


def _session(qt: QType, shape: Sequence[int], scale: np.ndarray, zero_point: np.ndarray, axis: Optional[int]):
    """x -> QuantizeLinear -> (codes cast to int32, DequantizeLinear); optimizations off."""
    kwargs = {} if axis is None else {"axis": axis}
    graph = helper.make_graph(
        [
            helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], **kwargs),
            helper.make_node("Cast", ["q"], ["codes"], to=TensorProto.INT32),
            helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], **kwargs),
        ],
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info("codes", TensorProto.INT32, list(shape)),
         helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))],
        initializer=[numpy_helper.from_array(scale.astype(np.float32), "s"),
                     numpy_helper.from_array(zero_point.astype(np.int64).astype(qt.numpy_type), "z")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", _opset(qt))])
    model.ir_version = 10 if _opset(qt) < 25 else 11
    return make_session(model, optimize=False)


def tie_values(scale: float, zero_point: int, qmin: int, qmax: int, limit: int = 600) -> np.ndarray:
    """Values whose x / scale (float32) is exactly k + 0.5 over the grid and a few codes beyond it,
    their float32 neighbours (where multiplying by 1 / scale rounds differently), saturating and
    non-finite values, signed zeros and random values."""
    s = np.float32(scale)
    lo, hi = qmin - zero_point - 3, qmax - zero_point + 3
    k = np.arange(lo, hi + 1) if hi - lo <= limit else np.unique(np.concatenate(
        [np.arange(lo, lo + limit // 3), np.linspace(lo, hi, limit // 3).astype(np.int64), np.arange(hi - limit // 3, hi + 1)]))
    halves = (k + 0.5).astype(np.float32)
    x = (halves.astype(np.float64) * np.float64(s)).astype(np.float32)
    ties = x[(x / s) == halves]
    neighbours = [(ties.view(np.int32) + d).view(np.float32) for d in (-2, -1, 1, 2)]
    far = np.array([(hi + 50) * s, (lo - 50) * s, 1e30, -1e30, np.inf, -np.inf, np.nan, 0.0, -0.0], dtype=np.float32)
    rng = np.random.default_rng(0)
    spread = (rng.uniform(lo - 5, hi + 5, 400) * s).astype(np.float32)
    return np.concatenate([ties, *neighbours, far, spread])


def zero_points(qt: QType) -> List[int]:
    qmin, qmax = qt.qrange
    return sorted({0, qmin, qmax, (qmin + qmax) // 2, min(qmax, 1 if qt.signed else 3)} if not qt.signed else
                  {0, qmin, qmax, -1, min(qmax, 2)})


def _assert_matches_onnxruntime(qt: QType, x: np.ndarray, scale: np.ndarray, zp: np.ndarray, axis: Optional[int]) -> None:
    codes, y = _session(qt, x.shape, scale, zp, axis).run(None, {"x": x})
    mine = quantize(x, scale, zp, qt, axis)
    np.testing.assert_array_equal(mine.astype(np.int64), codes.astype(np.int64))
    qmin, qmax = qt.qrange
    np.testing.assert_array_equal(quantize_codes(x, scale, zp, qmin, qmax, axis), codes.astype(np.float64))
    np.testing.assert_array_equal(dequantize(mine, scale, zp, axis), y)
    np.testing.assert_array_equal(fake_quant(x, scale, zp, qmin, qmax, axis), y)


STORAGE = [name for name in QTYPES if name != "int32"]


@pytest.mark.parametrize("name", STORAGE)
def test_per_tensor_quantize_and_dequantize_match_onnxruntime(name: str) -> None:
    """Every scale and zero point, one QuantizeLinear -> DequantizeLinear each."""
    qt = QTYPES[name]
    qmin, qmax = qt.qrange
    for scale in SCALES:
        for zp in zero_points(qt):
            x = tie_values(scale, zp, qmin, qmax)
            _assert_matches_onnxruntime(qt, x, np.array(scale), np.array(zp), None)


def _per_axis_case(qt: QType, channels_last: bool) -> Tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """One channel per (scale, zero point): x [C, N] (axis 0) or [N, C] (axis 1)."""
    qmin, qmax = qt.qrange
    pairs = [(s, z) for s in SCALES for z in zero_points(qt)]
    rows = [tie_values(s, z, qmin, qmax) for s, z in pairs]
    width = max(len(r) for r in rows)
    x = np.stack([np.resize(r, width) for r in rows])
    scale = np.array([s for s, _ in pairs], dtype=np.float32)
    zp = np.array([z for _, z in pairs])
    return (np.ascontiguousarray(x.T), scale, zp, 1) if channels_last else (x, scale, zp, 0)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("name", STORAGE)
def test_per_axis_quantize_and_dequantize_match_onnxruntime(name: str, channels_last: bool) -> None:
    qt = QTYPES[name]
    x, scale, zp, axis = _per_axis_case(qt, channels_last)
    _assert_matches_onnxruntime(qt, x, scale, zp, axis)


def test_int32_dequantize_matches_onnxruntime() -> None:
    """int32 codes (biases), per axis, up to the int32 limits: one rounding to float32."""
    rng = np.random.default_rng(1)
    codes = np.concatenate([rng.integers(-2**31, 2**31, 300), [2**31 - 1, -2**31, -(2**31 - 1), 0, 2**24 + 1, -(2**24 + 3)]])
    codes = np.resize(codes, (3, 102)).astype(np.int32)
    scale = np.array([1e-6, 0.37, 2.0**-20], dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], axis=0)], "dq",
        [helper.make_tensor_value_info("q", TensorProto.INT32, list(codes.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(codes.shape))],
        initializer=[numpy_helper.from_array(scale, "s"), numpy_helper.from_array(np.zeros(3, np.int32), "z")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    (y,) = make_session(model, optimize=False).run(None, {"q": codes})
    np.testing.assert_array_equal(dequantize(codes, scale, 0, axis=0), y)
    np.testing.assert_array_equal(dequantize(codes.astype(np.float64), scale, 0, axis=0), y)


def test_the_cases_hold_exact_ties_and_values_a_reciprocal_rounds_differently() -> None:
    """The test values exercise what they claim: exact .5 ties, and near-ties where x * (1 / s)
    and x / s give different codes (onnxruntime divides)."""
    s = np.float32(0.0123)
    x = tie_values(float(s), 0, -128, 127)
    finite = x[np.isfinite(x)]
    assert np.count_nonzero(np.abs(finite / s - np.floor(finite / s)) == 0.5) > 100
    reciprocal = np.rint(finite * np.float32(1.0 / np.float64(s)))
    assert np.count_nonzero(reciprocal != np.rint(finite / s)) > 5
