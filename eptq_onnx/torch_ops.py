"""Torch modules for ONNX ops, built by :mod:`eptq_onnx.torch_convert`.

Weighted ops (:class:`WeightedOp`: Conv/ConvTranspose, Gemm, MatMul, Gather with a constant weight)
keep the weight as an ``nn.Parameter`` in ONNX layout (the initializer's shape), so per-channel
axes of the quantization plan apply unchanged, and read it through ``effective_weight()``: a
quantizer plugged in as ``weight_quant`` (or ``bias_quant``) is applied on every forward.

The other modules implement ONNX semantics that onnx2torch 1.5.15 lacks or gets wrong
(opset-18 Reduce*/Pad/Split/Resize, Gelu, GroupNormalization, ...). All follow onnxruntime's
CPU kernels, including their float32 arithmetic where it decides an index (Resize).
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

Ints = tuple[int, ...]


# ---------------------------------------------------------------- weighted ops


class WeightedOp(nn.Module):
    """Base of the ops with a constant weight: parameters in ONNX layout plus quantizer hooks."""

    weight: nn.Parameter
    bias: Optional[nn.Parameter]
    weight_quant: Optional[nn.Module]
    bias_quant: Optional[nn.Module]

    def __init__(self, weight: Tensor, weight_name: str, bias: Optional[Tensor] = None,
                 bias_name: Optional[str] = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())
        self.register_parameter("bias", None if bias is None else nn.Parameter(bias.detach().clone()))
        self.weight_name = weight_name
        self.bias_name = bias_name if bias is not None else None
        self.register_module("weight_quant", None)
        self.register_module("bias_quant", None)
        self.trained_bias: Optional[Tensor] = None  # set while a twin.BiasBank trains the bias: used as it is

    def effective_weight(self) -> Tensor:
        """The weight the op computes with: ``weight_quant(weight)`` when a quantizer is set (its
        ``soft`` weight as it is while a rounding bank trains it: no module call per step)."""
        quantizer = self.weight_quant
        if quantizer is None:
            return self.weight
        soft = getattr(quantizer, "soft", None)
        return soft if soft is not None and quantizer.enabled else quantizer(self.weight)

    def effective_bias(self) -> Optional[Tensor]:
        """The bias the op computes with (``bias_quant(bias)`` when set), or None."""
        if self.trained_bias is not None:
            return self.trained_bias
        if self.bias is None or self.bias_quant is None:
            return self.bias
        return self.bias_quant(self.bias)

    def extra_repr(self) -> str:
        return f"weight={self.weight_name!r} {tuple(self.weight.shape)}, bias={self.bias_name!r}"


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def torch_pads(begin: Sequence[int], end: Sequence[int]) -> list[int]:
    """ONNX per-axis (begin, end) pads as F.pad's list: last axis first."""
    pads: list[int] = []
    for b, e in zip(reversed(begin), reversed(end)):
        pads += [b, e]
    return pads


def _split_pads(total: int, upper: bool) -> tuple[int, int]:
    """(begin, end) of ``total`` padding: SAME_UPPER puts the odd one at the end, SAME_LOWER at the begin."""
    small = total // 2
    return (small, total - small) if upper else (total - small, small)


