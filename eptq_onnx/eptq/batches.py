"""Minibatches of the calibration samples for the EPTQ loop, and the cache of the teacher's tensors they are compared with (in memory up to a budget, else recomputed)."""
from __future__ import annotations

from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple
import numpy as np
import torch
from torch import Tensor
from eptq_onnx.eptq.memory import available_bytes
from eptq_onnx.twin.build import Twin


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
    """Memory the teacher cache may take: a quarter of the available memory, at most 2 GiB."""
    available = available_bytes(device)
    return min(CACHE_MAX_BYTES, available // 4) if available else CACHE_MAX_BYTES // 4

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
