"""Label-Free Hessian (LFH): the paper's per-tensor sensitivity, without labels.

Section 3.1 / Appendix C.2 / Algorithm 2 of EPTQ: for every probed activation tensor z_i,

    Tr(H_zi) ~ c * mean_x E_v || d(v^T f(x)) / d z_i ||^2,   v ~ N(0, I) (or Rademacher),  c = 2 / d_o,

where f(x) is every output of the model flattened and concatenated (d_o elements). Each
Hutchinson draw is one backward pass that serves all probed tensors at once. The traces are
then log-normalized to [0, 1] to weight the distillation loss.

The trace is the output's sensitivity to errors that are independent from element to element.
With ``position_axes`` the gradient is first summed over each tensor's position axes (the axes
along which one layer's weights act, ``layout.position_axes``), which estimates instead

    c * mean_x E_v sum_k ( sum_p (d(v^T f(x)) / d z_i)_{k,p} )^2  =  c * mean_x Tr(S^T J^T J S),

S summing the positions p of every channel k: the sensitivity to errors that are equal at all
positions of a channel, as rounded weights make them (our deviation from the paper, docs/design.md).

This module knows nothing of ONNX: it takes a ``Forward`` callable that runs the model on one
feed dict and returns its outputs and the probed intermediate tensors.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
from tqdm import tqdm

Forward = Callable[[Dict[str, torch.Tensor]], Tuple[List[torch.Tensor], Dict[str, torch.Tensor]]]
"""Runs one feed dict (one sample, batch 1) and returns (model outputs, {name: intermediate
tensor}); the intermediate tensors must be part of the autograd graph of the outputs."""

DISTRIBUTIONS = ("gaussian", "rademacher")
MIN_TIMED_DRAWS = 2  # Hutchinson draws per sample that a time limit never cuts


@dataclass
class LFHResult:
    """Label-Free Hessian traces of the probed tensors."""

    traces: Dict[str, float]  # raw Tr(H_z) estimate (c = 2 / d_o included), per tensor
    normalized: Dict[str, float]  # log-normalized to [0, 1]
    draws: int  # Hutchinson draws used on one sample (max over samples)
    samples: int
    seconds: float
    position_axes: Dict[str, Tuple[int, ...]] = field(default_factory=dict)  # summed before squaring (channel trace)
    unknown_axes: List[str] = field(default_factory=list)  # the caller could not tell their axes (elementwise)
    total_draws: int = 0  # over all samples
    time_limited: bool = False  # the time limit cut draws or samples

    def to_dict(self) -> dict:
        return asdict(self)


def log_normalize(traces: Mapping[str, float]) -> Dict[str, float]:
    """The paper's log normalization: w_i = (ln t_i - ln min t) / (ln max t - ln min t).

    Min and max are taken over the positive traces only; a zero (or negative) trace, i.e. a
    tensor that does not reach the output, gets 0.0 without pulling the others towards 1. When
    all positive traces are equal they all get 1.0. Non-finite traces raise ``ValueError``.
    """
    bad = [name for name, t in traces.items() if not math.isfinite(t)]
    if bad:
        raise ValueError(f"non-finite Hessian trace for {', '.join(bad)}: the model's outputs or gradients are not finite")
    logs = {name: math.log(t) for name, t in traces.items() if t > 0}
    if not logs:
        return {name: 0.0 for name in traces}
    lo, hi = min(logs.values()), max(logs.values())
    span = hi - lo
    return {name: ((logs[name] - lo) / span if span > 0 else 1.0) if name in logs else 0.0 for name in traces}


def label_free_hessian(
    forward: Forward,
    samples: Iterable[Dict[str, torch.Tensor]],
    *,
    max_draws: int = 50,
    min_draws: int = 10,
    tol: float = 1e-3,
    distribution: str = "gaussian",
    seed: int = 0,
    progress: bool = True,
    position_axes: Optional[Mapping[str, Sequence[int]]] = None,
    time_limit_s: Optional[float] = None,
) -> LFHResult:
    """Estimate Tr(H_z) of every tensor ``forward`` probes, averaged over ``samples`` (Algorithm 2).

    Per sample: one forward pass, then up to ``max_draws`` Hutchinson draws of v over the
    concatenated outputs, each one backward pass for all tensors; the draws stop once, after at
    least ``min_draws``, no tensor's running mean moved by ``tol`` or more (relative) in the
    last draw (``tol=0`` always runs ``max_draws``). Floating-point feeds are made to require
    grad so that the graph exists even with frozen parameters; non-float outputs are ignored.
    A feed with batch B > 1 counts as one sample and yields the mean over its B rows (d_o then
    includes the batch), provided rows do not interact.

    Tensors that the outputs do not depend on (no gradient path), or with an identically zero
    gradient, get trace 0 and normalized weight 0. Deterministic for a given ``seed`` (and, with
    ``time_limit_s``, for the same number of draws).

    ``time_limit_s`` bounds the whole estimate: each sample gets an equal share of the time left,
    and its draws stop when the share is spent (after ``MIN_TIMED_DRAWS``); no new sample starts once
    the limit has passed (at least one sample always runs). ``time_limited`` then says so.
    """
    _check_args(max_draws, min_draws, tol, distribution)
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    totals: Optional[torch.Tensor] = None
    names: List[str] = []
    sums = dict(position_axes or {})
    count = most_draws = total_draws = 0
    limited = False
    samples = list(samples)
    deadline = None if time_limit_s is None else start + time_limit_s
    bar = tqdm(samples, desc="Label-Free Hessian", unit="sample", disable=not progress, leave=False)
    for feed in bar:
        share = None
        if deadline is not None:
            now = time.perf_counter()
            if count and now >= deadline:
                limited = True
                break
            share = now + (deadline - now) / (len(samples) - count)
        with torch.enable_grad():
            outputs, tensors = forward(_requiring_grad(feed))
            if totals is None:
                names = list(tensors)
                totals = torch.zeros(len(names), dtype=torch.float64)
            elif list(tensors) != names:
                raise ValueError(f"forward probed {sorted(tensors)} on sample {count}, but {sorted(names)} before")
            probed = [(tensors[n], _checked_axes(n, tensors[n], sums.get(n, ()))) for n in names]
            estimate, draws = _sample_trace(outputs, probed, generator, max_draws, min_draws, tol, distribution, share)
        del outputs, tensors
        totals += estimate
        count += 1
        most_draws = max(most_draws, draws)
        total_draws += draws
        limited = limited or (share is not None and draws < max_draws and time.perf_counter() >= share)
        bar.set_postfix(draws=draws)
    if totals is None:
        raise ValueError("label_free_hessian needs at least one sample")
    traces = {name: float(t) for name, t in zip(names, totals / count)}
    summed = {name: tuple(sums[name]) for name in names if sums.get(name)}
    return LFHResult(traces, log_normalize(traces), most_draws, count, time.perf_counter() - start, summed,
                     total_draws=total_draws, time_limited=limited)


def _check_args(max_draws: int, min_draws: int, tol: float, distribution: str) -> None:
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    if max_draws < 1 or min_draws < 1:
        raise ValueError(f"max_draws and min_draws must be >= 1, got {max_draws} and {min_draws}")
    if tol < 0:
        raise ValueError(f"tol must be >= 0, got {tol}")


def _checked_axes(name: str, tensor: torch.Tensor, axes: Sequence[int]) -> Tuple[int, ...]:
    if any(not 0 < a < tensor.dim() for a in axes):
        raise ValueError(f"position axes {tuple(axes)} of {name} do not fit its shape {tuple(tensor.shape)} (axis 0 is the batch)")
    return tuple(axes)


def _requiring_grad(feed: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The feed with its floating-point tensors as fresh leaves that require grad."""
    return {k: v.detach().requires_grad_(True) if v.is_floating_point() else v for k, v in feed.items()}


