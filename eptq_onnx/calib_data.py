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

import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterator, Mapping, Sequence

import numpy as np
import onnx
from PIL import Image

from .config import DEFAULT_MAX_SAMPLES, CalibOptions, ImageOptions
from .errors import CalibrationError, ModelError, UsageError

ARRAY_EXTENSIONS = (".npy", ".npz")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
SUPPORTED_EXTENSIONS = ARRAY_EXTENSIONS + IMAGE_EXTENSIONS

_NPY_KEY = ""  # key of the one array of a .npy file
_MAX_REASON_CHARS = 160

Shape = tuple[int | None, ...]


# --------------------------------------------------------------------------- model inputs


@dataclass(frozen=True)
class InputSpec:
    """One model input the calibration data must feed."""

    name: str
    dtype: np.dtype  # numpy dtype the model expects
    shape: Shape  # None for dynamic / symbolic dims
    symbols: tuple[str | None, ...] = field(default=(), compare=False)  # dim_param of each dim (None: unnamed)

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", np.dtype(self.dtype))
        object.__setattr__(self, "shape", tuple(self.shape))
        object.__setattr__(self, "symbols", tuple(self.symbols))

    def symbol(self, axis: int) -> str | None:
        """The name the model gives dim ``axis`` (dims named alike are equal), None when unnamed or fixed."""
        return self.symbols[axis] if axis < len(self.symbols) and self.shape[axis] is None else None


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """Graph inputs that are not initializers, in graph order."""
    initializers = {init.name for init in model.graph.initializer}
    return [_input_spec(info) for info in model.graph.input if info.name not in initializers]


def _input_spec(info: onnx.ValueInfoProto) -> InputSpec:
    """The InputSpec of one graph input; ModelError when it is no tensor with a known rank."""
    if info.type.WhichOneof("value") != "tensor_type":
        raise ModelError(f"model input {info.name!r} is not a tensor: only tensor inputs can be calibrated")
    tensor = info.type.tensor_type
    try:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type))
    except Exception as exc:
        raise ModelError(
            f"model input {info.name!r} has element type {tensor.elem_type}, which numpy cannot hold"
        ) from exc
    if not tensor.HasField("shape"):
        raise ModelError(f"model input {info.name!r} declares no shape: re-export the model with input shapes")
    shape = tuple(dim.dim_value if dim.HasField("dim_value") and dim.dim_value > 0 else None for dim in tensor.shape.dim)
    symbols = tuple(dim.dim_param or None for dim in tensor.shape.dim)
    return InputSpec(info.name, dtype, shape, symbols)


def _format_shape(shape: Sequence[int | None], symbols: Sequence[str | None] = ()) -> str:
    """``[?, 3, 224, 224]``: the shape with '?' for dynamic dims (or their names, from ``symbols``)."""
    names = [*symbols, *[None] * (len(shape) - len(symbols))]
    return "[" + ", ".join((name or "?") if dim is None else str(dim) for dim, name in zip(shape, names)) + "]"


def _describe_inputs(specs: Sequence[InputSpec]) -> str:
    """``'x' float32 [?, 3, 224, 224], 'ids' int64 [?, 8]``."""
    return ", ".join(f"{spec.name!r} {spec.dtype} {_format_shape(spec.shape)}" for spec in specs)