class ConvOp(WeightedOp):
    """ONNX Conv / ConvTranspose with 1-3 spatial dims; weight [M, C/group, k...] / [C, M/group, k...]."""

    def __init__(self, weight: Tensor, weight_name: str, bias: Optional[Tensor] = None,
                 bias_name: Optional[str] = None, *, transpose: bool = False,
                 strides: Optional[Sequence[int]] = None, dilations: Optional[Sequence[int]] = None,
                 group: int = 1, pads: Optional[Sequence[int]] = None, auto_pad: str = "NOTSET",
                 output_padding: Optional[Sequence[int]] = None,
                 output_shape: Optional[Sequence[int]] = None) -> None:
        super().__init__(weight, weight_name, bias, bias_name)
        rank = weight.dim() - 2
        if rank not in _CONV:
            raise NotImplementedError(f"Conv with {rank} spatial dims")
        if auto_pad not in ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"):
            raise NotImplementedError(f"auto_pad {auto_pad}")
        self.transpose = transpose
        self.strides: Ints = tuple(strides or (1,) * rank)
        self.dilations: Ints = tuple(dilations or (1,) * rank)
        self.group = group
        self.pads: Ints = tuple(pads or (0,) * (2 * rank))
        self.auto_pad = auto_pad
        self.output_padding: Ints = tuple(output_padding or (0,) * rank)
        self.output_shape: Optional[Ints] = tuple(output_shape[-rank:]) if output_shape else None

    @property
    def _extents(self) -> Ints:
        """Dilated kernel sizes."""
        return tuple((k - 1) * d + 1 for k, d in zip(self.weight.shape[2:], self.dilations))

    def _conv_pads(self, sizes: Sequence[int]) -> tuple[list[int], list[int]]:
        rank = len(sizes)
        if self.auto_pad == "VALID":
            return [0] * rank, [0] * rank
        if self.auto_pad == "NOTSET":
            return list(self.pads[:rank]), list(self.pads[rank:])
        totals = [max(0, (math.ceil(n / s) - 1) * s + k - n) for n, s, k in zip(sizes, self.strides, self._extents)]
        pairs = [_split_pads(t, self.auto_pad == "SAME_UPPER") for t in totals]
        return [b for b, _ in pairs], [e for _, e in pairs]

    def _transpose_pads(self, sizes: Sequence[int]) -> tuple[list[int], list[int]]:
        if self.output_shape is None and self.auto_pad in ("NOTSET", "VALID"):
            rank = len(sizes)
            pads = self.pads if self.auto_pad == "NOTSET" else (0,) * (2 * rank)
            return list(pads[:rank]), list(pads[rank:])
        targets = self.output_shape or tuple(n * s for n, s in zip(sizes, self.strides))
        full = [(n - 1) * s + p + k for n, s, p, k in zip(sizes, self.strides, self.output_padding, self._extents)]
        # As the ONNX spec says: SAME_UPPER pads more at the end, anything else more at the begin.
        pairs = [_split_pads(max(0, f - t), self.auto_pad == "SAME_UPPER") for f, t in zip(full, targets)]
        return [b for b, _ in pairs], [e for _, e in pairs]

    def forward(self, x: Tensor) -> Tensor:
        weight, bias = self.effective_weight(), self.effective_bias()
        sizes = x.shape[2:]
        if self.transpose:
            return self._forward_transpose(x, weight, bias, sizes)
        begin, end = self._conv_pads(sizes)
        padding: list[int] | int = begin
        if begin != end:
            x, padding = F.pad(x, torch_pads(begin, end)), 0
        return _CONV[len(sizes)](x, weight, bias, self.strides, padding, self.dilations, self.group)

    def _forward_transpose(self, x: Tensor, weight: Tensor, bias: Optional[Tensor], sizes: Sequence[int]) -> Tensor:
        """Full transposed conv, then crop the pads and grow by output_padding, then add the bias."""
        begin, end = self._transpose_pads(sizes)
        y = _CONV_TRANSPOSE[len(sizes)](x, weight, None, self.strides, 0, 0, self.group, self.dilations)
        ends = [p - e for p, e in zip(self.output_padding, end)]
        y = F.pad(y, torch_pads([-b for b in begin], ends))
        if bias is not None:
            y = y + bias.reshape(1, -1, *([1] * len(sizes)))
        return y


class GemmOp(WeightedOp):
    """ONNX Gemm with constant B: ``alpha * A' @ B' + beta * C`` (B kept as stored, [K,N] or [N,K])."""

    def __init__(self, weight: Tensor, weight_name: str, bias: Optional[Tensor] = None,
                 bias_name: Optional[str] = None, *, alpha: float = 1.0, beta: float = 1.0,
                 trans_a: bool = False, trans_b: bool = False) -> None:
        super().__init__(weight, weight_name, bias, bias_name)
        self.alpha, self.beta, self.trans_a, self.trans_b = alpha, beta, trans_a, trans_b

    def forward(self, a: Tensor) -> Tensor:
        weight, bias = self.effective_weight(), self.effective_bias()
        y = F.linear(a.t() if self.trans_a else a, weight if self.trans_b else weight.t())
        if self.alpha != 1.0:
            y = y * self.alpha
        if bias is not None:
            y = y + (bias if self.beta == 1.0 else bias * self.beta)
        return y


class MatMulOp(WeightedOp):
    """ONNX MatMul (numpy broadcasting) with a constant operand: ``x @ W`` (input 1) or ``W @ x`` (input 0)."""

    def __init__(self, weight: Tensor, weight_name: str, *, weight_input: int = 1) -> None:
        super().__init__(weight, weight_name)
        if weight_input not in (0, 1):
            raise ValueError(f"MatMul weight_input must be 0 or 1, got {weight_input}")
        self.weight_input = weight_input

    def forward(self, x: Tensor) -> Tensor:
        weight = self.effective_weight()
        return torch.matmul(x, weight) if self.weight_input == 1 else torch.matmul(weight, x)


