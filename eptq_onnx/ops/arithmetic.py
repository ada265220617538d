"""Quantized arithmetic, the one reference: onnxruntime's QuantizeLinear and DequantizeLinear in numpy.

quantize: q = saturate(round_half_to_even(x / scale) + zero_point) into the storage type's range,
with x / scale a float32 division (onnxruntime divides: multiplying by 1 / scale lands on the
other code next to a rounding tie), +-inf saturating and NaN giving qmin (onnxruntime's CPU
kernels). dequantize: (q - zero_point) * scale in float32. A scale and zero point are scalars
(per tensor) or vectors along ``axis`` (per axis, ONNX's ``axis`` attribute).

Every other implementation of this arithmetic (the step search's codes in ``init.quantizers``, the
QDQ writer, the fake-quant reference model, the twin's quantizers, the training kernels) is tested
against these functions (tests/test_arithmetic_implementations.py), and these against onnxruntime
(tests/test_arithmetic.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import ml_dtypes
import numpy as np
from onnx import TensorProto

FLOAT32_EXACT = 1 << 24  # integers up to this magnitude are exact in float32


@dataclass(frozen=True)
class QType:
    """An integer storage type of QuantizeLinear / DequantizeLinear and the opset that introduced it."""

    name: str
    onnx_type: int
    numpy_type: type
    bits: int
    signed: bool
    min_opset: int

    @property
    def qrange(self) -> Tuple[int, int]:
        return int_range(self.bits, self.signed)


QTYPES: Dict[str, QType] = {
    t.name: t
    for t in (
        QType("int8", TensorProto.INT8, np.int8, 8, True, 13),
        QType("uint8", TensorProto.UINT8, np.uint8, 8, False, 13),
        QType("int16", TensorProto.INT16, np.int16, 16, True, 21),
        QType("uint16", TensorProto.UINT16, np.uint16, 16, False, 21),
        QType("int4", TensorProto.INT4, ml_dtypes.int4, 4, True, 21),
        QType("uint4", TensorProto.UINT4, ml_dtypes.uint4, 4, False, 21),
        QType("int2", TensorProto.INT2, ml_dtypes.int2, 2, True, 25),
        QType("uint2", TensorProto.UINT2, ml_dtypes.uint2, 2, False, 25),
        QType("int32", TensorProto.INT32, np.int32, 32, True, 13),  # biases (DequantizeLinear only)
    )
}


def int_range(bits: int, signed: bool) -> Tuple[int, int]:
    """Integer range of a ``bits``-bit code: [-2^(b-1), 2^(b-1)-1] signed, [0, 2^b-1] unsigned."""
    if signed:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def qtype(bits: int, signed: bool) -> QType:
    """The storage type of ``bits``-bit signed or unsigned codes."""
    return next(t for t in QTYPES.values() if t.bits == bits and t.signed == signed)


def along(v: np.ndarray | float | int, ndim: int, axis: Optional[int]) -> np.ndarray:
    """A scale or zero point shaped to broadcast against a rank-``ndim`` tensor: as it is per
    tensor (``axis`` None), a vector laid along ``axis`` per axis."""
    v = np.asarray(v)
    if ndim == 0 and v.size == 1:
        return v.reshape(())
    if axis is None or ndim == 0:
        return v
    shape = [1] * ndim
    shape[axis] = -1
    return v.reshape(shape)


def quantize_codes(x: np.ndarray, scale: np.ndarray | float, zero_point: np.ndarray | int, qmin: int, qmax: int,
                   axis: Optional[int] = None) -> np.ndarray:
    """The integer codes of ``x`` (as floats: float32, float64 for ranges float32 does not hold exactly)."""
    x = np.asarray(x, dtype=np.float32)
    scale = along(np.asarray(scale, dtype=np.float32), x.ndim, axis)
    wide = max(-qmin, qmax) >= FLOAT32_EXACT
    rounded = np.rint(x / scale)
    if wide:
        rounded = rounded.astype(np.float64)
    q = rounded + along(np.asarray(zero_point, dtype=np.float64 if wide else np.float32), x.ndim, axis)
    return np.fmin(np.fmax(q, qmin), qmax)  # fmax takes qmin for NaN


def quantize(x: np.ndarray, scale: np.ndarray | float, zero_point: np.ndarray | int, qtype: QType,
             axis: Optional[int] = None) -> np.ndarray:
    """QuantizeLinear: the codes of ``x`` in ``qtype``'s numpy type."""
    qmin, qmax = qtype.qrange
    return quantize_codes(x, scale, zero_point, qmin, qmax, axis).astype(np.int64).astype(qtype.numpy_type)


def dequantize(q: np.ndarray, scale: np.ndarray | float, zero_point: np.ndarray | int = 0,
               axis: Optional[int] = None) -> np.ndarray:
    """DequantizeLinear: (q - zero_point) * scale, the difference exact and rounded once to float32."""
    q = np.asarray(q)
    wide = q.dtype.itemsize >= 4 and q.dtype != np.float32  # int32/int64 codes or float64 ones
    work = np.float64 if wide else np.float32
    diff = q.astype(work) - along(np.asarray(zero_point, dtype=work), q.ndim, axis)
    return diff.astype(np.float32) * along(np.asarray(scale, dtype=np.float32), q.ndim, axis)


def fake_quant(x: np.ndarray, scale: np.ndarray | float, zero_point: np.ndarray | int, qmin: int, qmax: int,
               axis: Optional[int] = None) -> np.ndarray:
    """Quantize then dequantize (what a QuantizeLinear -> DequantizeLinear pair computes)."""
    return dequantize(quantize_codes(x, scale, zero_point, qmin, qmax, axis), scale, zero_point, axis)
