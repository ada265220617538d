"""Calibration data: a folder of .npy/.npz/image files, checked against the model inputs and
read as feed dicts, batch by batch.

Files are taken in natural name order (``2.npy`` before ``10.npy``); subfolders, hidden files and
other extensions are ignored. The folder is checked up front from the array headers alone; the data
itself is read, cast and checked (NaN/Inf, integer range) file by file while batches are produced.

Dim 0 is a batch dim when every input has one, declared dynamic or of the one size that the inputs
fixing it share (1 may stand beside dynamic dims). Then a file holds one sample (arrays without the
batch dim) or a batch (arrays with it, all of the same length), and samples are cut and joined into
batches. Otherwise (sequence models, recurrent state: inputs of different lengths along dim 0, a
scalar input, different fixed sizes), and as soon as one file holds arrays of different lengths
along dim 0, each file is one whole feed with the ranks of the model inputs, fed as it is: never
split, never joined with another file, one feed counting as one sample.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from eptq_onnx.config import DEFAULT_MAX_SAMPLES, CalibOptions
from eptq_onnx.errors import CalibrationError, ModelError, UsageError
from eptq_onnx.calib.specs import InputSpec, describe_inputs
from eptq_onnx.calib.files import IMAGE_EXTENSIONS, list_files, load_arrays
from eptq_onnx.calib.images import ImageTarget, image_target, load_image
from eptq_onnx.calib.entries import FileEntry, array_entry, image_entry


# --------------------------------------------------------------------------- reading


def _convert(array: np.ndarray, spec: InputSpec, path: Path) -> np.ndarray:
    """Cast a batch to the model dtype, rejecting NaN/Inf and values the dtype cannot hold."""
    if spec.dtype.kind == "f":
        if not np.isfinite(array).all():
            raise CalibrationError(f"{path}: input {spec.name!r} contains NaN or Inf values: fix or remove this file")
        with np.errstate(over="ignore"):
            converted = array.astype(spec.dtype)
        if not np.isfinite(converted).all():
            raise CalibrationError(f"{path}: input {spec.name!r} has values beyond the {spec.dtype} range")
        return converted
    if spec.dtype.kind in "iu" and array.size:
        info = np.iinfo(spec.dtype)
        low, high = int(array.min()), int(array.max())
        if low < info.min or high > info.max:
            raise CalibrationError(
                f"{path}: input {spec.name!r} has values in [{low}, {high}] that do not fit "
                f"{spec.dtype} [{info.min}, {info.max}]"
            )
    return array.astype(spec.dtype)


@dataclass(frozen=True)
class _Part:
    """Samples ``start:stop`` of one file."""

    entry: FileEntry
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


def _plan(entries: Sequence[FileEntry], count: int, size: int, exact: bool) -> Iterator[list[_Part]]:
    """Group the first ``count`` samples into batches of ``size``, never mixing sample shapes.

    A batch cut short by a shape change or the end is yielded as is, or dropped when ``exact``.
    """
    pending: list[_Part] = []
    filled = 0
    signature = None
    for entry in entries:
        if not count:
            break
        take = min(entry.count, count)
        count -= take
        if take and entry.signature != signature:
            if pending and not exact:
                yield pending
            pending, filled, signature = [], 0, entry.signature
        start = 0
        while start < take:
            part = _Part(entry, start, start + min(size - filled, take - start))
            pending.append(part)
            filled += part.size
            start = part.stop
            if filled == size:
                yield pending
                pending, filled = [], 0
    if pending and not exact:
        yield pending


class _FileReader:
    """Reads samples from calibration files, keeping the arrays of the last file it opened."""

    def __init__(self, specs: Sequence[InputSpec], image: ImageTarget | None,
                 load: Callable[[Path, list[str]], dict[str, np.ndarray]] = load_arrays) -> None:
        self._specs = specs
        self._image = image
        self._load = load  # (path, keys) -> arrays: the file's, or those held in memory (memory.py)
        self._path: Path | None = None
        self._arrays: dict[str, np.ndarray] = {}

    def read(self, part: _Part) -> dict[str, np.ndarray]:
        """The samples of ``part`` as {input name: array with batch dim}, cast and checked."""
        entry = part.entry
        if entry.is_image:
            assert self._image is not None  # set when the entry was made
            raw = {self._specs[0].name: load_image(entry.path, self._image)[None]}
        else:
            arrays = self._arrays_of(entry)
            raw = {
                spec.name: self._take(arrays[entry.keys[spec.name]], entry.batched[spec.name], part)
                for spec in self._specs
            }
        return {spec.name: _convert(raw[spec.name], spec, entry.path) for spec in self._specs}

    def _arrays_of(self, entry: FileEntry) -> dict[str, np.ndarray]:
        if entry.path != self._path:
            self._arrays = {}  # release the previous file before loading the next
            self._arrays = self._load(entry.path, list(entry.keys.values()))
            self._path = entry.path
        return self._arrays

    @staticmethod
    def _take(array: np.ndarray, batched: bool, part: _Part) -> np.ndarray:
        if not batched:
            return array[None]
        return array if part.entry.whole else array[part.start : part.stop]


# --------------------------------------------------------------------------- public set


def _check_options(options: CalibOptions) -> None:
    if options.num_samples is not None and options.num_samples < 1:
        raise UsageError(f"--num-calib {options.num_samples} must be at least 1")
    if options.batch_size < 1:
        raise UsageError(f"calibration batch size {options.batch_size} must be at least 1")


def _check_specs(specs: Sequence[InputSpec]) -> None:
    if not specs:
        raise ModelError("the model has no inputs to feed calibration data to")


@dataclass(frozen=True)
class _BatchDim:
    """Dim 0 of every input as the batch dim."""

    fixed: int | None  # its size when an input fixes it (every batch has exactly that size), else None
    uniform: bool  # every input declares it alike (all dynamic, or all the same size)


def _batch_dim(specs: Sequence[InputSpec]) -> _BatchDim | None:
    """The batch dim the inputs share, or None when they share none.

    They share one when every input has a dim 0, declared dynamic or of the one size that the
    inputs fixing it agree on; a fixed size beside dynamic dims must be 1 (a batch of one, as a
    model exported at batch 1 with some inputs made dynamic declares it). Scalar inputs, fixed
    sizes that differ, or a fixed size > 1 beside dynamic dims (e.g. the state [layers, ...] of a
    recurrent model beside its [seq, ...] input) mean no batch dim.
    """
    if any(not spec.shape for spec in specs):
        return None
    sizes = {spec.shape[0] for spec in specs}
    fixed = sizes - {None}
    if not fixed:
        return _BatchDim(None, uniform=True)
    size = fixed.pop()
    if fixed or (None in sizes and size != 1):
        return None
    return _BatchDim(size, uniform=None not in sizes)


MAX_HELD_OUT = 16  # calibration samples held out to check a stage's result on samples it did not see


def held_out_count(samples: int) -> int:
    """How many of ``samples`` calibration samples a check holds out: a quarter, at most ``MAX_HELD_OUT``."""
    return min(MAX_HELD_OUT, max(1, samples // 4))


class CalibrationSet:
    """The calibration samples of a folder, checked against the model inputs and read batch by batch.

    Construction checks the folder cheaply (array headers, image headers) and stops looking once
    enough samples are found; sample values are read and checked only by :meth:`batches`.
    When the model's batch dim is fixed, every batch has exactly that size and samples that cannot
    fill a whole batch (a short run of one shape, or the tail) are left out. When the inputs share
    no batch dim, or a file holds arrays of different lengths along dim 0, every file is one whole
    feed, yielded alone as it is stored (:attr:`whole_feeds`).
    """

    def __init__(self, folder: str | Path, specs: list[InputSpec], options: CalibOptions) -> None:
        self._folder = Path(folder)
        self._specs = list(specs)
        self._options = options
        _check_options(options)
        _check_specs(self._specs)
        self._batch = _batch_dim(self._specs)
        self._fixed_batch = self._batch.fixed if self._batch else None
        self._samples = self._batch is not None  # files are read as samples (else as whole feeds)
        self._image: ImageTarget | None = None
        wanted = options.num_samples if options.num_samples is not None else DEFAULT_MAX_SAMPLES
        self._entries, available = self._scan(self._sources(), wanted)
        if options.num_samples is not None and available < wanted:
            raise CalibrationError(
                f"asked for {wanted} samples, {self._where} has {available}: lower --num-calib or add samples"
            )
        if available == 0:
            raise CalibrationError(f"calibration {self._where} holds no samples (its arrays are empty)")
        self._count = min(available, wanted)
        self._used = sum(part.size for batch in self._plan(None, None) for part in batch)
        if self._used == 0:
            raise CalibrationError(
                f"the model has a fixed batch size of {self._fixed_batch} but {self._where} has no "
                f"{self._fixed_batch} consecutive samples of one shape ({self._count} in all): add samples"
            )

    _item = "file"  # what one source of samples is called in messages (memory.py: "feed")

    @property
    def _where(self) -> str:
        """Where the samples come from, in messages."""
        return f"folder {self._folder}"

    def _sources(self) -> Iterable[Path]:
        """The files to scan, in order (memory.py: the feeds given in memory, under names of their own)."""
        return list_files(self._folder)

    def _load(self, path: Path, keys: list[str]) -> dict[str, np.ndarray]:
        """The arrays ``keys`` of one source."""
        return load_arrays(path, keys)

    def __len__(self) -> int:
        """Number of samples that :meth:`batches` uses (without a limit); a whole feed is one sample."""
        return self._used

    @property
    def batch_size(self) -> int:
        """The batch size of the options (a fixed batch dim of the model still wins in ``batches``)."""
        return self._options.batch_size

    @property
    def whole_feeds(self) -> bool:
        """Every file is one feed, yielded alone as stored: ``batches`` ignores its batch size."""
        return not self._samples

    @property
    def stackable(self) -> bool:
        """Whether samples of different batches may be stacked along dim 0 into larger batches (as
        the optimizer's minibatches are): the files are samples, every input declares dim 0 alike, and the
        model does not fix it (a batch dim fixed at 1 may be baked into its Reshape constants)."""
        return self._samples and self._batch is not None and self._batch.uniform and self._fixed_batch is None

    def samples_in(self, feeds: Mapping[str, np.ndarray]) -> int:
        """How many samples one feed dict of :meth:`batches` holds (a whole feed: 1)."""
        return 1 if self.whole_feeds else len(next(iter(feeds.values())))

    def describe(self) -> str:
        """How the files are read, for the report: ``batched along dim 0`` or why they are whole feeds."""
        if self._samples:
            fixed = f" (fixed at {self._fixed_batch})" if self._fixed_batch else ""
            return f"samples batched along dim 0{fixed}"
        why = ("the inputs share no batch dim" if self._batch is None
               else f"a {self._item} holds arrays of different lengths along dim 0")
        return (f"each {self._item} is one whole feed, run alone as stored ({why}: {describe_inputs(self._specs)}); "
                f"{self._used} feeds, each counted as one sample")

    def num_batches(self, batch_size: int | None = None, limit: int | None = None) -> int:
        """How many batches :meth:`batches` yields with the same arguments (for progress bars)."""
        return sum(1 for _ in self._plan(batch_size, limit))

    def batches(self, batch_size: int | None = None, limit: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Feed dicts {input name: array with batch dim}, in file order, read file by file.

        ``batch_size`` defaults to the options' batch size and is ignored when the model's batch dim
        is fixed or the files are whole feeds (each yielded alone); ``limit`` uses only the first
        ``limit`` samples. Consecutive samples of different shapes go into different batches.
        """
        if batch_size is not None and batch_size < 1:
            raise UsageError(f"calibration batch size {batch_size} must be at least 1")
        if limit is not None and limit < 0:
            raise UsageError(f"calibration sample limit {limit} must not be negative")
        return self._read(self._plan(batch_size, limit))

    def split(self, held_out: int) -> tuple[CalibrationSet, CalibrationSet] | None:
        """The set without its last files and those files (at least ``held_out`` samples), read from the
        same sources; whole files go to one side. None when the set cannot spare them (one file, or
        a fixed batch size that one side could not fill)."""
        taken, cut = 0, len(self._entries)
        while cut > 1 and taken < held_out:
            cut -= 1
            taken += 1 if not self._samples else self._entries[cut].count
        if cut == len(self._entries):
            return None
        kept = sum(1 if not self._samples else e.count for e in self._entries[:cut])
        if kept >= self._count:
            return None
        sides = []
        for entries, count in ((self._entries[:cut], kept), (self._entries[cut:], self._count - kept)):
            side = copy.copy(self)
            side._entries, side._count = list(entries), count
            side._used = sum(part.size for batch in side._plan(None, None) for part in batch)
            sides.append(side)
        if not all(side._used for side in sides):
            return None
        return sides[0], sides[1]

    def _scan(self, files: Iterable[Path], wanted: int) -> tuple[list[FileEntry], int]:
        """Check files in order until ``wanted`` samples are found; the entries and their sample count.

        The first file that is a whole feed makes every file one: those seen before are checked again as feeds.
        """
        entries: list[FileEntry] = []
        available = 0
        for path in files:
            if available >= wanted:
                break
            entry = self._inspect(path)
            if entry.whole and self._samples:
                self._samples = False
                entries = [self._inspect(seen.path) for seen in entries]
                available = len(entries)
            entries.append(entry)
            available += entry.count
        return entries, available

    def _inspect(self, path: Path) -> FileEntry:
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            if self._image is None:
                self._image = image_target(path, self._specs, self._options.image)
            return image_entry(path, self._specs[0], self._image)
        return array_entry(path, self._specs, batch_dim=self._batch is not None, samples=self._samples)

    def _plan(self, batch_size: int | None, limit: int | None) -> Iterator[list[_Part]]:
        count = self._count if limit is None else min(limit, self._count)
        if not self._samples:
            return ([_Part(entry, 0, 1)] for entry in self._entries[:count])
        size = self._fixed_batch or batch_size or self._options.batch_size
        return _plan(self._entries, count, size, exact=self._fixed_batch is not None)

    def _read(self, plan: Iterator[list[_Part]]) -> Iterator[dict[str, np.ndarray]]:
        reader = _FileReader(self._specs, self._image, self._load)
        for parts in plan:
            pieces = [reader.read(part) for part in parts]
            yield {spec.name: _concat([piece[spec.name] for piece in pieces]) for spec in self._specs}


def _concat(arrays: list[np.ndarray]) -> np.ndarray:
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)
