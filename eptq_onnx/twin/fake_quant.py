"""The student's fake quantizers: activations (and ops that stay on their input's grid), weights (hard, or soft rounding while trained), int32 biases. In hard mode they compute what onnxruntime computes on the written QDQ model."""
from __future__ import annotations

from typing import List, Optional
import numpy as np
import torch
from torch import Tensor, nn
from eptq_onnx.export.writer import INT32_MAX
from eptq_onnx.init.quantizers import ActParams
from eptq_onnx.eptq.kernels import (
    GAMMA,
    ZETA,
    clipped_round,
    rectified_sigmoid,
    round_to_grid,
    rounding_regularizer,
)
from eptq_onnx.init.weights import WeightQuant


def round_ste(x: Tensor) -> Tensor:
    """Round half to even forward, identity gradient backward (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()

class ActFakeQuant(nn.Module):
    """QuantizeLinear -> DequantizeLinear on one activation group (per tensor)."""

    def __init__(self, params: ActParams) -> None:
        super().__init__()
        self.register_buffer("base_scale", torch.tensor(params.scale, dtype=torch.float32))
        # learned as a multiplier of the initial step (relative updates, never negative in practice)
        self.factor = nn.Parameter(torch.ones(()), requires_grad=False)
        self.register_buffer("zero_point", torch.tensor(float(params.zero_point)))
        self.qmin, self.qmax = params.qrange
        self.fixed_step = (float(np.float32(params.scale)), float(params.zero_point))  # for training with a fixed step
        self.enabled = True
        self.user_fixed = params.fixed  # --overrides set it: --learn-act-scales leaves it alone

    @property
    def scale(self) -> Tensor:
        return self.base_scale * self.factor

    def codes(self, x: Tensor) -> Tensor:
        """The integer codes onnxruntime's QuantizeLinear produces (as floats)."""
        return torch.clamp(round_ste(x / self.scale) + self.zero_point, self.qmin, self.qmax)

    def trains_fixed(self, x: Tensor) -> bool:
        """Whether ``x`` takes the training path with a fixed step (``clipped_round``)."""
        return self.enabled and torch.is_grad_enabled() and not self.factor.requires_grad and x.is_floating_point()

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return x
        if self.trains_fixed(x):
            return clipped_round(x, *self.fixed_step, self.qmin, self.qmax)
        if not torch.is_grad_enabled() and x.is_floating_point():  # inference: one fused pass, the same values
            return clipped_round(x, float(self.scale), float(self.zero_point), self.qmin, self.qmax)
        scale = self.scale
        return (self.codes(x) - self.zero_point) * scale

class OnGridFakeQuant(nn.Module):
    """The group's fake quantizer after a data-movement op whose input is on the same grid already
    (a Reshape, Transpose, Slice, MaxPool... of a quantized tensor).

    While training with a fixed step it is the identity: the values are on the grid, so fake
    quantization would return them unchanged and only cost a pass each way; its straight-through
    gradient is the one of the quantizer before (which clipped them). Otherwise it is the quantizer.
    """

    def __init__(self, quantizer: ActFakeQuant) -> None:
        super().__init__()
        self._quantizer = (quantizer,)  # a plain reference: the module belongs to the graph already

    def forward(self, x: Tensor) -> Tensor:
        quantizer = self._quantizer[0]
        return x if quantizer.trains_fixed(x) else quantizer(x)


def _channel_shape(rank: int, axis: int) -> List[int]:
    shape = [1] * rank
    if rank:
        shape[axis] = -1
    return shape

def inverse_rectified_sigmoid(h: Tensor) -> Tensor:
    """V with h(V) = h, for h in (0, 1) (clamped away from the ends)."""
    h = torch.clamp(h, 0.01, 0.99)
    return -torch.log((ZETA - GAMMA) / (h - GAMMA) - 1.0)


TIE_MARGIN = 1e-3  # how far from 0.5 an initial h(V) sits where its hard rounding had to be set
# h(V) of a rounding started from the initialized codes: this close to the code chosen (0.05 or 0.95),
# so that the network-wise phase refines the init's decisions (docs/design.md, "Rounding start")
CODES_START_H = 0.05