def _reason(exc: BaseException) -> str:
    """The first line of a library exception, shortened: the 'why' of a one-line error."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= _MAX_REASON_CHARS else text[: _MAX_REASON_CHARS - 3] + "..."


# --------------------------------------------------------------------------- folder listing


def _natural_key(path: Path) -> tuple[list[int | str], str]:
    """Sort key putting ``2.npy`` before ``10.npy`` (split() alternates text and digit runs)."""
    parts = re.split(r"(\d+)", path.name.lower())
    return [int(part) if i % 2 else part for i, part in enumerate(parts)], path.name


def _list_files(folder: Path) -> list[Path]:
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
        raise CalibrationError(f"calibration folder {folder} cannot be listed ({_reason(exc)})") from exc
    if not files:
        extensions = "/".join(SUPPORTED_EXTENSIONS)
        raise CalibrationError(f"calibration folder {folder} has no {extensions} files")
    return sorted(files, key=_natural_key)


# --------------------------------------------------------------------------- array files


@dataclass(frozen=True)
class _ArrayHeader:
    """Shape and dtype of one stored array, read without its data."""

    shape: tuple[int, ...]
    dtype: np.dtype


def _read_npy_header(stream: IO[bytes], stream_size: int) -> _ArrayHeader:
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
    return _ArrayHeader(tuple(shape), dtype)


def _read_headers(path: Path) -> dict[str, _ArrayHeader]:
    """Headers of the arrays of an .npy file (key '') or .npz file (keys as np.load names them)."""
    try:
        if path.suffix.lower() == ".npy":
            with path.open("rb") as stream:
                return {_NPY_KEY: _read_npy_header(stream, path.stat().st_size)}
        headers = {}
        with zipfile.ZipFile(path) as archive:
            for member in archive.infolist():
                if member.filename.endswith(".npy"):
                    with archive.open(member) as stream:
                        headers[member.filename[: -len(".npy")]] = _read_npy_header(stream, member.file_size)
        return headers
    except Exception as exc:
        raise CalibrationError(f"{path}: cannot read ({_reason(exc)})") from exc


def _load_arrays(path: Path, keys: Sequence[str]) -> dict[str, np.ndarray]:
    """The arrays ``keys`` of one file: memory-mapped for .npy, loaded for .npz."""
    try:
        if path.suffix.lower() == ".npy":
            return {_NPY_KEY: np.load(path, mmap_mode="r", allow_pickle=False)}
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in keys}
    except Exception as exc:
        raise CalibrationError(f"{path}: cannot read ({_reason(exc)})") from exc


def _dtype_accepted(expected: np.dtype, found: np.dtype) -> bool:
    """Float inputs take float16/32/64, integer inputs any integer, bool inputs bool."""
    if expected.kind == "f":
        return found.kind == "f" and found.itemsize <= 8
    if expected.kind in "iu":
        return found.kind in "iu"
    return found == expected


def _check_dtype(path: Path, spec: InputSpec, found: np.dtype) -> None:
    if not _dtype_accepted(spec.dtype, found):
        accepted = {"f": "float16/32/64", "i": "integer", "u": "integer"}.get(spec.dtype.kind, str(spec.dtype))
        raise CalibrationError(
            f"{path}: input {spec.name!r} has dtype {found} but the model expects {spec.dtype} "
            f"(store {accepted} arrays)"
        )


@dataclass(frozen=True)
class _Layout:
    """How one stored array maps onto samples of one input."""

    count: int  # samples in the array
    sample_shape: tuple[int, ...]  # shape of one sample (no batch dim)
    batched: bool  # the array carries the batch dim


def _sample_layout(spec: InputSpec, shape: tuple[int, ...]) -> _Layout | None:
    """One sample (rank = input rank - 1) or a batch (rank = input rank) with matching fixed dims;
    None when the array is neither."""
    rank = len(spec.shape)
    if len(shape) == rank - 1:
        layout = _Layout(1, shape, batched=False)
    elif len(shape) == rank:
        layout = _Layout(shape[0], shape[1:], batched=True)
    else:
        return None
    return layout if _fits(spec.shape[1:], layout.sample_shape) else None


def _fits(declared: Sequence[int | None], shape: Sequence[int]) -> bool:
    """Whether ``shape`` has the rank of ``declared`` and its fixed dims."""
    return len(declared) == len(shape) and all(want in (None, got) for want, got in zip(declared, shape))


def _feed_shape(path: Path, spec: InputSpec, shape: tuple[int, ...], omittable: bool) -> tuple[int, ...]:
    """The shape an array is fed with as (part of) one whole feed: as stored, or with a dim 0 of 1
    when the model has a batch dim (``omittable``) and the array leaves it out; CalibrationError
    when that shape does not fit the input."""
    full = (1, *shape) if omittable and len(shape) == len(spec.shape) - 1 else shape
    if not _fits(spec.shape, full):
        hint = "the first dim is the batch and may be left out" if omittable else "the model has no batch dim"
        raise CalibrationError(
            f"{path}: input {spec.name!r} has shape {_format_shape(shape)} but the model expects "
            f"{_format_shape(spec.shape)} ('?' is any size; {hint})"
        )
    return full


def _check_named_dims(path: Path, specs: Sequence[InputSpec], stored: Mapping[str, tuple[int, ...]],
                      fed: Mapping[str, tuple[int, ...]]) -> None:
    """CalibrationError when dims that the model names alike (one dim_param) differ in size."""
    seen: dict[str, tuple[int, str]] = {}  # name -> (size, the input it was first seen in)
    for spec in specs:
        for axis, size in enumerate(fed[spec.name]):
            name = spec.symbol(axis)
            if name is None:
                continue
            first_size, first_input = seen.setdefault(name, (size, spec.name))
            if size != first_size:
                raise CalibrationError(
                    f"{path}: input {spec.name!r} has shape {_format_shape(stored[spec.name])} but the model expects "
                    f"{_format_shape(spec.shape, spec.symbols)} with {name} = {first_size} as in input {first_input!r} "
                    f"(dims the model names alike must be equal)"
                )


def _match_keys(path: Path, headers: Mapping[str, _ArrayHeader], specs: Sequence[InputSpec]) -> dict[str, str]:
    """Input name -> array key in the file."""
    names = ", ".join(repr(spec.name) for spec in specs)
    if path.suffix.lower() == ".npy":
        if len(specs) > 1:
            raise CalibrationError(
                f"{path}: the model has {len(specs)} inputs ({names}): "
                f"store samples as .npz files with one array per input name"
            )
        return {specs[0].name: _NPY_KEY}
    if len(specs) == 1 and len(headers) == 1 and specs[0].name not in headers:
        return {specs[0].name: next(iter(headers))}
    missing = [spec.name for spec in specs if spec.name not in headers]
    if missing:
        found = ", ".join(repr(key) for key in headers) or "none"
        raise CalibrationError(
            f"{path}: no array for input{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))} "
            f"(found: {found}); "
            f"key the arrays by model input name ({names})"
        )
    return {spec.name: spec.name for spec in specs}


# --------------------------------------------------------------------------- images


@dataclass(frozen=True)
class _ImageTarget:
    """How image files become samples of the model's one image input."""

    mode: str  # PIL mode: "RGB" or "L"
    height: int
    width: int
    mean: np.ndarray  # per channel, in the model's channel order
    std: np.ndarray
    scale: float
    layout: str
    bgr: bool

    @property
    def sample_shape(self) -> tuple[int, ...]:
        channels = len(self.mean)
        if self.layout == "nchw":
            return (channels, self.height, self.width)
        return (self.height, self.width, channels)


