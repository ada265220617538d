"""Calibration data held in memory, for the Python API: any iterable of feeds, or an object with
onnxruntime's ``CalibrationDataReader`` interface (``get_next()`` returning a feed, then None).

A feed is a dict {input name: array} (anything ``np.asarray`` takes: numpy arrays, lists, CPU torch
tensors) or, for a single-input model, one array. Each feed is read as one calibration file would
be (``data.py``): a sample (arrays without the batch dim) or a batch (with it) when the model has a
batch dim, else one whole feed; shapes, dtypes, values and named dims are checked with the files'
rules and one-line errors (``calibration feed 3: input 'x' has shape ...``), so the same arrays
give the same batches, and the same quantized model, as a folder of .npy/.npz files holding them.

The feeds are taken from the iterable (or reader) once, as the set is made, until enough samples
are found (``num_samples``, else at most ``DEFAULT_MAX_SAMPLES``), and kept in memory: a generator
or reader is consumed once and need not be rewindable, but every sample used stays referenced for
the whole run (the arrays as given, not copied: a reader must not reuse one buffer for its feeds).
Data too large for memory belongs in a calibration folder, which is read file by file.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Union

import numpy as np

from eptq_onnx.calib.data import CalibrationSet
from eptq_onnx.calib.entries import FileEntry, array_entry
from eptq_onnx.calib.files import NPY_KEY, ArrayHeader
from eptq_onnx.calib.specs import InputSpec
from eptq_onnx.config import CalibOptions
from eptq_onnx.errors import CalibrationError

# what ``quantize`` takes as calibration data: a folder, a CalibrationSet, one feed, an iterable of feeds,
# or a reader (any object with get_next(); onnxruntime's CalibrationDataReader is also iterable)
CalibSource = Union[str, "os.PathLike[str]", CalibrationSet, Mapping[str, Any], np.ndarray, Iterable[Any]]


def open_calibration(source: CalibSource, specs: list[InputSpec], options: CalibOptions) -> CalibrationSet:
    """The CalibrationSet of a folder path, or of data in memory (a ``MemoryCalibrationSet``)."""
    if isinstance(source, CalibrationSet):
        return source
    if isinstance(source, (str, os.PathLike)):
        return CalibrationSet(source, specs, options)
    return MemoryCalibrationSet(source, specs, options)


def iter_feeds(source: Any) -> Iterator[Any]:
    """The feeds of in-memory calibration data: one feed (a dict or an array) stands alone; a reader is
    asked ``get_next()`` until it returns None; anything else is iterated."""
    if isinstance(source, (Mapping, np.ndarray)):
        return iter([source])
    if callable(getattr(source, "get_next", None)):
        return iter(source.get_next, None)
    try:
        return iter(source)
    except TypeError:
        raise CalibrationError(
            f"calibration data of type {type(source).__name__}: give a folder path, a CalibrationSet, an iterable of "
            "feeds (dicts {input name: array}, or arrays for a single-input model) or an object with get_next()"
        ) from None


class MemoryCalibrationSet(CalibrationSet):
    """Calibration samples given in memory, used by every stage exactly as a folder's CalibrationSet.

    Feed ``i`` plays the part of one file, named ``calibration feed i`` in messages; see the module
    docstring for what a feed may be and for memory use.
    """

    _item = "feed"

    def __init__(self, source: Any, specs: list[InputSpec], options: CalibOptions) -> None:
        self._feeds = iter_feeds(source)
        self._held: dict[Path, dict[str, np.ndarray]] = {}
        super().__init__(Path("<memory>"), specs, options)

    @property
    def _where(self) -> str:
        return f"the calibration data given in memory ({len(self._held)} feeds)"

    def _sources(self) -> Iterator[Path]:
        """Take feeds one at a time (the scan stops once it has enough), each held under its name."""
        for i, feed in enumerate(self._feeds):
            name = Path(f"calibration feed {i}")
            self._held[name] = self._arrays(name, feed)
            yield name
        if not self._held:
            raise CalibrationError("the calibration data given in memory holds no feeds: give at least one")

    def _arrays(self, name: Path, feed: Any) -> dict[str, np.ndarray]:
        """One feed as {key: array}; a lone array is keyed as an .npy file's."""
        if isinstance(feed, Mapping):
            bad = [k for k in feed if not isinstance(k, str)]
            if bad:
                raise CalibrationError(f"{name}: key {bad[0]!r} is no input name: key the arrays by model input name")
            return {key: self._array(name, key, value) for key, value in feed.items()}
        if len(self._specs) > 1:
            names = ", ".join(repr(spec.name) for spec in self._specs)
            raise CalibrationError(f"{name} is one {type(feed).__name__}, but the model has {len(self._specs)} inputs "
                                   f"({names}): give a dict {{input name: array}}")
        return {NPY_KEY: self._array(name, self._specs[0].name, feed)}

    @staticmethod
    def _array(name: Path, key: str, value: Any) -> np.ndarray:
        try:
            array = np.asarray(value)
        except Exception as exc:  # noqa: BLE001 - whatever the value's type raises
            raise CalibrationError(f"{name}: input {key!r} is no array ({type(value).__name__}: {exc})") from None
        if array.dtype.hasobject:
            raise CalibrationError(f"{name}: input {key!r} is no numeric array ({type(value).__name__})")
        return array

    def _inspect(self, path: Path) -> FileEntry:
        arrays = self._held[path]
        headers = {key: ArrayHeader(tuple(a.shape), a.dtype) for key, a in arrays.items()}
        return array_entry(path, self._specs, batch_dim=self._batch is not None, samples=self._samples, headers=headers)

    def _load(self, path: Path, keys: list[str]) -> dict[str, np.ndarray]:
        return {key: self._held[path][key] for key in keys}
