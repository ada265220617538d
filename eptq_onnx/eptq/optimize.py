"""EPTQ: Hessian-weighted, network-wise optimization of rounding and biases (Eq. 6).

L = sum_i w_i * mean((z_i - z~_i)^2) / L_0 + lambda * mean_layers mean_V f_reg(V)

z_i: the float teacher's activation at quantization point i (and the model outputs), z~_i the
student's; w_i: the log-normalized Label-Free Hessian trace (or uniform), rescaled to average 1;
L_0 the initial reconstruction loss (a constant); f_reg: AdaRound's regularizer, averaged over each
layer's rounding variables and then over the layers (RoundingBank.regularizer says why per layer),
with beta annealed from 20 to 2 from the end of a warm-up (20% of the steps) to 100 steps before
the last (but not before 80% of the steps), then held while the rounding settles.
Learned: the rounding variables V (RAdam, 3e-2), biases (Adam, 1e-3), by option per-channel
weight step multipliers and activation steps (Adam, 1e-3). Biases and steps use Adam, not the
paper's RAdam: RAdam's first steps are momentum SGD, whose update grows with the gradient, and
with a tiny initial loss (16-bit activations) a bias jumped from 0.085 to 4e5 in two steps.
Teacher activations are computed on the fly, or once for all samples when they fit a memory
budget (a quarter of the available memory, at most 2 GiB; float32, or float16 where only that fits),
so a step costs one student forward and backward. The batch is lowered where a step at the one
asked would hold more than its memory budget (memory.fit_batch).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm import tqdm

from eptq_onnx.eptq.checkpoint import Checkpoint, LoopState, deferred_stops, fingerprint, restore
from eptq_onnx.config import OptimizeOptions
from eptq_onnx.eptq.kernels import KernelStatus
from eptq_onnx.eptq.kernels import load as load_kernels
from eptq_onnx.twin.build import Twin
from eptq_onnx.eptq.banks import BiasBank, RoundingBank
from eptq_onnx.twin.weighted import WeightedOp
from eptq_onnx.eptq.optimizer import EptqOptimizer, start_rounding
from eptq_onnx.eptq.batches import Batches, TeacherCache, cache_budget_bytes
from eptq_onnx.eptq.memory import fit_batch
from eptq_onnx.eptq.objective import Objective
from eptq_onnx.eptq.schedule import REPLAN_MIN_STEPS, REPLAN_TIME, budget_deadline, choose_iters, replan, beta_at, replan_step


@dataclass
class OptimizeResult:
    """What the optimization did."""

    iters: int
    seconds: float
    step_seconds: float
    why: str
    teacher: str = ""
    kernels: str = ""  # which training kernels ran (training_kernels.load)
    kernels_failed: bool = False  # the fused kernels could not be built: a fallback to report
    undecided: Dict[str, int] = field(default_factory=dict)  # per weight: rounding variables still between 0 and 1 at the end
    rounding_variables: int = 0
    batch_size: int = 0  # samples per step (the fitted batch: --opt-batch-size or fewer)
    curve: List[Tuple[int, float, float]] = field(default_factory=list)  # (step, reconstruction, regularizer)


BANK = "eptq_rounding_bank"  # the student's submodule holding every V while it trains
BIAS_BANK = "eptq_bias_bank"  # ... and every bias


def optimize(
    twin: Twin,
    feeds: Iterable[Dict[str, np.ndarray]],
    loss_weights: Dict[str, float],
    options: OptimizeOptions,
    progress: bool = True,
    log=print,
    started_at: Optional[float] = None,
    stack: bool = True,
) -> OptimizeResult:
    """Run EPTQ on the student; on return every weight quantizer is in hard (exportable) mode.

    ``feeds``: the calibration batches, read once (a generator keeps only the stacked copy in memory);
    ``stack=False``: they may not be stacked (whole feeds, see ``Batches``), each step takes one.
    ``started_at`` (``time.perf_counter()`` at the start of the run) makes the time budget cover
    the whole run rather than the optimization alone.

    With ``options.checkpoint_dir`` the loop's state is saved there every
    ``checkpoint_every_s`` seconds, when it is interrupted (Ctrl-C, SIGTERM) and at the end, and a
    run finding a checkpoint of the same model, data and settings resumes from it.
    """
    torch.manual_seed(options.seed)
    device = torch.device(options.device)
    status = load_kernels(log) if device.type == "cpu" else KernelStatus(False, "Python kernels (the fused ones are CPU-only)")
    kernels = status.detail
    twin.teacher.to(device).eval()
    twin.student.to(device).eval()
    start_rounding(twin, fixed_scale=not options.learn_weight_scales, from_codes=options.rounding_start == "init")
    bank = RoundingBank(list(twin.weight_quant.values()))
    twin.student.add_module(BANK, bank)  # so that checkpoints hold V
    # the biases of the quantized layers (a layer kept float by --exclude is left as it is)
    biases = BiasBank([m for m in twin.student.modules() if isinstance(m, WeightedOp) and m.weight_quant is not None])
    twin.student.add_module(BIAS_BANK, biases)  # ... and the biases
    optimizer = EptqOptimizer(twin, options, bank, biases)
    biases.fix_steps()  # after the parameter groups: a learned step is not fixed
    batches = Batches(feeds, options.device, options.seed, stack=stack)
    objective = Objective(twin, loss_weights, options, bank, biases=biases)
    checkpoint = None
    if options.checkpoint_dir is not None:
        digest = fingerprint(twin.student, loss_weights, options, batches.tensors())
        checkpoint = Checkpoint(Path(options.checkpoint_dir), digest)
    saved = checkpoint.load() if checkpoint is not None else None
    fit = None
    if saved is not None:
        loop, rng = restore(saved, twin.student, optimizer)
        batches.rng.bit_generator.state = rng
        options = replace(options, batch_size=loop.batch_size or options.batch_size)  # the batch it ran with
        log(f"EPTQ: resuming from {checkpoint.path} at step {loop.step} of {loop.iters}")  # type: ignore[union-attr]
    else:
        fit = fit_batch(objective, batches, options.batch_size, options.beta_start, options.device, options.max_memory_gb)
        if fit is not None and fit.batch_size < options.batch_size:
            options = replace(options, batch_size=fit.batch_size)
    cache = TeacherCache.build(twin, objective.names, batches, options.batch_size, cache_budget_bytes(options.device))
    objective.cache = cache
    if saved is None:
        iters, step_seconds, loss_scale, why = choose_iters(objective, batches, options, started_at)
        if fit is not None and fit.note:
            why += f"; {fit.note}"
        if batches.whole:
            why += (f"; the calibration feeds cannot be stacked (the model inputs declare no batch dim alike), so each "
                    f"step takes one whole feed of the {batches.count} (--opt-batch-size {options.batch_size} does not apply)")
        loop = LoopState(step=0, iters=iters, loss_scale=loss_scale, step_seconds=step_seconds, why=why,
                         batch_size=options.batch_size)
    optimizer.zero_grad(set_to_none=True)
    teacher = (
        f"teacher tensors of {batches.count} samples cached in memory ({cache.nbytes() / 2**20:.1f} MiB)"
        if cache is not None
        else "teacher run on the fly at every step (its tensors would not fit the cache budget, or are not one row per sample)"
    )
    log(f"EPTQ: {loop.why}; {teacher}; {kernels}")
    deadline = None
    if options.iters is None:  # a time budget: the loop re-plans from its own step times
        origin = started_at if started_at is not None else time.perf_counter()
        deadline = budget_deadline(origin, options)
    _run_loop(objective, optimizer, batches, loop, options, checkpoint, progress, deadline, log)
    undecided = bank.undecided()
    bank.write_back()
    biases.write_back()
    delattr(twin.student, BANK)
    delattr(twin.student, BIAS_BANK)
    for wfq in twin.weight_quant.values():
        wfq.mode, wfq.h = "hard", None
    for p in twin.student.parameters():
        p.requires_grad_(False)
    return OptimizeResult(iters=loop.iters, seconds=loop.seconds, step_seconds=loop.step_seconds, why=loop.why,
                          teacher=teacher, kernels=kernels, kernels_failed=status.failed, curve=list(loop.curve),
                          undecided=undecided, rounding_variables=bank.v.numel(), batch_size=loop.batch_size)


def _run_loop(objective: Objective, optimizer: EptqOptimizer, batches: Batches, loop: LoopState,
              options: OptimizeOptions, checkpoint: Optional[Checkpoint], progress: bool,
              deadline: Optional[float] = None, log=print) -> None:
    """Steps ``loop.step`` .. ``loop.iters`` - 1, saving checkpoints on the way and when stopped.

    With a ``deadline`` (a ``time.perf_counter()`` value: the time budget) the step count is
    re-planned from the loop's own step times: first at ``replan_step`` or when 5% of the time left
    has passed, then each time another 5% of the time then left has passed, from the mean step time
    since the last plan (a machine that gets busier, or idler, halfway moves the plan with it).
    """
    student = objective.twin.student
    first, replan_at = loop.step, replan_step(loop, options)

    def save() -> None:
        if checkpoint is not None:
            checkpoint.save(loop, student, optimizer, batches.rng.bit_generator.state)

    start = last_save = plan_start = time.perf_counter()
    plan_step = first
    done = loop.seconds
    record_every = max(1, loop.iters // 200)
    bar = tqdm(total=loop.iters, initial=loop.step, desc="EPTQ optimization", disable=not progress, unit="step")
    with deferred_stops() as stop, bar:  # a signal held back is delivered again when the block ends
        while loop.step < loop.iters and not stop:
            step = loop.step
            beta = beta_at(step, loop.iters, options)
            recon, reg = objective.losses(batches.sample(options.batch_size), beta)
            loss = recon / loop.loss_scale + options.reg_lambda * reg
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loop.step += 1
            bar.update(1)
            if step % record_every == 0 or loop.step == loop.iters:
                r, g = float(recon.detach()), float(reg.detach())
                loop.curve.append((step, r, g))
                bar.set_postfix(recon=f"{r:.4g}", reg=f"{g:.4g}", beta="-" if beta is None else f"{beta:.1f}")
            now = time.perf_counter()
            loop.seconds = done + now - start
            if deadline is not None and loop.step < loop.iters and loop.step - plan_step >= REPLAN_MIN_STEPS and (
                    now - plan_start >= REPLAN_TIME * (deadline - plan_start) if loop.replanned
                    else loop.step >= replan_at or now - start >= REPLAN_TIME * (deadline - start)):
                if replan(loop, options, deadline - now, (now - plan_start) / (loop.step - plan_step), log):
                    record_every = max(1, loop.iters // 200)
                    bar.total = loop.iters
                    bar.refresh()
                plan_start, plan_step = now, loop.step
            if checkpoint is not None and now - last_save >= options.checkpoint_every_s:
                save()
                last_save = now
        save()


def tensor_sqnr(twin: Twin, feeds: Sequence[Dict[str, np.ndarray]], names: Sequence[str], device: str) -> Dict[str, float]:
    """SQNR (dB) of every named student tensor against the teacher's, over the given batches."""
    signal = dict.fromkeys(names, 0.0)
    noise = dict.fromkeys(names, 0.0)
    with torch.no_grad():
        for batch in feeds:
            f = {k: torch.from_numpy(v).to(device) for k, v in batch.items()}
            _, t = twin.teacher.run(f, names)
            _, s = twin.student.run(f, names)
            for n in names:
                signal[n] += float(t[n].double().pow(2).sum())
                noise[n] += float((t[n].double() - s[n].double()).pow(2).sum())
    return {n: (math.inf if noise[n] == 0 else 10 * math.log10(max(signal[n], 1e-300) / noise[n])) for n in names}