def code_base(codes: Tensor, scaled: Tensor) -> Tensor:
    """The lower code of the two a rounding started from ``codes`` chooses between: the code below
    it where it lies above ``scaled`` (w / s), else the code itself, so that the other choice is one
    step towards the float weight. Within floor(w / s) and floor(w / s) + 1 (round to nearest) this
    is floor(w / s); a code that GPTQ moved further keeps its value, and may move one step back."""
    return codes - (codes > scaled).to(codes.dtype)


def rounding_from_codes(codes: Tensor, base: Tensor) -> Tensor:
    """V with h(V) CODES_START_H from the initialized ``codes``: 1 - CODES_START_H where they lie
    above ``base`` (``code_base``, clipped to the integer range), CODES_START_H where not."""
    h = torch.where(codes > base, 1.0 - CODES_START_H, CODES_START_H).to(codes.dtype)
    return inverse_rectified_sigmoid(h)


def initial_rounding(scaled: Tensor, floor: Tensor) -> Tensor:
    """V with h(V) the fractional part of ``scaled`` (w / s), whose hard rounding (h >= 0.5 rounds up)
    is round half to even, as QuantizeLinear rounds: at a tie, or where h(V) lands on the other
    side of 0.5 (within float rounding of it), h(V) is 0.5 -+ TIE_MARGIN instead."""
    v = inverse_rectified_sigmoid(scaled - floor)
    up = torch.round(scaled) > floor
    wrong = (rectified_sigmoid(v) >= 0.5) != up
    if bool(wrong.any()):
        v = torch.where(wrong, inverse_rectified_sigmoid(torch.where(up, 0.5 + TIE_MARGIN, 0.5 - TIE_MARGIN)), v)
    return v