class GatherOp(WeightedOp):
    """ONNX Gather from a constant table (e.g. an embedding); negative indices count from the end."""

    def __init__(self, weight: Tensor, weight_name: str, *, axis: int = 0) -> None:
        super().__init__(weight, weight_name)
        self.axis = axis % weight.dim()

    def forward(self, indices: Tensor) -> Tensor:
        weight = self.effective_weight()
        size = weight.shape[self.axis]
        indices = torch.where(indices < 0, indices + size, indices).long()
        rows = weight.index_select(self.axis, indices.reshape(-1))
        return rows.reshape(*weight.shape[: self.axis], *indices.shape, *weight.shape[self.axis + 1 :])


# ---------------------------------------------------------------- other ops


class Functional(nn.Module):
    """An op computed by one function of its inputs, with fixed keyword attributes."""

    def __init__(self, fn: Callable[..., Tensor], **attrs: object) -> None:
        super().__init__()
        self.fn, self.attrs = fn, attrs

    def forward(self, *inputs: Tensor) -> Tensor:
        return self.fn(*inputs, **self.attrs)

    def extra_repr(self) -> str:
        return f"{getattr(self.fn, '__name__', self.fn)}, {self.attrs}"


def swish(x: Tensor, alpha: float = 1.0) -> Tensor:
    return x * torch.sigmoid(alpha * x)


def global_max_pool(x: Tensor) -> Tensor:
    return torch.amax(x, dim=tuple(range(2, x.dim())), keepdim=True)