def _image_target(path: Path, specs: Sequence[InputSpec], options: ImageOptions) -> _ImageTarget:
    """Check that images fit the model (one rank-4 float input, 1 or 3 channels) and the options."""
    if len(specs) != 1 or len(specs[0].shape) != 4 or specs[0].dtype.kind != "f":
        raise CalibrationError(
            f"{path}: image files need a model with one rank-4 float input, but the model takes "
            f"{_describe_inputs(specs)}: use .npy/.npz files"
        )
    spec = specs[0]
    if options.layout not in ("nchw", "nhwc"):
        raise UsageError(f"image layout {options.layout!r} is not supported: choose nchw or nhwc")
    channel_axis, height_axis, width_axis = (1, 2, 3) if options.layout == "nchw" else (3, 1, 2)
    channels = spec.shape[channel_axis] or 3
    if channels not in (1, 3):
        raise CalibrationError(
            f"{path}: model input {spec.name!r} {_format_shape(spec.shape)} has {channels} channels in "
            f"{options.layout} layout but images give 1 or 3: check the image layout or use .npy files"
        )
    height, width = _image_size(path, spec, options, (height_axis, width_axis))
    std = _per_channel("std", options.std, channels)
    if not np.all(std != 0):
        raise UsageError(f"image std {tuple(options.std)} must not contain 0")
    return _ImageTarget(
        mode="L" if channels == 1 else "RGB",
        height=height,
        width=width,
        mean=_per_channel("mean", options.mean, channels),
        std=std,
        scale=float(options.scale),
        layout=options.layout,
        bgr=options.bgr,
    )


def _image_size(path: Path, spec: InputSpec, options: ImageOptions, axes: tuple[int, int]) -> tuple[int, int]:
    """(H, W) images are resized to: --image-size, else the model's fixed H and W."""
    model_size = tuple(spec.shape[axis] for axis in axes)
    if options.size is None:
        if None in model_size:
            raise CalibrationError(
                f"{path}: model input {spec.name!r} {_format_shape(spec.shape)} has a dynamic height or width: "
                f"give --image-size H W"
            )
        return model_size  # type: ignore[return-value]
    height, width = (int(value) for value in options.size)
    if height < 1 or width < 1:
        raise UsageError(f"--image-size {height} {width} must be positive")
    if any(want not in (None, got) for want, got in zip(model_size, (height, width))):
        raise UsageError(
            f"--image-size {height} {width} does not match model input {spec.name!r} "
            f"{_format_shape(spec.shape)} ({options.layout}): give the model's height and width"
        )
    return height, width


