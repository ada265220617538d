"""The differentiable twin of the QDQ model: a float teacher and a fake-quantized student in torch.

Both come from the same normalized float ONNX graph (``torch_convert.to_torch``). The student
gets, from the same quantization state the QDQ writer reads (weight codes and steps, activation
parameters, the plan), a weight quantizer on every weighted op, an int32 bias quantizer where
the writer stores the bias as int32, and a fake-quant module after every tensor of every
activation group. In hard mode it computes what onnxruntime computes on the written QDQ model:
round half to even, saturation, zero points, float32 arithmetic.

Every intermediate tensor of both is reachable by its ONNX name through taps.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import onnx
import torch
from torch import Tensor, fx, nn

from .ops import DATA_OPS
from .qdq_writer import INT32_MAX
from .qpoints import QuantPlan
from .quantizers import ActParams
from .torch_convert import input_names, onnx_names, output_names, to_torch
from .torch_ops import WeightedOp
from .training_kernels import (
    GAMMA,
    ZETA,
    clipped_round,
    quant_tap_loss,
    rectified_sigmoid,
    round_to_grid,
    rounding_regularizer,
    soft_rounding,
)
from .weights import WeightQuant


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


# data-movement ops whose outputs hold only values of their input (Pad adds its constant, which
# need not be on the grid)
ON_GRID_OPS = frozenset(op for op in DATA_OPS if op != "Pad")


def _channel_shape(rank: int, axis: int) -> List[int]:
    shape = [1] * rank
    if rank:
        shape[axis] = -1
    return shape


def inverse_rectified_sigmoid(h: Tensor) -> Tensor:
    """V with h(V) = h, for h in (0, 1) (clamped away from the ends)."""
    h = torch.clamp(h, 0.01, 0.99)
    return -torch.log((ZETA - GAMMA) / (h - GAMMA) - 1.0)


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
        # with a fixed step (start_rounding): clip(floor(w / s)) and where rounding up stays in
        # range, both also premultiplied by s, so a soft step is one addcmul
        for name in ("floor_base", "room", "floor_scaled", "room_scaled"):
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

    def start_rounding(self, w: Tensor, fixed_scale: bool = False) -> None:
        """Switch to learned rounding, with V set so that h(V) is the fractional part of w / s.

        ``fixed_scale`` (the weight and its step stay constant while V is learned) precomputes
        clip(floor(w / s)) and where rounding up stays inside the integer range.
        """
        s = self.channel_scale().detach()
        scaled = (w.detach() / s).to(self.codes.dtype)
        floor = torch.floor(scaled)
        self.rounding = nn.Parameter(inverse_rectified_sigmoid(scaled - floor))
        self.mode = "soft"
        self.floor_base = self.room = self.floor_scaled = self.room_scaled = None
        if fixed_scale:
            self.floor_base = torch.clamp(floor, self.qmin, self.qmax)
            self.room = ((floor >= self.qmin) & (floor < self.qmax)).to(floor.dtype)
            self.floor_scaled, self.room_scaled = self.floor_base * s, self.room * s

    def _h(self) -> Tensor:
        assert self.rounding is not None
        return self.h if self.h is not None else rectified_sigmoid(self.rounding)

    def rounded(self, w: Tensor, hard: bool) -> Tensor:
        """Integer codes (as floats) from floor(w / s) + h(V), clipped to the integer range."""
        h = self._h()
        up = (h >= 0.5).to(h.dtype) if hard else h
        if self.floor_base is not None and self.room is not None:
            # == clip(floor + up, qmin, qmax): up <= 1, and room is 0 where floor < qmin or >= qmax
            return self.floor_base + up * self.room
        s = self.channel_scale()
        return torch.clamp(torch.floor(w / s.detach()) + up, self.qmin, self.qmax)

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
        if not self.enabled:
            return b
        return round_bias(b, self.step(), fixed=not self.learned_step())


def round_bias(b: Tensor, step: Tensor, fixed: bool) -> Tensor:
    """int32 codes of ``b`` on the grid ``step``, x step; straight-through gradient to ``b`` (and,
    when not ``fixed``, to the step) while grad is enabled."""
    if fixed and torch.is_grad_enabled():
        return round_to_grid(b, step, INT32_MAX)
    return torch.clamp(round_ste(b / step), -INT32_MAX, INT32_MAX) * step


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


class TapStore:
    """Where taps put the tensors they see during one forward pass, and, while training, the loss
    targets of the taps that compute their loss term themselves (``QuantTap``)."""

    def __init__(self) -> None:
        self.values: Dict[str, Tensor] = {}
        self.active: Optional[set] = None  # names to record; None records nothing
        self.targets: Dict[str, tuple] = {}  # name -> (target, weight) while training
        self.rows: Optional[Tensor] = None  # the targets' rows of this batch (None: the targets are the batch's)
        self.losses: List[Tensor] = []  # float64 loss terms the fused taps computed in this pass

    def record(self, names: Optional[Sequence[str]]) -> None:
        self.values = {}
        self.active = set(names) if names is not None else None


class Tap(nn.Module):
    """Identity that records its input under an ONNX tensor name."""

    def __init__(self, name: str, store: TapStore) -> None:
        super().__init__()
        self.tensor_name = name
        self._store = (store,)

    def forward(self, x: Tensor) -> Tensor:
        store = self._store[0]
        if store.active is not None and self.tensor_name in store.active:
            store.values[self.tensor_name] = x
        return x


class QuantTap(Tap):
    """A tap and the fake quantizer that reads it, as one module: ``quantizer(tap(x))``.

    While training with a fixed step, a tap with a loss target in the store computes the fake
    quantization and its loss term in one fused node (``quant_tap_loss``) and adds the term to
    ``store.losses`` instead of recording ``x``; the two are one pass over ``x`` forward and one
    backward, where separately they are three ops each way.
    """

    def __init__(self, name: str, store: TapStore, quantizer: ActFakeQuant) -> None:
        super().__init__(name, store)
        self._quantizer = (quantizer,)  # a plain reference: the module belongs to the graph already

    def forward(self, x: Tensor) -> Tensor:
        store, quantizer = self._store[0], self._quantizer[0]
        target = store.targets.get(self.tensor_name)
        if target is None or not quantizer.trains_fixed(x):
            return quantizer(super().forward(x))
        y, loss = quant_tap_loss(x, *quantizer.fixed_step, quantizer.qmin, quantizer.qmax, target[0], target[1], store.rows)
        store.losses.append(loss)
        return y


def _insert_after(gm: fx.GraphModule, node: fx.Node, target: str, keep_outputs: bool) -> fx.Node:
    """Insert ``call_module(target)`` after ``node`` and let every user read it.

    With ``keep_outputs`` the graph's output keeps reading ``node`` itself.
    """
    anchor = node
    if node.op == "placeholder":  # insert after the last placeholder, inputs stay first
        anchor = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    with gm.graph.inserting_after(anchor):
        new = gm.graph.call_module(target, (node,))
    node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new and not (keep_outputs and user.op == "output"))
    return new


def _fuse_quantizer(gm: fx.GraphModule, tap: fx.Node) -> None:
    """Where the tap's one reader is a fake quantizer, make the two one ``QuantTap`` (same node name)."""
    users = list(tap.users)
    if len(users) != 1 or users[0].op != "call_module":
        return
    quantizer = gm.get_submodule(users[0].target)
    if not isinstance(quantizer, ActFakeQuant):
        return
    old = gm.get_submodule(tap.target)
    gm.add_submodule(tap.target, QuantTap(old.tensor_name, old._store[0], quantizer))
    users[0].replace_all_uses_with(tap)
    gm.graph.erase_node(users[0])


