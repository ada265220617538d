"""The memory one optimization step takes, and the batch size that keeps it within a budget.

A training step keeps, for its backward pass, the tensors autograd saved in the forward pass, and the
backward pass adds its gradients: on a detector at 512x512 that is hundreds of MiB a sample, so the
default batch of 32 alone would take more than a 16 GB machine has. The memory is measured, not
estimated: one whole step (forward and backward) at batch 1 and one at batch 2, each with the process's
peak resident memory reset before it (Linux's /proc/self/clear_refs; the allocator's peak on CUDA), and
the distinct storages autograd saves counted as a lower bound where the peak cannot be read. That gives
the fixed part (weights, soft rounding) and the part per sample; the batch is the largest, up to the one
asked, whose step fits the budget (``--max-memory``, else a quarter of the memory available when the
optimization starts, at most 4 GiB, on CPU, where it is the machine's memory that everything else
shares; half the free GPU memory on CUDA). The teacher cache (eptq/batches.py, at most 2 GiB) comes on
top. Measured on a 512x512 text detector (PP-OCRv5 det): 399 MiB saved and 426 MiB at the peak a
sample, so batch 9 under 4 GiB, and the whole run peaks at 6.5 GB RSS.
"""
from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch

if TYPE_CHECKING:
    from eptq_onnx.eptq.batches import Batches
    from eptq_onnx.eptq.objective import Objective

CPU_SHARE, CPU_MAX = 0.25, 4 << 30  # of the available memory, for one training step without --max-memory
CUDA_SHARE = 0.5  # ... of the free GPU memory


def available_bytes(device: str) -> int:
    """Memory a new allocation can get now: free GPU memory on CUDA, else Linux's MemAvailable (free
    plus reclaimable page cache), else free pages; 0 when unknown."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def _rss_bytes(field: str) -> Optional[int]:
    """A field of /proc/self/status in bytes (VmRSS: resident now, VmHWM: the peak since the last reset)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak(device: str) -> Optional[int]:
    """Start measuring a peak: on CUDA the allocator's, on Linux the process's peak resident memory
    (freed heap pages first given back, so that the step's growth shows). The memory held now, or None
    where the peak cannot be measured."""
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats(torch.device(device))
        return int(torch.cuda.memory_allocated(torch.device(device)))
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear:
            clear.write("5")  # resets VmHWM to the resident size now
    except OSError:
        return None
    return _rss_bytes("VmRSS")


def _peak_since(device: str, before: Optional[int]) -> int:
    """How far the memory rose above ``before`` (``_reset_peak``'s value) since; 0 when unmeasured."""
    if before is None:
        return 0
    if device.startswith("cuda") and torch.cuda.is_available():
        peak: Optional[int] = int(torch.cuda.max_memory_allocated(torch.device(device)))
    else:
        peak = _rss_bytes("VmHWM")
    return max(0, (peak or 0) - before)


@dataclass(frozen=True)
class StepBytes:
    """What one training step (forward and backward) at some batch size takes."""

    saved: int  # bytes of the distinct storages autograd saves for the backward pass
    peak: int  # how far the process's memory (the allocator's on CUDA) rose during the step; 0 when unmeasured


def step_bytes(objective: "Objective", batches: "Batches", size: int, beta: float, device: str) -> StepBytes:
    """One training step at batch ``size`` (its gradients dropped after): the bytes it saved for backward
    and the memory it took at its peak."""
    storages = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[(storage.data_ptr(), tensor.device)] = storage.nbytes()
        return tensor

    before = _reset_peak(device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        recon, reg = objective.losses(batches.sample(size), beta)
    loss = recon + reg
    if loss.requires_grad:
        loss.backward()
    del recon, reg, loss
    peak = _peak_since(device, before)
    for parameter in objective.twin.student.parameters():
        parameter.grad = None
    return StepBytes(sum(storages.values()), peak)


@dataclass(frozen=True)
class BatchFit:
    """The batch size a step's memory allows, and how it was decided."""

    batch_size: int
    per_sample: int  # bytes a step takes at its peak per sample
    fixed: int  # ... and whatever the batch size
    budget: int
    note: str  # for the log and the report: empty when the asked batch fits


def fit_batch(objective: "Objective", batches: "Batches", asked: int, beta: float, device: str,
              max_memory_gb: Optional[float]) -> Optional[BatchFit]:
    """The largest batch up to ``asked`` whose step fits the budget, or None when the batch cannot change
    (whole feeds, samples of several shapes, fewer than 3 samples)."""
    if batches.stacked is None or batches.count < 3 or asked <= 1:
        return None
    state = batches.rng.bit_generator.state  # the probes leave the minibatch draws as they were
    one = step_bytes(objective, batches, 1, beta, device)
    two = step_bytes(objective, batches, 2, beta, device)
    batches.rng.bit_generator.state = state
    # the measured peak where there is one (it is above the saved bytes: the backward pass's gradients
    # and the forward pass's temporaries); the saved bytes bound it from below
    per_sample = max(1, two.saved - one.saved, two.peak - one.peak)
    fixed = max(0, max(one.saved, one.peak) - per_sample)
    source = "--max-memory"
    if max_memory_gb is not None:
        budget = int(max_memory_gb * 2**30)
    else:
        available = available_bytes(device)
        if not available:
            return None
        if device.startswith("cuda"):
            budget, source = int(CUDA_SHARE * available), f"half the {available / 2**30:.1f} GiB free on the GPU"
        else:
            budget = min(CPU_MAX, int(CPU_SHARE * available))
            source = f"a quarter of the {available / 2**30:.1f} GiB available, at most {CPU_MAX / 2**30:.0f} GiB"
    size = max(1, min(asked, (budget - fixed) // per_sample))
    note = ""
    if size < min(asked, batches.count):
        note = (f"batch {size} instead of {asked} (--opt-batch-size): a step holds {per_sample / 2**20:.0f} MiB a sample "
                f"(+{fixed / 2**20:.0f} MiB) at its peak, and {budget / 2**30:.1f} GiB may go to it ({source})")
        if fixed + per_sample > budget:
            note += "; even batch 1 exceeds that"
    return BatchFit(size, per_sample, fixed, budget, note)
