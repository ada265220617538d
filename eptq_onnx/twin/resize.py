"""ONNX Resize in torch: every coordinate transformation, nearest/linear/cubic modes, as onnxruntime computes them."""
from __future__ import annotations

from typing import Callable, Optional, Sequence
import numpy as np
import torch
from torch import Tensor, nn


def _f32(value: float) -> np.float32:
    return np.float32(value)

class ResizeOp(nn.Module):
    """ONNX Resize 11-19 as onnxruntime computes it: nearest/linear/cubic, separable, one axis at a time.

    Every coordinate transformation mode except tf_crop_and_resize; ``axes`` and
    ``keep_aspect_ratio_policy`` (opset 18). Antialiasing is not supported.
    """

    def __init__(self, mode: str = "nearest", coordinate_transformation_mode: str = "half_pixel",
                 nearest_mode: str = "round_prefer_floor", cubic_coeff_a: float = -0.75,
                 exclude_outside: bool = False, axes: Optional[Sequence[int]] = None,
                 keep_aspect_ratio_policy: str = "stretch") -> None:
        super().__init__()
        if mode not in ("nearest", "linear", "cubic"):
            raise NotImplementedError(f"Resize mode {mode}")
        if coordinate_transformation_mode not in _COORDINATES:
            raise NotImplementedError(f"Resize coordinate_transformation_mode {coordinate_transformation_mode}")
        if nearest_mode not in _ROUNDINGS:
            raise NotImplementedError(f"Resize nearest_mode {nearest_mode}")
        if keep_aspect_ratio_policy not in ("stretch", "not_larger", "not_smaller"):
            raise NotImplementedError(f"Resize keep_aspect_ratio_policy {keep_aspect_ratio_policy}")
        self.mode, self.coordinates, self.nearest_mode = mode, coordinate_transformation_mode, nearest_mode
        self.cubic_coeff_a, self.exclude_outside = cubic_coeff_a, exclude_outside
        self.axes = tuple(axes) if axes else None
        self.policy = keep_aspect_ratio_policy

    def forward(self, x: Tensor, roi: Optional[Tensor] = None, scales: Optional[Tensor] = None,
                sizes: Optional[Tensor] = None) -> Tensor:
        axes = [a % x.dim() for a in self.axes] if self.axes else list(range(x.dim()))
        lengths = [int(x.shape[a]) for a in axes]
        outputs, factors = self._targets(lengths, scales, sizes)
        for axis, length, out, factor in zip(axes, lengths, outputs, factors):
            if out != length or factor != 1:
                x = self._resize_axis(x, axis, length, out, factor)
        return x

    def _targets(self, lengths: list[int], scales: Optional[Tensor],
                 sizes: Optional[Tensor]) -> tuple[list[int], list[np.float32]]:
        """Output lengths and float32 scale factors along the resized axes."""
        if sizes is not None and sizes.numel() > 0:
            wanted = [int(s) for s in sizes.tolist()]
            factors = [_f32(w) / _f32(n) for w, n in zip(wanted, lengths)]
            if self.policy == "stretch":
                return wanted, factors
            factor = min(factors) if self.policy == "not_larger" else max(factors)
            return [int(np.floor(factor * _f32(n) + _f32(0.5))) for n in lengths], [factor] * len(lengths)
        if scales is None or scales.numel() == 0:
            raise ValueError("Resize needs scales or sizes")
        factors = [_f32(s) for s in scales.tolist()]
        return [int(np.floor(_f32(n) * f)) for n, f in zip(lengths, factors)], factors

    def _resize_axis(self, x: Tensor, axis: int, length: int, out: int, factor: np.float32) -> Tensor:
        source = _COORDINATES[self.coordinates](torch.arange(out, dtype=torch.float32), factor, length, out)
        index, weight = self._taps(source, length)
        shape = (out,) + (1,) * (x.dim() - axis - 1)
        result: Optional[Tensor] = None
        for tap in range(index.shape[1]):
            term = x.index_select(axis, index[:, tap])
            if weight is not None:
                term = term * weight[:, tap].reshape(shape).to(x.dtype)
            result = term if result is None else result + term
        assert result is not None
        return result

    def _taps(self, source: Tensor, length: int) -> tuple[Tensor, Optional[Tensor]]:
        """Input indices [out, taps] and their weights (None: one tap of weight 1)."""
        if self.mode == "nearest":
            index = _ROUNDINGS[self.nearest_mode](source).long().clamp(0, length - 1)
            return index[:, None], None
        if self.mode == "linear":
            source = source.clamp(0, length - 1)
            low = source.floor()
            ratio = source - low
            index = torch.stack([low, low + 1], 1).long().clamp(0, length - 1)
            return index, torch.stack([1 - ratio, ratio], 1)
        low = source.floor()
        index = low.long()[:, None] + torch.arange(-1, 3)[None, :]
        weight = _cubic_weights(source - low, self.cubic_coeff_a)
        if self.exclude_outside:
            weight = torch.where((index < 0) | (index >= length), 0.0, weight)
            weight = weight / weight.sum(1, keepdim=True)
        return index.clamp(0, length - 1), weight

def _cubic_weights(ratio: Tensor, a: float) -> Tensor:
    """Keys cubic convolution weights of the 4 taps around each source coordinate."""
    def near(t: Tensor) -> Tensor:  # |t| <= 1
        return ((a + 2) * t - (a + 3)) * t * t + 1

    def far(t: Tensor) -> Tensor:  # 1 < |t| < 2
        return ((a * t - 5 * a) * t + 8 * a) * t - 4 * a

    return torch.stack([far(ratio + 1), near(ratio), near(1 - ratio), far(2 - ratio)], 1)

def _half_pixel(y: Tensor, s: np.float32, n: int, out: int) -> Tensor:
    return (y + 0.5) / float(s) - 0.5

def _pytorch_half_pixel(y: Tensor, s: np.float32, n: int, out: int) -> Tensor:
    return _half_pixel(y, s, n, out) if out > 1 else torch.zeros_like(y)

def _align_corners(y: Tensor, s: np.float32, n: int, out: int) -> Tensor:
    return y * float(n - 1) / float(out - 1) if out > 1 else torch.zeros_like(y)

def _asymmetric(y: Tensor, s: np.float32, n: int, out: int) -> Tensor:
    return y / float(s)

def _half_pixel_symmetric(y: Tensor, s: np.float32, n: int, out: int) -> Tensor:
    adjustment = _f32(out) / (s * _f32(n))
    offset = _f32(n) / _f32(2) * (_f32(1) - adjustment)
    return float(offset) + _half_pixel(y, s, n, out)

_COORDINATES: dict[str, Callable[[Tensor, np.float32, int, int], Tensor]] = {
    "half_pixel": _half_pixel,
    "pytorch_half_pixel": _pytorch_half_pixel,
    "align_corners": _align_corners,
    "asymmetric": _asymmetric,
    "half_pixel_symmetric": _half_pixel_symmetric,
}

_ROUNDINGS: dict[str, Callable[[Tensor], Tensor]] = {
    "round_prefer_floor": lambda t: torch.ceil(t - 0.5),
    "round_prefer_ceil": lambda t: torch.floor(t + 0.5),
    "floor": torch.floor,
    "ceil": torch.ceil,
}