class TwinModule(nn.Module):
    """A converted graph with ONNX-named inputs, outputs and taps."""

    def __init__(self, gm: fx.GraphModule, taps: Sequence[str]) -> None:
        super().__init__()
        self.gm = gm
        self.inputs = input_names(gm)
        self.outputs = output_names(gm)
        self.store = TapStore()
        nodes = onnx_names(gm)
        for i, name in enumerate(taps):
            target = f"eptq_tap_{i}"
            gm.add_submodule(target, Tap(name, self.store))
            tap = _insert_after(gm, nodes[name], target, keep_outputs=False)
            _fuse_quantizer(gm, tap)
        gm.recompile()

    def forward(self, feeds: Dict[str, Tensor], record: Optional[Sequence[str]] = None) -> List[Tensor]:
        """Model outputs (in ONNX output order); tapped tensors named in ``record`` go to ``self.store.values``."""
        self.store.record(record)
        result = self.gm(*[feeds[name] for name in self.inputs])
        return list(result) if isinstance(result, (tuple, list)) else [result]

    def run(self, feeds: Dict[str, Tensor], record: Sequence[str]) -> tuple[List[Tensor], Dict[str, Tensor]]:
        """Outputs and the recorded tensors of one forward pass."""
        outputs = self.forward(feeds, record)
        values, self.store.values = self.store.values, {}
        return outputs, values

    def run_loss(self, feeds: Dict[str, Tensor], targets: Dict[str, tuple], rows: Optional[Tensor] = None) -> tuple[List[Tensor], Dict[str, Tensor]]:
        """One training forward pass with loss ``targets`` (name -> (target, weight), target rows
        ``rows`` of this batch, None: in order): the loss terms the fused taps computed (float64)
        and the tensors of every other target, recorded for the caller's loss."""
        store = self.store
        store.targets, store.rows, store.losses = targets, rows, []
        try:
            self.forward(feeds, list(targets))
        finally:
            store.targets, store.rows = {}, None
        losses, store.losses = store.losses, []
        values, store.values = store.values, {}
        return losses, values


