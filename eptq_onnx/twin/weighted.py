"""The twin's weighted ops (Conv, ConvTranspose, Gemm, MatMul, Gather): the float op on a weight and bias that the fake quantizers replace during optimization."""
from __future__ import annotations

import math
from typing import Optional, Sequence
import torch
import torch.nn.functional as F
from torch import Tensor, nn


Ints = tuple[int, ...]

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
        self.node = ""  # the ONNX node it converts (its name, else its first output), set by the converter
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
