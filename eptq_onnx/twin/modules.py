"""Torch modules for ONNX ops, built by :mod:`eptq_onnx.twin.convert`.

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
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from eptq_onnx.twin.weighted import torch_pads


# ---------------------------------------------------------------- weighted ops


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


# ---------------------------------------------------------------- recurrent ops (left float)