def _per_channel(label: str, values: Sequence[float], channels: int) -> np.ndarray:
    """Per-channel mean/std: one value per channel, or one value (or all equal values) for all."""
    values = tuple(float(value) for value in values)
    if len(values) != channels:
        if len(set(values)) != 1:
            raise UsageError(
                f"image {label} has {len(values)} values but the model takes {channels}-channel images: "
                f"give {channels} value(s)"
            )
        values = values[:1] * channels
    return np.asarray(values, dtype=np.float64)


def _probe_image(path: Path) -> None:
    """Open the image header (cheap) so unreadable images are reported up front."""
    try:
        with Image.open(path) as image:
            image.size  # noqa: B018 - the header is parsed on open
    except Exception as exc:
        raise CalibrationError(f"{path}: cannot read image ({_reason(exc)})") from exc


def _load_image(path: Path, target: _ImageTarget) -> np.ndarray:
    """One image as a float32 sample: (pixel * scale - mean) / std, channels in model order and layout."""
    try:
        with Image.open(path) as image:
            image = image.convert(target.mode)
            if image.size != (target.width, target.height):
                image = image.resize((target.width, target.height), Image.Resampling.BILINEAR)
            pixels = np.asarray(image, dtype=np.float64)
    except Exception as exc:
        raise CalibrationError(f"{path}: cannot read image ({_reason(exc)})") from exc
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if target.bgr:
        pixels = pixels[:, :, ::-1]
    values = (pixels * target.scale - target.mean) / target.std
    if target.layout == "nchw":
        values = values.transpose(2, 0, 1)
    return np.ascontiguousarray(values, dtype=np.float32)


# --------------------------------------------------------------------------- file entries


@dataclass(frozen=True)
class _FileEntry:
    """One calibration file, checked against the model inputs."""

    path: Path
    keys: Mapping[str, str]  # input name -> array key in the file (empty for images)
    batched: Mapping[str, bool]  # input name -> the array carries the batch dim (whole feed: the input's rank)
    count: int  # samples in the file
    signature: tuple[tuple[int, ...], ...]  # shape of one sample of each input, in input order
    whole: bool = False  # one feed as stored: never split, never joined with another file

    @property
    def is_image(self) -> bool:
        return self.path.suffix.lower() in IMAGE_EXTENSIONS


def _array_entry(path: Path, specs: Sequence[InputSpec], batch_dim: bool, samples: bool) -> _FileEntry:
    """Check an .npy/.npz file's names, dtypes and shapes from its headers.

    With ``samples``, a file whose arrays are samples or batches of one length is read as samples;
    any other file is one whole feed (``batch_dim``: the model has a batch dim, which arrays may leave out).
    """
    headers = _read_headers(path)
    keys = _match_keys(path, headers, specs)
    shapes = {}
    for spec in specs:
        header = headers[keys[spec.name]]
        _check_dtype(path, spec, header.dtype)
        shapes[spec.name] = header.shape
    entry = _samples_entry(path, keys, specs, shapes) if samples else None
    return entry or _feed_entry(path, keys, specs, shapes, batch_dim)


def _samples_entry(path: Path, keys: Mapping[str, str], specs: Sequence[InputSpec],
                   shapes: Mapping[str, tuple[int, ...]]) -> _FileEntry | None:
    """The file as samples along the batch dim, or None when its arrays are no samples of one count."""
    layouts = {spec.name: _sample_layout(spec, shapes[spec.name]) for spec in specs}
    counts = {layout.count if layout else None for layout in layouts.values()}
    if None in counts or len(counts) > 1:
        return None
    return _FileEntry(
        path=path,
        keys=keys,
        batched={name: layout.batched for name, layout in layouts.items() if layout},
        count=counts.pop(),
        signature=tuple(layouts[spec.name].sample_shape for spec in specs),  # type: ignore[union-attr]
    )


def _feed_entry(path: Path, keys: Mapping[str, str], specs: Sequence[InputSpec],
                shapes: Mapping[str, tuple[int, ...]], batch_dim: bool) -> _FileEntry:
    """The file as one whole feed; CalibrationError naming the first input whose shape contradicts the model."""
    fed = {spec.name: _feed_shape(path, spec, shapes[spec.name], batch_dim) for spec in specs}
    _check_named_dims(path, specs, shapes, fed)
    return _FileEntry(
        path=path,
        keys=keys,
        batched={spec.name: len(shapes[spec.name]) == len(spec.shape) for spec in specs},
        count=1,
        signature=tuple(fed[spec.name] for spec in specs),
        whole=True,
    )


def _image_entry(path: Path, spec: InputSpec, target: _ImageTarget) -> _FileEntry:
    """An image file: one sample of the target's shape."""
    _probe_image(path)
    return _FileEntry(path=path, keys={}, batched={spec.name: False}, count=1, signature=(target.sample_shape,))


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

    entry: _FileEntry
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