class WeightFakeQuant(nn.Module):
    """Per-channel symmetric weight quantizer.

    ``fixed``: the stored integer codes x step (what the QDQ file holds). ``soft`` (AdaRound):
    floor(w / s) + h(V), clipped to the integer range, x s, with V learnable and optionally s.
    ``hard``: like soft with h(V) rounded to 0 or 1 (what is exported after learning).
    """

    def __init__(self, wq: WeightQuant) -> None:
        super().__init__()
        self.name, self.axis, self.bits = wq.name, wq.axis, wq.bits
        self.qmin, self.qmax = -(1 << (wq.bits - 1)), (1 << (wq.bits - 1)) - 1
        self.register_buffer("codes", torch.from_numpy(wq.codes.astype(np.float32)))
        self.register_buffer("base_scale", torch.from_numpy(wq.scale.astype(np.float32)))
        # learned as a per-channel multiplier of the initial step (relative updates)
        self.factor = nn.Parameter(torch.ones_like(self.base_scale), requires_grad=False)
        self.rounding: Optional[nn.Parameter] = None  # V of AdaRound
        # with a fixed step (start_rounding): the lower code and where rounding up stays in range,
        # both also premultiplied by s, so a soft step is one addcmul; with a learned step, the lower
        # code's distance from floor(w / s)
        for name in ("floor_base", "room", "floor_scaled", "room_scaled", "base_offset"):
            self.register_buffer(name, None)
        self.h: Optional[Tensor] = None  # h(V) of the current step, set by RoundingBank.refresh while training
        self.soft: Optional[Tensor] = None  # the soft weight of the current step, set by RoundingBank.refresh
        self.mode = "fixed"
        self.enabled = True

    @property
    def scale(self) -> Tensor:
        return self.base_scale * self.factor

    def channel_scale(self) -> Tensor:
        return self.scale.reshape(_channel_shape(self.codes.dim(), self.axis))

    def start_rounding(self, w: Tensor, fixed_scale: bool = False, from_codes: bool = False) -> None:
        """Switch to learned rounding, with V set so that h(V) is the fractional part of w / s (the
        paper), or with ``from_codes`` next to the stored codes' decisions (``rounding_from_codes``).

        ``fixed_scale`` (the weight and its step stay constant while V is learned) precomputes
        clip(floor(w / s)) and where rounding up stays inside the integer range.
        """
        s = self.channel_scale().detach()
        scaled = (w.detach() / s).to(self.codes.dtype)
        floor = torch.floor(scaled)
        codes = self.codes.to(floor.device)
        base = code_base(codes, scaled) if from_codes else floor
        clipped = torch.clamp(base, self.qmin, self.qmax)
        start = rounding_from_codes(codes, clipped) if from_codes else initial_rounding(scaled, floor)
        self.rounding = nn.Parameter(start)
        self.mode = "soft"
        self.floor_base = self.room = self.floor_scaled = self.room_scaled = self.base_offset = None
        if fixed_scale:
            self.floor_base = clipped
            self.room = ((base >= self.qmin) & (base < self.qmax)).to(floor.dtype)
            self.floor_scaled, self.room_scaled = self.floor_base * s, self.room * s
        else:  # the step moves, so floor(w / s) is recomputed: the base is kept as its distance from it
            self.base_offset = base - floor  # 0 but where a code sits more than a step from floor(w / s)

    def _h(self) -> Tensor:
        assert self.rounding is not None
        return self.h if self.h is not None else rectified_sigmoid(self.rounding)

    def rounded(self, w: Tensor, hard: bool) -> Tensor:
        """Integer codes (as floats): the lower code (floor(w / s), or ``code_base``'s where a rounding
        started from codes) + h(V), clipped to the integer range."""
        h = self._h()
        up = (h >= 0.5).to(h.dtype) if hard else h
        if self.floor_base is not None and self.room is not None:
            # == clip(base + up, qmin, qmax): up <= 1, and room is 0 where base < qmin or >= qmax
            return self.floor_base + up * self.room
        s = self.channel_scale()
        return torch.clamp(torch.floor(w / s.detach()) + self.base_offset + up, self.qmin, self.qmax)

    def regularizer(self, beta: float) -> Tensor:
        """sum(1 - |2 h(V) - 1|^beta): pushes every h(V) to 0 or 1."""
        return rounding_regularizer(self._h(), 1.0, beta)

    def forward(self, w: Tensor) -> Tensor:
        if not self.enabled:
            return w
        if self.mode == "fixed":
            return self.codes * self.channel_scale()
        if self.mode == "soft" and self.soft is not None:
            return self.soft
        if self.mode == "soft" and self.floor_scaled is not None and self.room_scaled is not None:
            return torch.addcmul(self.floor_scaled, self._h(), self.room_scaled)
        return self.rounded(w, hard=self.mode == "hard") * self.channel_scale()

    def export(self, w: Tensor) -> WeightQuant:
        """The hard-rounded codes and learned steps, as the QDQ writer takes them."""
        with torch.no_grad():
            codes = self.codes if self.mode == "fixed" else self.rounded(w, hard=True)
            scale = self.scale
        return WeightQuant(
            name=self.name,
            axis=self.axis,
            bits=self.bits,
            scale=scale.detach().cpu().numpy().astype(np.float32),
            codes=codes.detach().cpu().numpy().astype(np.int8),
        )

class BiasFakeQuant(nn.Module):
    """int32 bias with scale = input activation step x weight step (onnxruntime's convention)."""

    def __init__(self, act: ActFakeQuant, weight: WeightFakeQuant) -> None:
        super().__init__()
        # plain references: these modules belong to the graph and the weighted op already
        self._refs = (act, weight)
        self.enabled = True

    @property
    def act(self) -> ActFakeQuant:
        """The quantizer of the layer's input activation (its step is one factor of the bias step)."""
        return self._refs[0]

    def learned_step(self) -> bool:
        """Whether the grid step changes while training (either of its factors is learned)."""
        act, weight = self._refs
        return bool(act.factor.requires_grad or weight.factor.requires_grad)

    def step(self) -> Tensor:
        """The grid step: activation step x weight step (per channel where the weight's is)."""
        act, weight = self._refs
        return act.scale * weight.scale

    def forward(self, b: Tensor) -> Tensor:
        if not self.enabled or not self.act.enabled:  # a float input has a float bias (the writer's rule)
            return b
        return round_bias(b, self.step(), fixed=not self.learned_step())

def round_bias(b: Tensor, step: Tensor, fixed: bool) -> Tensor:
    """int32 codes of ``b`` on the grid ``step``, x step; straight-through gradient to ``b`` (and,
    when not ``fixed``, to the step) while grad is enabled."""
    if fixed and torch.is_grad_enabled():
        return round_to_grid(b, step, INT32_MAX)
    return torch.clamp(round_ste(b / step), -INT32_MAX, INT32_MAX) * step
