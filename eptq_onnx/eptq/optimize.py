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
budget (a quarter of the free memory, at most 2 GiB; float32, or float16 where only that fits),
so a step costs one student forward and backward.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from eptq_onnx.eptq.checkpoint import Checkpoint, LoopState, deferred_stops, fingerprint, restore
from eptq_onnx.config import OptimizeOptions
from eptq_onnx.eptq.kernels import KernelStatus, kernel_ext, sum_terms, weighted_mse
from eptq_onnx.eptq.kernels import load as load_kernels
from eptq_onnx.twin.build import Twin
from eptq_onnx.eptq.banks import BiasBank, RoundingBank
from eptq_onnx.twin.weighted import WeightedOp


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
    curve: List[Tuple[int, float, float]] = field(default_factory=list)  # (step, reconstruction, regularizer)


class Batches:
    """Random minibatches of the calibration samples, kept in memory as tensors."""

    def __init__(self, feeds: Iterable[Dict[str, np.ndarray]], device: str, seed: int, stack: bool = True) -> None:
        """``feeds`` is read once; pass a generator (e.g. ``CalibrationSet.batches()``) so that the
        stacked tensors are the only copy of the samples that stays in memory.

        ``stack=False`` (``CalibrationSet.stackable`` is false: the inputs share no batch dim, e.g. a
        sequence and a recurrent state) keeps every feed whole: a minibatch is one feed, as stored."""
        feeds = list(feeds)
        shapes = {tuple((k, v.shape[1:]) for k, v in sorted(f.items())) for f in feeds}
        self.device = device
        self.rng = np.random.default_rng(seed)
        self.stacked: Optional[Dict[str, Tensor]] = None
        self.whole = not stack
        if stack and len(shapes) == 1:
            self.stacked = {k: torch.from_numpy(np.concatenate([f[k] for f in feeds])).to(device) for k in feeds[0]}
            self.count = len(next(iter(self.stacked.values())))
        else:  # samples of different shapes, or whole feeds: draw whole stored batches
            self.parts = [{k: torch.from_numpy(v) for k, v in f.items()} for f in feeds]
            self.count = len(feeds) if self.whole else sum(len(next(iter(f.values()))) for f in feeds)

    def sample(self, size: int) -> Tuple[Optional[Tensor], Dict[str, Tensor]]:
        """(indices into the stacked samples or None, the minibatch)."""
        if self.stacked is not None:
            index = torch.from_numpy(self.rng.choice(self.count, size=min(size, self.count), replace=False)).to(self.device)
            return index, {k: v.index_select(0, index) for k, v in self.stacked.items()}
        part = self.parts[int(self.rng.integers(len(self.parts)))]
        return None, {k: v.to(self.device) for k, v in part.items()}

    def tensors(self) -> Dict[str, Tensor]:
        """Every sample, by input name (and stored batch), for fingerprinting the data."""
        if self.stacked is not None:
            return dict(self.stacked)
        return {f"{i}:{k}": v for i, part in enumerate(self.parts) for k, v in part.items()}

    def chunks(self, size: int) -> Iterator[Dict[str, Tensor]]:
        """The stacked samples in order, ``size`` at a time."""
        assert self.stacked is not None
        for start in range(0, self.count, size):
            yield {k: v[start : start + size] for k, v in self.stacked.items()}


