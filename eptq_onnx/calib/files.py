"""Calibration files on disk: listing a folder in natural order, array headers read without the data, arrays read and their element types checked."""
from __future__ import annotations

import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Sequence
import numpy as np
from eptq_onnx.errors import CalibrationError
from eptq_onnx.calib.specs import InputSpec


ARRAY_EXTENSIONS = (".npy", ".npz")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")

SUPPORTED_EXTENSIONS = ARRAY_EXTENSIONS + IMAGE_EXTENSIONS

NPY_KEY = ""  # key of the one array of a .npy file

_MAX_REASON_CHARS = 160

def reason(exc: BaseException) -> str:
    """The first line of a library exception, shortened: the 'why' of a one-line error."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= _MAX_REASON_CHARS else text[: _MAX_REASON_CHARS - 3] + "..."

def _natural_key(path: Path) -> tuple[list[int | str], str]:
    """Sort key putting ``2.npy`` before ``10.npy`` (split() alternates text and digit runs)."""
    parts = re.split(r"(\d+)", path.name.lower())
    return [int(part) if i % 2 else part for i, part in enumerate(parts)], path.name

def list_files(folder: Path) -> list[Path]:
    """The usable files of the calibration folder, in natural name order."""
    if not folder.exists():
        raise CalibrationError(f"calibration folder {folder} does not exist")
    if not folder.is_dir():
        raise CalibrationError(f"calibration folder {folder} is not a directory")
    try:
        files = [
            path
            for path in folder.iterdir()
            if not path.name.startswith(".") and path.suffix.lower() in SUPPORTED_EXTENSIONS and path.is_file()
        ]
    except OSError as exc:
        raise CalibrationError(f"calibration folder {folder} cannot be listed ({reason(exc)})") from exc
    if not files:
        extensions = "/".join(SUPPORTED_EXTENSIONS)
        raise CalibrationError(f"calibration folder {folder} has no {extensions} files")
    return sorted(files, key=_natural_key)

@dataclass(frozen=True)
class ArrayHeader:
    """Shape and dtype of one stored array, read without its data."""

    shape: tuple[int, ...]
    dtype: np.dtype

def _read_npy_header(stream: IO[bytes], stream_size: int) -> ArrayHeader:
    """Parse the header of an .npy stream of ``stream_size`` bytes; ValueError if the data is cut short."""
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(stream)
    else:
        shape, _, dtype = np.lib.format.read_array_header_2_0(stream)
    if not dtype.hasobject:
        needed = stream.tell() + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if stream_size < needed:
            raise ValueError(f"truncated: {stream_size} of {needed} bytes")
    return ArrayHeader(tuple(shape), dtype)

def read_headers(path: Path) -> dict[str, ArrayHeader]:
    """Headers of the arrays of an .npy file (key '') or .npz file (keys as np.load names them)."""
    try:
        if path.suffix.lower() == ".npy":
            with path.open("rb") as stream:
                return {NPY_KEY: _read_npy_header(stream, path.stat().st_size)}
        headers = {}
        with zipfile.ZipFile(path) as archive:
            for member in archive.infolist():
                if member.filename.endswith(".npy"):
                    with archive.open(member) as stream:
                        headers[member.filename[: -len(".npy")]] = _read_npy_header(stream, member.file_size)
        return headers
    except Exception as exc:
        raise CalibrationError(f"{path}: cannot read ({reason(exc)})") from exc

def load_arrays(path: Path, keys: Sequence[str]) -> dict[str, np.ndarray]:
    """The arrays ``keys`` of one file: memory-mapped for .npy, loaded for .npz."""
    try:
        if path.suffix.lower() == ".npy":
            return {NPY_KEY: np.load(path, mmap_mode="r", allow_pickle=False)}
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in keys}
    except Exception as exc:
        raise CalibrationError(f"{path}: cannot read ({reason(exc)})") from exc

def _dtype_accepted(expected: np.dtype, found: np.dtype) -> bool:
    """Float inputs take float16/32/64, integer inputs any integer, bool inputs bool."""
    if expected.kind == "f":
        return found.kind == "f" and found.itemsize <= 8
    if expected.kind in "iu":
        return found.kind in "iu"
    return found == expected

def check_dtype(path: Path, spec: InputSpec, found: np.dtype) -> None:
    if not _dtype_accepted(spec.dtype, found):
        accepted = {"f": "float16/32/64", "i": "integer", "u": "integer"}.get(spec.dtype.kind, str(spec.dtype))
        raise CalibrationError(
            f"{path}: input {spec.name!r} has dtype {found} but the model expects {spec.dtype} "
            f"(store {accepted} arrays)"
        )
