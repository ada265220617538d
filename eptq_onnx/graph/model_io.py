"""Reading and writing ONNX files: clear errors on bad input, atomic writes, loadable IR versions."""
from __future__ import annotations

import itertools
import os
import re
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import onnx
import onnxruntime as ort
from google.protobuf.message import EncodeError
from google.protobuf.message import Error as ProtobufError
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

from eptq_onnx.graph import tensor_store
from eptq_onnx.errors import ModelError, UsageError
from eptq_onnx.graph.tensor_store import TensorStore, external_bytes, inlined, store_of, stored_chunks
from eptq_onnx.graph.tensor_store import model_tensors as _model_tensors

# Serialized size above which save_model moves tensor data to "<out>.data" (protobuf's limit is
# 2 GiB; keep a margin for the graph itself). Tests lower it to exercise that path.
EXTERNAL_DATA_THRESHOLD = onnx.checker.MAXIMUM_PROTOBUF - (64 << 20)
# Tensors smaller than this stay inline even when a model is written with external data.
EXTERNAL_TENSOR_MIN_BYTES = 1024

# Fallback when onnxruntime's refusal message cannot be parsed: (major, minor, IR version) that
# release is known to accept, newest first. Gaps err low, which is safe: older IR still loads.
_ORT_IR_TABLE = ((1, 31, 13), (1, 18, 10), (1, 15, 9), (1, 14, 8), (1, 9, 7))
_ORT_IR_FALLBACK = 10


def _ort_version() -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", ort.__version__)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def _ir_from_table() -> int:
    version = _ort_version()
    for major, minor, ir in _ORT_IR_TABLE:
        if version >= (major, minor):
            return ir
    return _ORT_IR_FALLBACK


def _probe_ort_max_ir_version() -> int:
    """Ask onnxruntime: a model with an absurd IR version is refused with the maximum it accepts."""
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])],
        "ir_probe",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    probe = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)])
    probe.ir_version = 10_000
    options = ort.SessionOptions()
    options.log_severity_level = 4
    try:
        ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # noqa: BLE001 - any refusal may carry the number
        match = re.search(r"max supported IR version:\s*(\d+)", str(err))
        if match:
            return int(match.group(1))
    return _ir_from_table()


ORT_MAX_IR_VERSION: int = _probe_ort_max_ir_version()


def ir_version_for(opset: int) -> int:
    """Lowest IR version that supports this default-domain opset, capped at ORT_MAX_IR_VERSION."""
    candidates = [ir for _, ir, ai_onnx, *_ in onnx.helper.VERSION_TABLE if ai_onnx >= opset]
    return min(min(candidates, default=onnx.IR_VERSION), ORT_MAX_IR_VERSION)


def serialized_size(model: onnx.ModelProto) -> int:
    """The model's protobuf size in bytes with its external (tensor store) data counted as inline;
    over 2 GB (where protobuf refuses to say) the sum of its tensor data, which is then at least that large."""
    try:
        return model.ByteSize() + external_bytes(model)
    except EncodeError:
        return sum(len(t.raw_data) for t in _model_tensors(model)) + external_bytes(model)


def default_opset(model: onnx.ModelProto) -> int:
    """The model's default-domain (ai.onnx) opset version."""
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            return opset.version
    raise ModelError("the model imports no default-domain (ai.onnx) opset: re-export it")


# ---------------------------------------------------------------- loading