def _sample_trace(
    outputs: Sequence[torch.Tensor],
    tensors: Sequence[Tuple[torch.Tensor, Tuple[int, ...]]],
    generator: torch.Generator,
    max_draws: int,
    min_draws: int,
    tol: float,
    distribution: str,
    deadline: Optional[float] = None,
) -> Tuple[torch.Tensor, int]:
    """c * E_v ||S^T d(v^T f)/dz||^2 for every (tensor, axes S sums) on one sample, and the number of draws used
    (fewer once ``deadline``, a ``time.perf_counter()`` value, has passed, but at least MIN_TIMED_DRAWS)."""
    outs = [o for o in outputs if o.is_floating_point() and o.requires_grad]
    live = [i for i, (t, _) in enumerate(tensors) if t.requires_grad]
    mean = torch.zeros(len(tensors), dtype=torch.float64)
    if not outs or not live:
        return mean, 0
    size = sum(o.numel() for o in outs)
    draws = 0
    while draws < max_draws:
        v = _draw(size, generator, distribution)
        norms = _squared_norms(outs, [tensors[i] for i in live], v)
        previous = mean.clone()
        draws += 1
        mean[live] += (norms - mean[live]) / draws
        if draws >= min_draws and _converged(previous, mean, tol):
            break
        if deadline is not None and draws >= MIN_TIMED_DRAWS and time.perf_counter() >= deadline:
            break
    return mean * (2.0 / size), draws


def _draw(size: int, generator: torch.Generator, distribution: str) -> torch.Tensor:
    """One probe vector over the d_o concatenated outputs (on CPU, for device-independent seeding)."""
    if distribution == "gaussian":
        return torch.randn(size, generator=generator)
    return torch.randint(0, 2, (size,), generator=generator).mul_(2).sub_(1).float()


def _squared_norms(outs: Sequence[torch.Tensor], tensors: Sequence[Tuple[torch.Tensor, Tuple[int, ...]]], v: torch.Tensor) -> torch.Tensor:
    """||S^T d(v^T f)/dz||^2 for every (tensor, axes S sums), from one backward pass (float64, on CPU)."""
    pieces = v.split([o.numel() for o in outs])
    projection = sum((p.to(o.device, o.dtype).view_as(o) * o).sum() for p, o in zip(pieces, outs))
    grads = torch.autograd.grad(projection, [t for t, _ in tensors], retain_graph=True, allow_unused=True)
    device = outs[0].device
    return torch.stack([_square_sum(g, axes, device) for g, (_, axes) in zip(grads, tensors)]).cpu()


def _square_sum(g: Optional[torch.Tensor], axes: Tuple[int, ...], device: torch.device) -> torch.Tensor:
    if g is None:
        return torch.zeros((), dtype=torch.float64, device=device)
    g = g.detach().double()
    return (g.sum(dim=axes) if axes else g).pow(2).sum().to(device)


def _converged(previous: torch.Tensor, current: torch.Tensor, tol: float) -> bool:
    """Whether every running mean moved by less than ``tol`` relative (unchanged zeros count as still)."""
    change = (current - previous).abs()
    scale = previous.abs()
    still = torch.where(change > 0, math.inf, 0.0)
    moved = torch.where(scale > 0, change / scale.clamp_min(1e-300), still)
    return bool((moved < tol).all())