def space_to_depth(x: Tensor, blocksize: int) -> Tensor:
    """ONNX SpaceToDepth: output channel (i * b + j) * C + c (unlike F.pixel_unshuffle)."""
    n, c, h, w = x.shape
    b = blocksize
    y = x.reshape(n, c, h // b, b, w // b, b).permute(0, 3, 5, 1, 2, 4)
    return y.reshape(n, c * b * b, h // b, w // b)


def reshape(x: Tensor, shape: Tensor, allowzero: bool = False) -> Tensor:
    """ONNX Reshape: a 0 copies the input dim unless ``allowzero``; -1 is inferred."""
    dims = [int(d) for d in shape.tolist()]
    if not allowzero:
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return x.reshape(dims)


def cast_like(x: Tensor, like: Tensor) -> Tensor:
    return x.to(like.dtype)


class ClipOp(nn.Module):
    """ONNX Clip 11+: min and max are optional inputs (constant or not)."""

    def forward(self, x: Tensor, low: Optional[Tensor] = None, high: Optional[Tensor] = None) -> Tensor:
        return x if low is None and high is None else torch.clamp(x, low, high)


def _sum_square(x: Tensor, dims: list[int], keep: bool) -> Tensor:
    return torch.sum(x * x, dims, keep)


def _prod(x: Tensor, dims: list[int], keep: bool) -> Tensor:
    for dim in sorted(dims, reverse=True):
        x = torch.prod(x, dim, keep)
    return x


_REDUCERS: dict[str, Callable[[Tensor, list[int], bool], Tensor]] = {
    "ReduceMean": lambda x, d, k: torch.mean(x, d, k),
    "ReduceSum": lambda x, d, k: torch.sum(x, d, k),
    "ReduceMax": lambda x, d, k: torch.amax(x, d, k),
    "ReduceMin": lambda x, d, k: torch.amin(x, d, k),
    "ReduceProd": _prod,
    "ReduceL1": lambda x, d, k: torch.linalg.vector_norm(x, 1, d, k),
    "ReduceL2": lambda x, d, k: torch.linalg.vector_norm(x, 2, d, k),
    "ReduceLogSum": lambda x, d, k: torch.log(torch.sum(x, d, k)),
    "ReduceLogSumExp": lambda x, d, k: torch.logsumexp(x, d, k),
    "ReduceSumSquare": _sum_square,
}
REDUCE_OPS = tuple(_REDUCERS)


class ReduceOp(nn.Module):
    """ONNX Reduce* with axes as an input (opset 18+; ReduceSum 13+)."""

    def __init__(self, op_type: str, keepdims: bool = True, noop_with_empty_axes: bool = False) -> None:
        super().__init__()
        self.op_type, self.keepdims, self.noop = op_type, keepdims, noop_with_empty_axes

    def forward(self, x: Tensor, axes: Optional[Tensor] = None) -> Tensor:
        dims = [] if axes is None else [int(a) % max(x.dim(), 1) for a in axes.tolist()]
        if not dims:
            if self.noop:
                return x
            dims = list(range(x.dim()))
        return _REDUCERS[self.op_type](x, sorted(set(dims)), self.keepdims)


_PAD_MODES = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}


class PadOp(nn.Module):
    """ONNX Pad 11+ (pads, constant_value and, from opset 18, axes as inputs); negative pads crop."""

    def __init__(self, mode: str = "constant") -> None:
        super().__init__()
        if mode not in _PAD_MODES:
            raise NotImplementedError(f"Pad mode {mode}")
        self.mode = _PAD_MODES[mode]

    def forward(self, x: Tensor, pads: Tensor, constant_value: Optional[Tensor] = None,
                axes: Optional[Tensor] = None) -> Tensor:
        rank = x.dim()
        axis_list = list(range(rank)) if axes is None else [int(a) % rank for a in axes.tolist()]
        values = [int(p) for p in pads.tolist()]
        begin, end = [0] * rank, [0] * rank
        for i, axis in enumerate(axis_list):
            begin[axis], end[axis] = values[i], values[i + len(axis_list)]
        if any(p < 0 for p in begin + end):
            x = F.pad(x, torch_pads([min(p, 0) for p in begin], [min(p, 0) for p in end]))
            begin, end = [max(p, 0) for p in begin], [max(p, 0) for p in end]
        if self.mode == "constant":
            value = 0.0 if constant_value is None or constant_value.numel() == 0 else float(constant_value)
            return F.pad(x, torch_pads(begin, end), value=value)
        return _pad_trailing(x, begin, end, self.mode)


def _pad_trailing(x: Tensor, begin: list[int], end: list[int], mode: str) -> Tensor:
    """Reflect/replicate/circular padding of the trailing 1-3 axes, whatever the rank."""
    padded = [i for i, (b, e) in enumerate(zip(begin, end)) if b or e]
    if not padded:
        return x
    first = padded[0]
    if x.dim() - first > 3:
        raise NotImplementedError(f"Pad mode {mode} on more than the last 3 axes")
    lead, tail = x.shape[:first], x.shape[first:]
    y = F.pad(x.reshape(1, -1, *tail), torch_pads(begin[first:], end[first:]), mode=mode)
    return y.reshape(*lead, *y.shape[2:])


class SplitOp(nn.Module):
    """ONNX Split 18: sizes from the ``split`` input, else ``num_outputs`` chunks (the last may be smaller)."""

    def __init__(self, axis: int, num_outputs: int) -> None:
        super().__init__()
        self.axis, self.num_outputs = axis, num_outputs

    def forward(self, x: Tensor, split: Optional[Tensor] = None) -> tuple[Tensor, ...]:
        if split is not None and split.numel() > 0:
            return torch.split(x, [int(s) for s in split.tolist()], self.axis)
        return torch.split(x, math.ceil(x.shape[self.axis] / self.num_outputs), self.axis)


class GroupNormOp(nn.Module):
    """ONNX GroupNormalization: scale/bias per group (opset 18) or per channel (opset 21)."""

    def __init__(self, num_groups: int, epsilon: float = 1e-5, per_group_affine: bool = False) -> None:
        super().__init__()
        self.num_groups, self.epsilon, self.per_group_affine = num_groups, epsilon, per_group_affine

    def forward(self, x: Tensor, scale: Tensor, bias: Tensor) -> Tensor:
        y = F.group_norm(x, self.num_groups, eps=self.epsilon)
        if self.per_group_affine:
            repeats = x.shape[1] // self.num_groups
            scale, bias = scale.repeat_interleave(repeats), bias.repeat_interleave(repeats)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return y * scale.reshape(shape) + bias.reshape(shape)


class LayerNormOp(nn.Module):
    """ONNX LayerNormalization over axes ``axis..`` (scale/bias broadcast), or RMSNormalization (no mean)."""

    def __init__(self, axis: int = -1, epsilon: float = 1e-5, rms: bool = False) -> None:
        super().__init__()
        self.axis, self.epsilon, self.rms = axis, epsilon, rms

    def forward(self, x: Tensor, scale: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        dims = tuple(range(self.axis % x.dim(), x.dim()))
        if self.rms:
            y = x * torch.rsqrt(torch.mean(x * x, dims, keepdim=True) + self.epsilon)
        else:
            y = F.layer_norm(x, x.shape[dims[0]:], eps=self.epsilon)
        y = y * scale
        return y if bias is None else y + bias


# ---------------------------------------------------------------- Resize


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


# ---------------------------------------------------------------- recurrent ops (left float)


def _lstm_cell(x_t: Tensor, state: tuple[Tensor, ...], w: Tensor, r: Tensor, b: Tensor, extra: dict) -> tuple[Tensor, ...]:
    """One ONNX LSTM step (gates i, o, f, c; default activations, no peepholes)."""
    h, c = state
    i, o, f, g = (x_t @ w.T + h @ r.T + b).chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def _gru_cell(x_t: Tensor, state: tuple[Tensor, ...], w: Tensor, r: Tensor, b: Tensor, extra: dict) -> tuple[Tensor, ...]:
    """One ONNX GRU step (gates z, r, h; default activations, either linear_before_reset)."""
    (h,) = state
    hidden = h.shape[-1]
    wb, rb = b[: 3 * hidden], b[3 * hidden:]
    xz, xr, xh = (x_t @ w.T + wb).chunk(3, dim=-1)
    rz, rr, rh = r.chunk(3, dim=0)
    rbz, rbr, rbh = rb.chunk(3)
    z = torch.sigmoid(xz + h @ rz.T + rbz)
    reset = torch.sigmoid(xr + h @ rr.T + rbr)
    if extra["linear_before_reset"]:
        candidate = torch.tanh(xh + reset * (h @ rh.T + rbh))
    else:
        candidate = torch.tanh(xh + (reset * h) @ rh.T + rbh)
    return ((1 - z) * candidate + z * h,)


class RecurrentOp(nn.Module):
    """ONNX LSTM / GRU (forward, reverse or bidirectional; layout 0) as an explicit loop.

    Inputs in ONNX order: X, W, R, B, sequence_lens (must be absent), initial_h (, initial_c).
    Outputs Y, Y_h (, Y_c). The op stays float: its weights are plain buffers.
    """

    def __init__(self, kind: str, hidden: int, direction: str, linear_before_reset: bool = False, outputs: int = 3) -> None:
        super().__init__()
        self.kind, self.hidden = kind, hidden
        self.outputs = outputs  # how many outputs the node declares (trailing ones may be omitted)
        self.directions = {"forward": [False], "reverse": [True], "bidirectional": [False, True]}[direction]
        self.cell = _lstm_cell if kind == "LSTM" else _gru_cell
        self.extra = {"linear_before_reset": linear_before_reset}
        self.states = 2 if kind == "LSTM" else 1

    def forward(self, x: Tensor, w: Tensor, r: Tensor, b: Optional[Tensor] = None, seq_lens: Optional[Tensor] = None,
                initial_h: Optional[Tensor] = None, initial_c: Optional[Tensor] = None) -> Tensor | tuple[Tensor, ...]:
        """Y alone when the node declares only Y (as the fx graph then expects a tensor), else (Y, Y_h[, Y_c])."""
        initial = (initial_h, initial_c)
        if seq_lens is not None:
            raise NotImplementedError(f"{self.kind} with sequence_lens")
        steps, batch = x.shape[0], x.shape[1]
        gates = w.shape[1] // self.hidden
        if b is None:
            b = x.new_zeros(len(self.directions), 2 * gates * self.hidden)
        ys, finals = [], []
        for d, reverse in enumerate(self.directions):
            state = tuple(
                initial[k][d] if initial[k] is not None else x.new_zeros(batch, self.hidden)
                for k in range(self.states)
            )
            bias = b[d] if self.kind == "GRU" else b[d, : 4 * self.hidden] + b[d, 4 * self.hidden:]
            outputs: list[Tensor] = [x.new_zeros(0)] * steps
            for t in (reversed(range(steps)) if reverse else range(steps)):
                state = self.cell(x[t], state, w[d], r[d], bias, self.extra)
                outputs[t] = state[0]
            ys.append(torch.stack(outputs))
            finals.append(state)
        y = torch.stack(ys, dim=1)  # [steps, dirs, batch, hidden]
        if self.outputs == 1:
            return y
        return (y, *(torch.stack([f[k] for f in finals]) for k in range(self.states)))