def load_model(path: str | Path, store: Optional[TensorStore] = None) -> onnx.ModelProto:
    """Read an ONNX file and its external data (looked up next to the file).

    With a ``store``, a model with more than LARGE_MODEL_BYTES of tensor data keeps its large
    tensors there (copied from its external data file piece by piece) instead of in memory.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: {'not a file' if path.exists() else 'no such file'}")
    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except (ProtobufError, UnicodeDecodeError, ValueError) as err:
        raise ModelError(f"{path}: not an ONNX model or truncated file ({err})") from err
    except OSError as err:
        raise ModelError(f"{path}: cannot read ({err.strerror or err})") from err
    if not model.HasField("graph") or not model.opset_import or not model.graph.output:
        raise ModelError(f"{path}: not an ONNX model (no graph, outputs or opset)")
    external = _check_external_files(model, path)
    data_bytes = path.stat().st_size + sum(_data_bytes(t, path.parent) for t in external)
    if store is not None and data_bytes > tensor_store.LARGE_MODEL_BYTES:
        return _load_into_store(model, path, external, store)
    _load_external_data(model, path)
    return model


def _check_external_files(model: onnx.ModelProto, path: Path) -> list[onnx.TensorProto]:
    """The model's external tensors; ModelError when a data file is missing."""
    external = [t for t in _model_tensors(model) if uses_external_data(t)]
    for tensor in external:
        location = ExternalDataInfo(tensor).location
        if not (path.parent / location).is_file():
            raise ModelError(
                f"{path}: external data file {location!r} (tensor {tensor.name!r}) is missing: "
                f"put it next to the model"
            )
    return external


def _data_bytes(tensor: onnx.TensorProto, base_dir: Path) -> int:
    info = ExternalDataInfo(tensor)
    return info.length or max((base_dir / info.location).stat().st_size - (info.offset or 0), 0)


def _load_into_store(model: onnx.ModelProto, path: Path, external: list[onnx.TensorProto],
                     store: TensorStore) -> onnx.ModelProto:
    try:
        for tensor in external:
            store.adopt(tensor, path.parent)
    except OSError as err:
        raise ModelError(f"{path}: cannot read its external data ({err.strerror or err})") from err
    return store.held(model)


def _load_external_data(model: onnx.ModelProto, path: Path) -> None:
    base_dir = path.parent
    try:
        onnx.load_external_data_for_model(model, str(base_dir))
    except EncodeError as err:
        raise ModelError(
            f"{path}: the model's weights exceed the 2 GB protobuf limit of this Python protobuf"
        ) from err
    except (OSError, ValueError, onnx.checker.ValidationError) as err:
        raise ModelError(f"{path}: cannot read its external data ({err})") from err


# ---------------------------------------------------------------- saving


def save_model(model: onnx.ModelProto, path: str | Path, *, force: bool = False) -> None:
    """Write a model atomically, setting its ir_version to one onnxruntime accepts.

    Models larger than EXTERNAL_DATA_THRESHOLD keep their tensor data in "<path>.data".
    An existing file is only replaced when ``force`` is set.
    """
    path = Path(path)
    data_path = path.with_name(path.name + ".data")
    external = serialized_size(model) > EXTERNAL_DATA_THRESHOLD
    _check_writable(path, force)
    if external:
        _check_writable(data_path, force)
    model.ir_version = max(ir_version_for(default_opset(model)), 8 if model.functions else 0)
    try:
        if external:
            _save_external(model, path, data_path)
        else:
            _write_atomic(path, [(inlined(model) if store_of(model) else model).SerializeToString()])
    except OSError as err:
        raise UsageError(f"cannot write {path}: {err.strerror or err}") from err
    except EncodeError as err:
        raise ModelError(f"cannot serialize the model for {path}: {err}") from err


def _check_writable(path: Path, force: bool) -> None:
    if not path.parent.is_dir():
        raise UsageError(f"cannot write {path}: folder {path.parent} does not exist")
    if path.is_dir():
        raise UsageError(f"cannot write {path}: it is a folder")
    if path.exists() and not force:
        raise UsageError(f"{path} exists: pass force=True (--force) to overwrite it")


