"""One calibration file checked against the model inputs from its headers: which array feeds which input, and whether it holds samples, a batch or one whole feed."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence
from eptq_onnx.errors import CalibrationError
from eptq_onnx.calib.specs import InputSpec, format_shape
from eptq_onnx.calib.files import IMAGE_EXTENSIONS, ArrayHeader, NPY_KEY, check_dtype, read_headers
from eptq_onnx.calib.images import ImageTarget, probe_image


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
            f"{path}: input {spec.name!r} has shape {format_shape(shape)} but the model expects "
            f"{format_shape(spec.shape)} ('?' is any size; {hint})"
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
                    f"{path}: input {spec.name!r} has shape {format_shape(stored[spec.name])} but the model expects "
                    f"{format_shape(spec.shape, spec.symbols)} with {name} = {first_size} as in input {first_input!r} "
                    f"(dims the model names alike must be equal)"
                )

def _match_keys(path: Path, headers: Mapping[str, ArrayHeader], specs: Sequence[InputSpec]) -> dict[str, str]:
    """Input name -> array key in the file."""
    names = ", ".join(repr(spec.name) for spec in specs)
    if path.suffix.lower() == ".npy":
        if len(specs) > 1:
            raise CalibrationError(
                f"{path}: the model has {len(specs)} inputs ({names}): "
                f"store samples as .npz files with one array per input name"
            )
        return {specs[0].name: NPY_KEY}
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

@dataclass(frozen=True)
class FileEntry:
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

def array_entry(path: Path, specs: Sequence[InputSpec], batch_dim: bool, samples: bool,
                headers: Mapping[str, ArrayHeader] | None = None) -> FileEntry:
    """Check an .npy/.npz file's names, dtypes and shapes from its headers (read from the file unless
    given: arrays held in memory).

    With ``samples``, a file whose arrays are samples or batches of one length is read as samples;
    any other file is one whole feed (``batch_dim``: the model has a batch dim, which arrays may leave out).
    """
    headers = read_headers(path) if headers is None else headers
    keys = _match_keys(path, headers, specs)
    shapes = {}
    for spec in specs:
        header = headers[keys[spec.name]]
        check_dtype(path, spec, header.dtype)
        shapes[spec.name] = header.shape
    entry = _samples_entry(path, keys, specs, shapes) if samples else None
    return entry or _feed_entry(path, keys, specs, shapes, batch_dim)

def _samples_entry(path: Path, keys: Mapping[str, str], specs: Sequence[InputSpec],
                   shapes: Mapping[str, tuple[int, ...]]) -> FileEntry | None:
    """The file as samples along the batch dim, or None when its arrays are no samples of one count."""
    layouts = {spec.name: _sample_layout(spec, shapes[spec.name]) for spec in specs}
    counts = {layout.count if layout else None for layout in layouts.values()}
    if None in counts or len(counts) > 1:
        return None
    return FileEntry(
        path=path,
        keys=keys,
        batched={name: layout.batched for name, layout in layouts.items() if layout},
        count=counts.pop(),
        signature=tuple(layouts[spec.name].sample_shape for spec in specs),  # type: ignore[union-attr]
    )

def _feed_entry(path: Path, keys: Mapping[str, str], specs: Sequence[InputSpec],
                shapes: Mapping[str, tuple[int, ...]], batch_dim: bool) -> FileEntry:
    """The file as one whole feed; CalibrationError naming the first input whose shape contradicts the model."""
    fed = {spec.name: _feed_shape(path, spec, shapes[spec.name], batch_dim) for spec in specs}
    _check_named_dims(path, specs, shapes, fed)
    return FileEntry(
        path=path,
        keys=keys,
        batched={spec.name: len(shapes[spec.name]) == len(spec.shape) for spec in specs},
        count=1,
        signature=tuple(fed[spec.name] for spec in specs),
        whole=True,
    )

def image_entry(path: Path, spec: InputSpec, target: ImageTarget) -> FileEntry:
    """An image file: one sample of the target's shape."""
    probe_image(path)
    return FileEntry(path=path, keys={}, batched={spec.name: False}, count=1, signature=(target.sample_shape,))
