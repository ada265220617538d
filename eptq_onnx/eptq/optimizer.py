"""The optimizer of EPTQ's parameters (rounding variables, biases, scales): Adam/RAdam updates fused over stacked parameters, with their parameter groups."""
from __future__ import annotations

from typing import Dict, Iterator, List, Tuple
import torch
from torch import Tensor
from eptq_onnx.config import OptimizeOptions
from eptq_onnx.eptq.kernels import kernel_ext
from eptq_onnx.twin.build import Twin
from eptq_onnx.eptq.banks import BiasBank, RoundingBank
from eptq_onnx.twin.weighted import WeightedOp


class FusedUpdates:
    """torch.optim.RAdam or Adam (default betas and eps, no weight decay) through the fused kernels'
    update: bit-identical parameters and the same state_dict, without the per-step Python overhead
    of torch.optim (a few hundred microseconds a step on a small model)."""

    BETAS, EPS = (0.9, 0.999), 1e-8

    def __init__(self, groups: List[dict], rectified: bool) -> None:
        self.param_groups = [{**g, "params": list(g["params"])} for g in groups]
        self.update = kernel_ext().radam_update if rectified else kernel_ext().adam_update  # type: ignore[union-attr]
        self.state: Dict[int, Dict[str, Tensor]] = {}
        # torch.optim's group settings, for a state_dict it loads
        reference = (torch.optim.RAdam if rectified else torch.optim.Adam)([torch.zeros(1, requires_grad=True)], foreach=True)
        self.defaults = dict(reference.defaults)

    def _params(self) -> Iterator[Tuple[int, Tensor, float]]:
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                yield index, p, group["lr"]
                index += 1

    def zero_grad(self, set_to_none: bool = True) -> None:
        for _, p, _ in self._params():
            p.grad = None

    def step(self) -> None:
        for index, p, lr in self._params():
            if p.grad is None:
                continue
            state = self.state.get(index)
            if state is None:
                state = self.state[index] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                             "exp_avg_sq": torch.zeros_like(p)}
            state["step"] += 1
            self.update(p, p.grad, state["exp_avg"], state["exp_avg_sq"], float(state["step"]), lr, *self.BETAS, self.EPS)

    def state_dict(self) -> dict:
        groups, index = [], 0
        for group in self.param_groups:
            settings = {k: v for k, v in group.items() if k != "params"}
            groups.append({**self.defaults, **settings, "params": list(range(index, index + len(group["params"])))})
            index += len(group["params"])
        return {"state": {i: dict(s) for i, s in self.state.items()}, "param_groups": groups}

    def load_state_dict(self, saved: dict) -> None:
        self.state = {int(i): {k: v.clone() for k, v in s.items()} for i, s in saved["state"].items()}

class EptqOptimizer:
    """RAdam for the rounding variables (paper), Adam for biases and step multipliers (bounded
    updates from the first step); one object to step, zero and checkpoint. On the CPU with the
    fused kernels the updates run there (FusedUpdates, the same numbers), else in torch.optim."""

    def __init__(self, twin: Twin, options: OptimizeOptions, bank: RoundingBank, biases: BiasBank) -> None:
        rounding, others = _parameter_groups(twin, options, bank, biases)
        params = [p for g in rounding + others for p in g["params"]]
        if kernel_ext() is not None and all(p.device.type == "cpu" and p.dtype == torch.float32 for p in params):
            self.rounding = FusedUpdates(rounding, rectified=True)
            self.others = FusedUpdates(others, rectified=False) if others else None
            return
        self.rounding = torch.optim.RAdam(rounding, foreach=True)
        # foreach, not the fused kernel: its ulp-level differences in the bias updates moved the demo's
        # W4A8 EPTQ-LFH run (seed 0, 2000 steps) from 25.7 to 19.1 dB (docs/BENCHMARKS.md, seed spread)
        self.others = torch.optim.Adam(others, foreach=True) if others else None

    def _all(self) -> list:
        return [self.rounding] + ([self.others] if self.others is not None else [])

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self._all():
            optimizer.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for optimizer in self._all():
            optimizer.step()

    def state_dict(self) -> Dict[str, dict]:
        return {"rounding": self.rounding.state_dict(), "others": None if self.others is None else self.others.state_dict()}

    def load_state_dict(self, state: Dict[str, dict]) -> None:
        self.rounding.load_state_dict(state["rounding"])
        if self.others is not None:
            self.others.load_state_dict(state["others"])

def _parameter_groups(twin: Twin, options: OptimizeOptions, bank: RoundingBank,
                      biases: BiasBank) -> Tuple[List[dict], List[dict]]:
    """The learnable tensors of the student: (rounding group, groups of steps and biases); everything
    else frozen. The bias bank's flat tensor stands for every bias."""
    for module in (twin.teacher, twin.student):
        for p in module.parameters():
            p.requires_grad_(False)
    bank.v.requires_grad_(True)
    scales = []
    for wfq in twin.weight_quant.values():
        if options.learn_weight_scales:
            wfq.factor.requires_grad_(True)
            scales.append(wfq.factor)
    if options.learn_act_scales:
        for fq in twin.act_quant.values():
            if fq.user_fixed:
                continue
            fq.factor.requires_grad_(True)
            scales.append(fq.factor)
    learned_biases = [biases.b] if options.learn_biases and biases.b.numel() else []
    for b in learned_biases:
        b.requires_grad_(True)
    others = []
    if scales:
        others.append({"params": scales, "lr": options.lr_scale})
    if learned_biases:
        others.append({"params": learned_biases, "lr": options.lr_bias})
    return [{"params": [bank.v], "lr": options.lr_rounding}], others

def start_rounding(twin: Twin, fixed_scale: bool, from_codes: bool = False) -> None:
    """Switch every weight quantizer of the student to learned (soft) rounding, started from the
    float weights or (``from_codes``) next to the initialized codes."""
    weights = {m.weight_name: m.weight for m in twin.student.modules() if isinstance(m, WeightedOp)}
    for name, wfq in twin.weight_quant.items():
        wfq.start_rounding(weights[name], fixed_scale=fixed_scale, from_codes=from_codes)