def _plan(entries: Sequence[_FileEntry], count: int, size: int, exact: bool) -> Iterator[list[_Part]]:
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

    def __init__(self, specs: Sequence[InputSpec], image: _ImageTarget | None) -> None:
        self._specs = specs
        self._image = image
        self._path: Path | None = None
        self._arrays: dict[str, np.ndarray] = {}

    def read(self, part: _Part) -> dict[str, np.ndarray]:
        """The samples of ``part`` as {input name: array with batch dim}, cast and checked."""
        entry = part.entry
        if entry.is_image:
            assert self._image is not None  # set when the entry was made
            raw = {self._specs[0].name: _load_image(entry.path, self._image)[None]}
        else:
            arrays = self._arrays_of(entry)
            raw = {
                spec.name: self._take(arrays[entry.keys[spec.name]], entry.batched[spec.name], part)
                for spec in self._specs
            }
        return {spec.name: _convert(raw[spec.name], spec, entry.path) for spec in self._specs}

    def _arrays_of(self, entry: _FileEntry) -> dict[str, np.ndarray]:
        if entry.path != self._path:
            self._arrays = {}  # release the previous file before loading the next
            self._arrays = _load_arrays(entry.path, list(entry.keys.values()))
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
        self._image: _ImageTarget | None = None
        wanted = options.num_samples if options.num_samples is not None else DEFAULT_MAX_SAMPLES
        self._entries, available = self._scan(_list_files(self._folder), wanted)
        if options.num_samples is not None and available < wanted:
            raise CalibrationError(
                f"asked for {wanted} samples, folder {self._folder} has {available}: lower --num-calib or add samples"
            )
        if available == 0:
            raise CalibrationError(f"calibration folder {self._folder} holds no samples (its arrays are empty)")
        self._count = min(available, wanted)
        self._used = sum(part.size for batch in self._plan(None, None) for part in batch)
        if self._used == 0:
            raise CalibrationError(
                f"the model has a fixed batch size of {self._fixed_batch} but {self._folder} has no "
                f"{self._fixed_batch} consecutive samples of one shape ({self._count} in all): add samples"
            )

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
        the optimizer's minibatches are): the files are samples and every input declares dim 0 alike."""
        return self._samples and self._batch is not None and self._batch.uniform

    def samples_in(self, feeds: Mapping[str, np.ndarray]) -> int:
        """How many samples one feed dict of :meth:`batches` holds (a whole feed: 1)."""
        return 1 if self.whole_feeds else len(next(iter(feeds.values())))

    def describe(self) -> str:
        """How the files are read, for the report: ``batched along dim 0`` or why they are whole feeds."""
        if self._samples:
            fixed = f" (fixed at {self._fixed_batch})" if self._fixed_batch else ""
            return f"samples batched along dim 0{fixed}"
        why = ("the inputs share no batch dim" if self._batch is None
               else "a file holds arrays of different lengths along dim 0")
        return (f"each file is one whole feed, run alone as stored ({why}: {_describe_inputs(self._specs)}); "
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

    def _scan(self, files: Sequence[Path], wanted: int) -> tuple[list[_FileEntry], int]:
        """Check files in order until ``wanted`` samples are found; the entries and their sample count.

        The first file that is a whole feed makes every file one: those seen before are checked again as feeds.
        """
        entries: list[_FileEntry] = []
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

    def _inspect(self, path: Path) -> _FileEntry:
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            if self._image is None:
                self._image = _image_target(path, self._specs, self._options.image)
            return _image_entry(path, self._specs[0], self._image)
        return _array_entry(path, self._specs, batch_dim=self._batch is not None, samples=self._samples)

    def _plan(self, batch_size: int | None, limit: int | None) -> Iterator[list[_Part]]:
        count = self._count if limit is None else min(limit, self._count)
        if not self._samples:
            return ([_Part(entry, 0, 1)] for entry in self._entries[:count])
        size = self._fixed_batch or batch_size or self._options.batch_size
        return _plan(self._entries, count, size, exact=self._fixed_batch is not None)

    def _read(self, plan: Iterator[list[_Part]]) -> Iterator[dict[str, np.ndarray]]:
        reader = _FileReader(self._specs, self._image)
        for parts in plan:
            pieces = [reader.read(part) for part in parts]
            yield {spec.name: _concat([piece[spec.name] for piece in pieces]) for spec in self._specs}


def _concat(arrays: list[np.ndarray]) -> np.ndarray:
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)
