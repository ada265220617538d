"""The trained parameters of EPTQ, stacked: every layer's rounding variables (and the soft-rounding regularizer over them), every int32 bias, refreshed once per step into the fake quantizers."""
from __future__ import annotations

from typing import Dict, Optional, Sequence
import torch
from torch import Tensor, nn
from eptq_onnx.twin.weighted import WeightedOp
from eptq_onnx.eptq.kernels import (
    rectified_sigmoid,
    rounding_regularizer,
    soft_rounding,
)
from eptq_onnx.twin.fake_quant import BiasFakeQuant, WeightFakeQuant, round_bias


class RoundingBank(nn.Module):
    """The AdaRound variables V of many weight quantizers as one flat parameter, for training.

    One h(V), one regularizer and one optimizer update then cover every weight, instead of one
    chain of small ops per layer (whose per-op overhead dominates a step on small models). With
    fixed steps (``start_rounding(..., fixed_scale=True)`` on every quantizer) the quantizers read
    their soft weights as views, computed for all of them with the regularizer in one fused node
    (what each quantizer's own addcmul computes, up to float rounding); with learned
    steps they read their part of h(V). ``write_back`` copies V into their own ``rounding``
    parameters when training stops.
    """

    def __init__(self, quantizers: Sequence[WeightFakeQuant]) -> None:
        super().__init__()
        self._quantizers = tuple(quantizers)
        rounding = [q.rounding for q in self._quantizers]
        assert all(v is not None for v in rounding), "start_rounding first"
        self.sizes = [v.numel() for v in rounding]  # type: ignore[union-attr]
        self.shapes = [tuple(v.shape) for v in rounding]  # type: ignore[union-attr]
        flat = [v.detach().reshape(-1) for v in rounding]  # type: ignore[union-attr]
        self.v = nn.Parameter(torch.cat(flat) if flat else torch.zeros(0))
        # each weight's share in the regularizer: 1 / (layers x its layer's size), so that every
        # layer weighs the same whatever its size (see ``regularizer``)
        device = self.v.device  # the quantizers' (the bank is made after the student moved to its device)
        shares = [torch.full((n,), 1.0 / (len(self.sizes) * n), device=device) for n in self.sizes if n]
        self.register_buffer("share", torch.cat(shares) if shares else torch.zeros(0, device=device), persistent=False)
        fixed = bool(self._quantizers) and all(q.floor_scaled is not None for q in self._quantizers)
        for name in ("floor_scaled", "room_scaled"):
            flat = torch.cat([getattr(q, name).reshape(-1) for q in self._quantizers]) if fixed else None
            self.register_buffer(name, flat, persistent=False)
        self.h: Optional[Tensor] = None

    def refresh(self, beta: Optional[float] = None) -> Tensor:
        """Start a step (call after every update): hand every quantizer its soft weight as a view
        (with fixed steps; else its part of h(V)), and return the regularizer for ``beta`` (see
        ``regularizer``; zero for None, the warm-up). With fixed steps both come from one fused
        node (``training_kernels.soft_rounding``)."""
        if self.floor_scaled is not None and self.room_scaled is not None:
            soft, reg = soft_rounding(self.v, self.floor_scaled, self.room_scaled, self.share, beta, self.shapes)
            self.h = None
            for q, weight in zip(self._quantizers, soft):
                q.h, q.soft = None, weight
            return reg
        self.h = rectified_sigmoid(self.v)
        for q, part, shape in zip(self._quantizers, torch.split(self.h, self.sizes), self.shapes):
            q.h, q.soft = part.view(shape), None
        return self.regularizer(beta) if beta is not None else torch.zeros((), device=self.v.device)

    def regularizer(self, beta: float) -> Tensor:
        """The mean over layers of each layer's mean of 1 - |2 h(V) - 1|^beta.

        Per layer, not over all weights at once: with one mean over every weight, a small layer's
        share of the regularizer is tiny while the loss is most sensitive to it, and its rounding
        stays undecided (h near 0.5, a value between two grid points that the hard rounding at
        export then destroys: the demo CNN's 288-weight first layer kept 12 such weights, and its
        W4A8 output SQNR fell from 34.6 dB soft to 21.1 dB hard).
        """
        return rounding_regularizer(self.h if self.h is not None else rectified_sigmoid(self.v), self.share, beta)

    def undecided(self) -> Dict[str, int]:
        """Per weight: how many rounding variables are neither 0 nor 1 (0.01 < h(V) < 0.99), where any are."""
        with torch.no_grad():
            h = rectified_sigmoid(self.v)
            counts = [int(((part > 0.01) & (part < 0.99)).sum()) for part in torch.split(h, self.sizes)]
        return {q.name: c for q, c in zip(self._quantizers, counts) if c}

    def write_back(self) -> None:
        """Copy V into the quantizers' ``rounding`` parameters (and drop the shared h)."""
        with torch.no_grad():
            for q, part in zip(self._quantizers, torch.split(self.v, self.sizes)):
                q.rounding.copy_(part.view_as(q.rounding))  # type: ignore[union-attr]
                q.h = q.soft = None
        self.h = None

