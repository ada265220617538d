"""Reading and writing ONNX files: clear errors on bad input, atomic writes, loadable IR versions."""
from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import onnx
import onnxruntime as ort
from google.protobuf.message import EncodeError
from google.protobuf.message import Error as ProtobufError
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

from .errors import ModelError, UsageError

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
    """The model's protobuf size in bytes; over 2 GB (where protobuf refuses to say) the sum of its
    tensor data, which is then at least that large."""
    try:
        return model.ByteSize()
    except EncodeError:
        return sum(len(t.raw_data) for t in _model_tensors(model))


def default_opset(model: onnx.ModelProto) -> int:
    """The model's default-domain (ai.onnx) opset version."""
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            return opset.version
    raise ModelError("the model imports no default-domain (ai.onnx) opset: re-export it")


def _node_tensors(nodes: Iterable[onnx.NodeProto]) -> Iterator[onnx.TensorProto]:
    for node in nodes:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _graph_tensors(attr.g)
            for subgraph in attr.graphs:
                yield from _graph_tensors(subgraph)


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    yield from _node_tensors(graph.node)


def _model_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor stored in a model: initializers and tensor attributes, subgraphs included."""
    yield from _graph_tensors(model.graph)
    for function in model.functions:
        yield from _node_tensors(function.node)


# ---------------------------------------------------------------- loading


def load_model(path: str | Path) -> onnx.ModelProto:
    """Read an ONNX file and its external data (looked up next to the file)."""
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
    _load_external_data(model, path)
    return model


def _load_external_data(model: onnx.ModelProto, path: Path) -> None:
    base_dir = path.parent
    for tensor in _model_tensors(model):
        if not uses_external_data(tensor):
            continue
        location = ExternalDataInfo(tensor).location
        if not (base_dir / location).is_file():
            raise ModelError(
                f"{path}: external data file {location!r} (tensor {tensor.name!r}) is missing: "
                f"put it next to the model"
            )
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
            _write_atomic(path, [model.SerializeToString()])
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
def large_tensors_detached(model: onnx.ModelProto) -> Iterator[None]:
    """Within the block the model's large tensors are external references (to no file), so the
    model serializes small (for shape inference, which needs no weight values); restored after."""
    with _externalized(_large_tensors(model), "detached.data"):
        yield


def _save_external(model: onnx.ModelProto, path: Path, data_path: Path) -> None:
    """Write the large tensors to data_path, the rest to path; the model is left unchanged."""
    tensors = _large_tensors(model)
    with _temp_file(data_path) as data_temp, _temp_file(path) as model_temp:
        with _externalized(tensors, data_path.name) as chunks:
            _write_file(data_temp, chunks)
            _write_file(model_temp, [model.SerializeToString()])
        os.replace(data_temp, data_path)
        os.replace(model_temp, path)


@contextmanager
def _externalized(tensors: list[onnx.TensorProto], location: str) -> Iterator[list[bytes]]:
    """Temporarily point tensors at consecutive ranges of one data file; yields their bytes."""
    chunks = [tensor.raw_data for tensor in tensors]
    offset = 0
    try:
        for tensor, raw in zip(tensors, chunks):
            tensor.ClearField("raw_data")
            tensor.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", location), ("offset", offset), ("length", len(raw))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, str(value)
            offset += len(raw)
        yield chunks
    finally:
        for tensor, raw in zip(tensors, chunks):
            tensor.ClearField("external_data")
            tensor.ClearField("data_location")
            tensor.raw_data = raw