@contextmanager
def _temp_file(path: Path) -> Iterator[Path]:
    """A fresh temporary file next to ``path``; removed unless the caller moved it into place."""
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        yield temp
    finally:
        temp.unlink(missing_ok=True)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write a (small) file atomically: all of it or, on any error or interruption, nothing."""
    path = Path(path)
    try:
        _write_atomic(path, [data])
    except OSError as err:
        raise UsageError(f"cannot write {path}: {err.strerror or err}") from err


def _write_atomic(path: Path, chunks: Iterable[bytes]) -> None:
    with _temp_file(path) as temp:
        _write_file(temp, chunks)
        os.replace(temp, path)


def _write_file(temp: Path, chunks: Iterable[bytes]) -> None:
    # os.open with 0o666 lets the umask decide the mode, as for any newly created file.
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    with os.fdopen(fd, "wb") as file:
        for chunk in chunks:
            file.write(chunk)
        file.flush()
        os.fsync(file.fileno())


def save_with_external_data(model: onnx.ModelProto, path: str | Path) -> None:
    """Write ``model`` to ``path`` with its large tensors in "<path>.data"; the model is left unchanged.

    (``onnx.save_model(..., save_as_external_data=True)`` moves the tensor data out of the
    caller's model for good.) For temporary copies that onnxruntime or the checker read from a path.
    """
    path = Path(path)
    _save_external(model, path, path.with_name(path.name + ".data"))


def _large_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    return [t for t in _model_tensors(model) if t.HasField("raw_data") and len(t.raw_data) >= EXTERNAL_TENSOR_MIN_BYTES]


@contextmanager
def model_path(model: onnx.ModelProto) -> Iterator[Path]:
    """A file of ``model`` for onnxruntime or the checker: next to its tensor store's data when it
    is store-backed (nothing copied), else a temporary copy with external data."""
    store = store_of(model)
    if store is not None:
        with store.model_file(model) as path:
            yield path
        return
    with tempfile.TemporaryDirectory(prefix="eptq-model-") as folder:
        path = Path(folder) / "model.onnx"
        save_with_external_data(model, path)
        yield path


@contextmanager
def large_tensors_detached(model: onnx.ModelProto) -> Iterator[None]:
    """Within the block the model's large tensors are external references (to no file), so the
    model serializes small (for shape inference, which needs no weight values); restored after."""
    with _externalized(_large_tensors(model), "detached.data"):
        yield


def _save_external(model: onnx.ModelProto, path: Path, data_path: Path) -> None:
    """Write the large tensors (inline or in a tensor store) to data_path, the rest to path, tensor
    by tensor; the model is left unchanged."""
    tensors = _large_tensors(model) + [t for t in _model_tensors(model) if uses_external_data(t)]
    with _temp_file(data_path) as data_temp, _temp_file(path) as model_temp:
        with _externalized(tensors, data_path.name) as chunks:
            _write_file(data_temp, itertools.chain.from_iterable(chunks))
            _write_file(model_temp, [model.SerializeToString()])
        os.replace(data_temp, data_path)
        os.replace(model_temp, path)


@contextmanager
def _externalized(tensors: list[onnx.TensorProto], location: str) -> Iterator[list[Iterable[bytes]]]:
    """Temporarily point tensors (inline or store-backed) at consecutive ranges of one data file;
    yields their data, each tensor's in pieces."""
    saved: list[Optional[list[tuple[str, str]]]] = []  # store references to restore (None: inline)
    data: list[Iterable[bytes]] = []
    offset = 0
    try:
        for tensor in tensors:
            if uses_external_data(tensor):
                saved.append([(e.key, e.value) for e in tensor.external_data])
                data.append(stored_chunks(tensor))
                length = ExternalDataInfo(tensor).length
            else:
                saved.append(None)
                data.append([tensor.raw_data])
                length = len(data[-1][0])
            tensor.ClearField("raw_data")
            tensor.ClearField("external_data")
            tensor.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", location), ("offset", offset), ("length", length)):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, str(value)
            offset += length
        yield data
    finally:
        for tensor, entries, pieces in zip(tensors, saved, data):
            tensor.ClearField("external_data")
            tensor.ClearField("data_location")
            if entries is None:
                tensor.raw_data = pieces[0]  # type: ignore[index]
                continue
            tensor.data_location = onnx.TensorProto.EXTERNAL
            for key, value in entries:
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