class BiasBank(nn.Module):
    """The biases of many weighted ops as one flat parameter, for training: one int32 rounding
    and one optimizer update for all of them (per layer, each is a Python autograd node and an
    optimizer tensor, whose overhead dominated a step on small models).

    Each op computes with its part, as a view (``WeightedOp.trained_bias``): rounded to its int32
    grid where the op has a bias quantizer, as it is elsewhere; element for element what the op's
    own quantizer computes. ``write_back`` copies the trained values into the ops' ``bias``.
    """

    def __init__(self, ops: Sequence[WeightedOp]) -> None:
        super().__init__()
        self._ops = tuple(op for op in ops if op.bias is not None)
        self.sizes = [op.bias.numel() for op in self._ops]  # type: ignore[union-attr]
        flat = [op.bias.detach().reshape(-1) for op in self._ops]  # type: ignore[union-attr]
        self.b = nn.Parameter(torch.cat(flat) if flat else torch.zeros(0))
        quantizers = [op.bias_quant if isinstance(op.bias_quant, BiasFakeQuant) and op.bias_quant.enabled else None
                      for op in self._ops]
        self._quantizers = tuple(quantizers)
        self.rounded = all(q is not None for q in quantizers)  # else a mask picks the rounded ones
        device = self.b.device
        self.register_buffer("mask", torch.cat([torch.full((n,), q is not None, device=device) for n, q in zip(self.sizes, quantizers)])
                             if flat else torch.zeros(0, dtype=torch.bool, device=device), persistent=False)
        self.register_buffer("fixed_step", None, persistent=False)  # see fix_steps

    def fix_steps(self) -> None:
        """Compute the grid steps once for a training run in which no step is learned (call when
        the learned parameters are chosen; until then every refresh computes them)."""
        learned = any(q is not None and q.learned_step() for q in self._quantizers)
        with torch.no_grad():
            self.fixed_step = None if learned else self._step()

    def _step(self) -> Tensor:
        """Every element's grid step, flat (1 where the bias is not rounded)."""
        parts = [torch.ones(n, device=self.b.device) if q is None else q.step().expand(op.bias.shape).reshape(-1)  # type: ignore[union-attr]
                 for n, q, op in zip(self.sizes, self._quantizers, self._ops)]
        return torch.cat(parts) if parts else torch.zeros(0, device=self.b.device)

    def refresh(self) -> None:
        """This step's biases, handed to every op as views; call after every update."""
        fixed = self.fixed_step is not None
        values = round_bias(self.b, self.fixed_step if fixed else self._step(), fixed=fixed)
        if not self.rounded:
            values = torch.where(self.mask, values, self.b)
        for op, part in zip(self._ops, torch.split(values, self.sizes)):
            op.trained_bias = part.view(op.bias.shape)  # type: ignore[union-attr]

    def write_back(self) -> None:
        """Copy the trained biases into the ops' ``bias`` parameters (and drop the views)."""
        with torch.no_grad():
            for op, part in zip(self._ops, torch.split(self.b, self.sizes)):
                op.bias.copy_(part.view_as(op.bias))  # type: ignore[union-attr]
                op.trained_bias = None
