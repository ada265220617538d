"""How many steps fit the time budget, re-planned from the loop's measured step time, and the regularizer's beta schedule over them."""
from __future__ import annotations

import time
from typing import Optional, Tuple
import numpy as np
from eptq_onnx.eptq.checkpoint import LoopState
from eptq_onnx.config import OptimizeOptions
from eptq_onnx.eptq.batches import Batches
from eptq_onnx.eptq.objective import Objective


def beta_at(step: int, total: int, options: OptimizeOptions) -> Optional[float]:
    """Annealed beta of the regularizer, or None during the warm-up (no regularizer): linear from
    beta_start after the warm-up to beta_end ``settle_steps`` before the last step (but not
    before ``anneal_end`` of the steps), then beta_end."""
    start = int(options.warmup * total)
    if step < start:
        return None
    end = max(int(options.anneal_end * total), total - options.settle_steps)
    fraction = min(1.0, (step - start) / max(1, end - start))
    return options.beta_start + (options.beta_end - options.beta_start) * fraction

RESERVE = 0.1  # of the time budget, kept for what follows the optimization (validation, writing)

def budget_deadline(started_at: float, options: OptimizeOptions) -> float:
    """The ``time.perf_counter()`` value by which the stages under the time budget must end (the
    run's start, ``started_at``, plus the budget less the RESERVE kept for validation and writing)."""
    return started_at + options.time_budget_min * 60 * (1 - RESERVE)

STEP_OVERHEAD = 1.1  # the optimizer update and bookkeeping the timing passes leave out

def choose_iters(objective: Objective, batches: Batches, options: OptimizeOptions,
                  started_at: Optional[float] = None) -> Tuple[int, float, float, str]:
    """Time two forward+backward steps, then pick the step count (explicit, or what fits the budget).

    The budget (``options.time_budget_min``) counts from ``started_at`` (a ``time.perf_counter()``
    value: the start of the whole run), less a 10% reserve for validation and writing.

    Also returns the initial reconstruction loss, by which the optimized loss is divided (a
    constant: RAdam's first steps are plain momentum SGD, whose step sizes depend on the scale).
    """
    times, losses = [], []
    for _ in range(2):
        start = time.perf_counter()
        recon, reg = objective.losses(batches.sample(options.batch_size), options.beta_start)
        (recon + reg).backward()
        times.append(time.perf_counter() - start)
        losses.append(float(recon.detach()))
    step = min(times)
    scale = max(float(np.mean(losses)), 1e-12)
    if options.iters is not None:
        return options.iters, step, scale, f"{options.iters} steps as asked (--iters)"
    budget = options.time_budget_min * 60
    spent = 0.0 if started_at is None else time.perf_counter() - started_at
    left = max(0.0, budget * (1 - RESERVE) - spent)
    fit = int(left / max(step * STEP_OVERHEAD, 1e-6))
    iters = max(1, min(options.max_iters, fit))
    why = (
        f"one step (batch {options.batch_size}) takes {step:.3f} s on {options.device}; of the "
        f"{options.time_budget_min:g}-minute budget (--time-budget) {spent / 60:.1f} min went to the stages before and "
        f"{RESERVE:.0%} is kept for validation: {fit} steps fit, capped at {options.max_iters} (paper: 20K-80K); chose {iters}"
    )
    return iters, step, scale, why

REPLAN_MIN_STEPS = 5  # steps timed in the loop before it may re-plan

REPLAN_TIME = 0.05  # ... and it re-plans each time this fraction of the time left at the last plan has passed

REPLAN_CHANGE = 0.1  # re-plan only when the fitting step count differs by more than this fraction of the steps left

def replan_step(loop: LoopState, options: OptimizeOptions) -> int:
    """The step at which a time-budgeted loop re-plans at the latest: half-way through the warm-up,
    after 10 steps at least, before the last step (earlier when REPLAN_TIME of its time has passed)."""
    return min(loop.iters - 1, max(10, int(options.warmup * loop.iters / 2)))

def replanned_iters(loop: LoopState, options: OptimizeOptions, seconds_left: float, step_seconds: float) -> int:
    """The step count that fits ``seconds_left`` at the loop's measured ``step_seconds`` (at least one
    more step, at most ``options.max_iters``)."""
    fit = loop.step + int(max(0.0, seconds_left) / max(step_seconds, 1e-9))
    return max(loop.step + 1, min(options.max_iters, fit))

def replan(loop: LoopState, options: OptimizeOptions, seconds_left: float, step_seconds: float, log) -> bool:
    """When the loop's recent mean step time makes a step count more than 10% (of the steps left) away from
    the plan fit the budget, take it (the pre-loop timing passes are easily off under CPU contention,
    and the contention changes during a run)."""
    loop.replanned = True
    iters = replanned_iters(loop, options, seconds_left, step_seconds)
    if abs(iters - loop.iters) <= max(1.0, REPLAN_CHANGE * (loop.iters - loop.step)):
        return False
    note = (f"re-planned at step {loop.step}: steps take {step_seconds:.3f} s in the loop "
            f"({loop.step_seconds * STEP_OVERHEAD:.3f} s estimated before it), so {iters} steps fit instead of {loop.iters}")
    log(f"EPTQ: {note}")
    loop.why += f"; {note}"
    loop.iters = iters
    return True
