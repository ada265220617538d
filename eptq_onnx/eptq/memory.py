"""The memory one optimization step holds, and the batch size that keeps it within a budget.

A training step keeps, for its backward pass, the tensors autograd saved in the forward pass: on a
detector at 512x512 that is hundreds of MiB a sample, so the default batch of 32 alone would take
more than a 16 GB machine has. The bytes are measured, not estimated: one forward pass at batch 1
and one at batch 2 under ``torch.autograd.graph.saved_tensors_hooks`` (distinct storages counted
once) give the fixed part (weights, soft rounding) and the part per sample; the batch is the
largest, up to the one asked, whose step fits the budget (``--max-memory``, else a quarter of the
memory available when the optimization starts, at most 4 GiB, on CPU, where it is the machine's
memory that everything else shares; half the free GPU memory on CUDA). Measured on a 512x512 text
detector: 399 MiB a sample, and the process peaks near 1.5x the saved bytes plus what it held before.
"""
from __future__ import annotations

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


def saved_bytes(objective: "Objective", batches: "Batches", size: int, beta: float) -> int:
    """Bytes of the distinct storages autograd saves for the backward pass of one step at batch ``size``."""
    storages = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[(storage.data_ptr(), tensor.device)] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        recon, reg = objective.losses(batches.sample(size), beta)
    del recon, reg
    return sum(storages.values())


@dataclass(frozen=True)
class BatchFit:
    """The batch size a step's memory allows, and how it was decided."""

    batch_size: int
    per_sample: int  # bytes saved for the backward pass per sample
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
    one = saved_bytes(objective, batches, 1, beta)
    two = saved_bytes(objective, batches, 2, beta)
    batches.rng.bit_generator.state = state
    per_sample = max(1, two - one)
    fixed = max(0, one - per_sample)
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
                f"(+{fixed / 2**20:.0f} MiB) for its backward pass, and {budget / 2**30:.1f} GiB may go to it ({source})")
        if fixed + per_sample > budget:
            note += "; even batch 1 exceeds that"
    return BatchFit(size, per_sample, fixed, budget, note)