def cache_budget_bytes(device: str) -> int:
    """Memory the teacher cache may take: a quarter of the free memory, at most 2 GiB."""
    free = 0
    if device.startswith("cuda") and torch.cuda.is_available():
        free = torch.cuda.mem_get_info(torch.device(device))[0]
    elif hasattr(os, "sysconf"):
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            free = 0
    return min(CACHE_MAX_BYTES, free // 4) if free else CACHE_MAX_BYTES // 4


CACHE_MAX_BYTES = 2 << 30
FP16_MAX = 60000.0  # below float16's 65504: with a larger value a float16 cache is not built


class TeacherCache:
    """The teacher's tensors at the loss points for every stacked calibration sample, as one
    matrix: a row per sample, the tensors flattened side by side (in ``names`` order).

    Computed once when it fits ``budget`` bytes: in float32 when that fits (the fused loss then
    reads a step's rows in place, the Python one gathers them with one op), else in float16 when every value fits float16's range (rounding error
    ~1e-3 relative); otherwise ``build`` returns None and the teacher runs at every step.
    """

    def __init__(self, matrix: Tensor, names: Sequence[str], widths: Sequence[int]) -> None:
        self.matrix = matrix
        self.names = list(names)
        self.widths = list(widths)  # elements per sample of each tensor
        self.views: Optional[Tuple[Tensor, ...]] = None  # split(matrix), made once

    @classmethod
    def build(cls, twin: Twin, names: Sequence[str], batches: Batches, chunk: int, budget: int) -> Optional["TeacherCache"]:
        if batches.stacked is None or not names:
            return None
        with torch.no_grad():
            _, probe = twin.teacher.run(next(batches.chunks(1)), names)
            if not _batch_major(twin, names, batches, probe):
                return None  # e.g. an LSTM's [seq, directions, batch, hidden] output: rows are not samples
            widths = [probe[n].numel() for n in names]
            elements = sum(widths) * batches.count
            if elements * 2 > budget:
                return None
            half = elements * 4 > budget
            rows: List[Tensor] = []
            for feeds in batches.chunks(chunk):
                _, values = twin.teacher.run(feeds, names)
                row = flatten_rows([values[n] for n in names])
                if half:
                    row = _compact(row)
                    if row.dtype != torch.float16:
                        return None  # a value outside float16's range
                rows.append(row)
        return cls(torch.cat(rows), names, widths)

    def get(self, index: Tensor) -> Tensor:
        """The rows of the given samples, in float32."""
        return self.matrix.index_select(0, index).float()

    def split(self, rows: Tensor) -> Tuple[Tensor, ...]:
        """``get``'s rows (or the whole matrix) as one [samples, elements] view per tensor, in ``names`` order."""
        return torch.split(rows, self.widths, dim=1)

    def targets(self, index: Tensor) -> Tuple[Sequence[Tensor], Optional[Tensor]]:
        """The targets of the given samples for ``weighted_mse``: float32 views of every row and
        the index (the loss reads the rows in place), or the gathered rows in float32 and None."""
        if self.matrix.dtype == torch.float32:
            if self.views is None:
                self.views = self.split(self.matrix)
            return self.views, index
        return self.split(self.get(index)), None

    def nbytes(self) -> int:
        return self.matrix.numel() * self.matrix.element_size()


def flatten_rows(tensors: Sequence[Tensor]) -> Tensor:
    """Batch-major tensors side by side as one [batch, elements] matrix."""
    rows = len(tensors[0])
    return torch.cat([t.reshape(rows, -1) for t in tensors], dim=1)


def _batch_major(twin: Twin, names: Sequence[str], batches: Batches, probe: Dict[str, Tensor]) -> bool:
    """Whether every tensor's first dim is the sample dim (1 row per sample, same other dims for 2)."""
    if any(v.dim() == 0 or v.shape[0] != 1 for v in probe.values()):
        return False
    if batches.count < 2:
        return True
    _, pair = twin.teacher.run(next(batches.chunks(2)), names)
    return all(pair[n].shape[0] == 2 and pair[n].shape[1:] == probe[n].shape[1:] for n in names)


def _compact(values: Tensor) -> Tensor:
    """float16 when every value is finite and within its range, else as it is."""
    if values.dtype == torch.float32 and bool(torch.isfinite(values).all()) and float(values.abs().max()) < FP16_MAX:
        return values.half()
    return values


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


def _start_rounding(twin: Twin, fixed_scale: bool) -> None:
    """Switch every weight quantizer of the student to learned (soft) rounding."""
    weights = {m.weight_name: m.weight for m in twin.student.modules() if isinstance(m, WeightedOp)}
    for name, wfq in twin.weight_quant.items():
        wfq.start_rounding(weights[name], fixed_scale=fixed_scale)


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


class Objective:
    """Eq. 6 on one batch.

    With the teacher cache a step reads (or gathers) the teacher's rows of every loss tensor;
    the rounding bank makes h(V), the soft weights and the regularizer one op chain over every
    weight, the bias bank the biases' rounding one op over every bias.
    """

    def __init__(self, twin: Twin, weights: Dict[str, float], options: OptimizeOptions, bank: RoundingBank,
                 cache: Optional[TeacherCache] = None, biases: Optional[BiasBank] = None) -> None:
        self.twin = twin
        self.names = [n for n, w in weights.items() if w > 0]
        self.weights = weights
        self.weight_list = [float(weights[n]) for n in self.names]
        self.options = options
        self.cache = cache
        self.bank = bank
        self.biases = biases

    def losses(self, batch: Tuple[Optional[Tensor], Dict[str, Tensor]], beta: Optional[float]) -> Tuple[Tensor, Tensor]:
        """Eq. 6's two terms on one batch: the weighted reconstruction error and the rounding
        regularizer, a mean over layers of per-layer means (zero during the warm-up, beta None).
        Starts a step: the soft weights and the regularizer are computed once, together."""
        reg = self.bank.refresh(beta)
        if self.biases is not None:
            self.biases.refresh()
        index, feeds = batch
        if self.cache is not None and index is not None:
            assert self.cache.names == self.names
            targets, rows = self.cache.targets(index)
        else:
            with torch.no_grad():
                _, teacher = self.twin.teacher.run(feeds, self.names)
            targets, rows = [teacher[n] for n in self.names], None
        losses, values = self.twin.student.run_loss(feeds, dict(zip(self.names, zip(targets, self.weight_list))), rows)
        rest = [i for i, n in enumerate(self.names) if n in values]
        assert len(losses) + len(rest) == len(self.names), "a loss tensor was not computed"
        if rest:
            losses.append(weighted_mse([values[self.names[i]] for i in rest], [targets[i] for i in rest],
                                       [self.weight_list[i] for i in rest], rows, torch.float64))
        return sum_terms(losses), reg

    def reconstruction(self, batch: Tuple[Optional[Tensor], Dict[str, Tensor]]) -> Tensor:
        """The weighted reconstruction error of one batch (``losses`` without the regularizer)."""
        return self.losses(batch, None)[0]


BANK = "eptq_rounding_bank"  # the student's submodule holding every V while it trains
BIAS_BANK = "eptq_bias_bank"  # ... and every bias
RESERVE = 0.1  # of the time budget, kept for what follows the optimization (validation, writing)
STEP_OVERHEAD = 1.1  # the optimizer update and bookkeeping the timing passes leave out


def _choose_iters(objective: Objective, batches: Batches, options: OptimizeOptions,
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
    _start_rounding(twin, fixed_scale=not options.learn_weight_scales)
    bank = RoundingBank(list(twin.weight_quant.values()))
    twin.student.add_module(BANK, bank)  # so that checkpoints hold V
    biases = BiasBank([m for m in twin.student.modules() if isinstance(m, WeightedOp)])
    twin.student.add_module(BIAS_BANK, biases)  # ... and the biases
    optimizer = EptqOptimizer(twin, options, bank, biases)
    biases.fix_steps()  # after the parameter groups: a learned step is not fixed
    batches = Batches(feeds, options.device, options.seed, stack=stack)
    objective = Objective(twin, loss_weights, options, bank, biases=biases)
    cache = TeacherCache.build(twin, objective.names, batches, options.batch_size, cache_budget_bytes(options.device))
    objective.cache = cache
    checkpoint = None
    if options.checkpoint_dir is not None:
        digest = fingerprint(twin.student, loss_weights, options, batches.tensors())
        checkpoint = Checkpoint(Path(options.checkpoint_dir), digest)
    saved = checkpoint.load() if checkpoint is not None else None
    if saved is not None:
        loop, rng = restore(saved, twin.student, optimizer)
        batches.rng.bit_generator.state = rng
        log(f"EPTQ: resuming from {checkpoint.path} at step {loop.step} of {loop.iters}")  # type: ignore[union-attr]
    else:
        iters, step_seconds, loss_scale, why = _choose_iters(objective, batches, options, started_at)
        if batches.whole:
            why += (f"; the calibration feeds cannot be stacked (the model inputs declare no batch dim alike), so each "
                    f"step takes one whole feed of the {batches.count} (--opt-batch-size {options.batch_size} does not apply)")
        loop = LoopState(step=0, iters=iters, loss_scale=loss_scale, step_seconds=step_seconds, why=why)
    optimizer.zero_grad(set_to_none=True)
    teacher = (
        f"teacher tensors of {batches.count} samples cached in memory ({cache.nbytes() / 2**20:.1f} MiB)"
        if cache is not None
        else "teacher run on the fly at every step (its tensors would not fit the cache budget, or are not one row per sample)"
    )
    log(f"EPTQ: {loop.why}; {teacher}; {kernels}")
    deadline = None
    if options.iters is None:  # a time budget: the loop re-plans once from its own step times
        origin = started_at if started_at is not None else time.perf_counter()
        deadline = origin + options.time_budget_min * 60 * (1 - RESERVE)
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
                          undecided=undecided, rounding_variables=bank.v.numel())


REPLAN_MIN_STEPS = 5  # steps timed in the loop before it may re-plan
REPLAN_TIME = 0.05  # ... and it re-plans once this fraction of the time left at its start has passed
REPLAN_CHANGE = 0.1  # re-plan only when the fitting step count differs by more than this fraction


def replan_step(loop: LoopState, options: OptimizeOptions) -> int:
    """The step at which a time-budgeted loop re-plans at the latest: half-way through the warm-up,
    after 10 steps at least, before the last step (earlier when REPLAN_TIME of its time has passed)."""
    return min(loop.iters - 1, max(10, int(options.warmup * loop.iters / 2)))


def replanned_iters(loop: LoopState, options: OptimizeOptions, seconds_left: float, step_seconds: float) -> int:
    """The step count that fits ``seconds_left`` at the loop's measured ``step_seconds`` (at least one
    more step, at most ``options.max_iters``)."""
    fit = loop.step + int(max(0.0, seconds_left) / max(step_seconds, 1e-9))
    return max(loop.step + 1, min(options.max_iters, fit))


def _replan(loop: LoopState, options: OptimizeOptions, seconds_left: float, step_seconds: float, log) -> bool:
    """Once per run: when the loop's own mean step time makes a step count more than 10% away from
    the plan fit the budget, take it (the pre-loop timing passes are easily off under CPU contention)."""
    loop.replanned = True
    iters = replanned_iters(loop, options, seconds_left, step_seconds)
    if abs(iters - loop.iters) <= REPLAN_CHANGE * loop.iters:
        return False
    note = (f"re-planned at step {loop.step}: steps take {step_seconds:.3f} s in the loop "
            f"({loop.step_seconds * STEP_OVERHEAD:.3f} s estimated before it), so {iters} steps fit instead of {loop.iters}")
    log(f"EPTQ: {note}")
    loop.why += f"; {note}"
    loop.iters = iters
    return True


def _run_loop(objective: Objective, optimizer: EptqOptimizer, batches: Batches, loop: LoopState,
              options: OptimizeOptions, checkpoint: Optional[Checkpoint], progress: bool,
              deadline: Optional[float] = None, log=print) -> None:
    """Steps ``loop.step`` .. ``loop.iters`` - 1, saving checkpoints on the way and when stopped.

    With a ``deadline`` (a ``time.perf_counter()`` value: the time budget) the step count is
    re-planned once, at ``replan_step`` or when 5% of the time left has passed, from the loop's own
    mean step time.
    """
    student = objective.twin.student
    first, replan_at = loop.step, replan_step(loop, options)

    def save() -> None:
        if checkpoint is not None:
            checkpoint.save(loop, student, optimizer, batches.rng.bit_generator.state)

    start = last_save = time.perf_counter()
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
            if (deadline is not None and not loop.replanned and loop.step - first >= REPLAN_MIN_STEPS
                    and (loop.step >= replan_at or now - start >= REPLAN_TIME * (deadline - start))
                    and loop.step < loop.iters):
                if _replan(loop, options, deadline - now, (now - start) / (loop.step - first), log):
                    record_every = max(1, loop.iters // 200)
                    bar.total = loop.iters
                    bar.refresh()
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