@dataclass
class Twin:
    """Teacher (float) and student (fake-quantized) modules of one model, and the student's quantizers."""

    teacher: TwinModule
    student: TwinModule
    act_quant: Dict[int, ActFakeQuant] = field(default_factory=dict)
    weight_quant: Dict[str, WeightFakeQuant] = field(default_factory=dict)
    bias_quant: Dict[str, BiasFakeQuant] = field(default_factory=dict)

    def quantizers(self) -> List[nn.Module]:
        return [*self.act_quant.values(), *self.weight_quant.values(), *self.bias_quant.values()]


def build_twin(
    model: onnx.ModelProto,
    plan: QuantPlan,
    weights: Dict[str, WeightQuant],
    acts: Dict[int, ActParams],
    *,
    quantize_outputs: bool = False,
    quantize_bias: bool = True,
    taps: Optional[Sequence[str]] = None,
) -> Twin:
    """Teacher and student of a normalized float model and its quantization state.

    ``taps`` (default: every activation group root) are the tensors both modules can record;
    the student's tap sits before the fake quantizer (the layer's own output).
    """
    taps = list(taps) if taps is not None else [g.roots[0] for g in plan.groups]
    teacher_gm = to_torch(model).eval()
    student_gm = to_torch(model).eval()
    twin = Twin(teacher=TwinModule(teacher_gm, taps), student=None)  # type: ignore[arg-type]
    graph_outputs = set(output_names(student_gm))

    nodes = onnx_names(student_gm)
    producers = {out: node for node in model.graph.node for out in node.output}
    for g in plan.groups:
        fq = ActFakeQuant(acts[g.id])
        target = f"eptq_act_{g.id}"
        student_gm.add_submodule(target, fq)
        twin.act_quant[g.id] = fq
        for tensor in g.tensors:
            module = target
            producer = producers.get(tensor)
            if (tensor not in g.roots and producer is not None and producer.op_type in ON_GRID_OPS
                    and producer.input and producer.input[0] in g.tensors):
                module = f"eptq_on_grid_{sum(1 for _ in student_gm.named_children())}"
                student_gm.add_submodule(module, OnGridFakeQuant(fq))
            _insert_after(student_gm, nodes[tensor], module, keep_outputs=tensor in graph_outputs and not quantize_outputs)
    group_of = plan.group_of()
    points = {p.weight: p for p in plan.weights}
    for module in student_gm.modules():
        if not isinstance(module, WeightedOp) or module.weight_name not in weights:
            continue
        wfq = twin.weight_quant.setdefault(module.weight_name, WeightFakeQuant(weights[module.weight_name]))
        module.weight_quant = wfq
        point = points[module.weight_name]
        group = group_of.get(point.input) if point.input else None
        if quantize_bias and module.bias is not None and module.bias_name == point.bias and group is not None:
            bfq = BiasFakeQuant(twin.act_quant[group.id], wfq)
            module.bias_quant = bfq
            twin.bias_quant[module.bias_name] = bfq
    student_gm.recompile()
    twin.student = TwinModule(student_gm, taps)
    return twin


def to_tensors(feeds: Dict[str, np.ndarray], device: torch.device | str = "cpu") -> Dict[str, Tensor]:
    """numpy feeds as torch tensors on ``device``."""
    return {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in feeds.items()}
