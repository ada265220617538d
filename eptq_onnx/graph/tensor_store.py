"""Large tensors on disk: one append-only data file per quantization run, referenced as ONNX external data.

A model whose tensor data exceeds LARGE_MODEL_BYTES is "store-backed": its tensors of at least
MIN_TENSOR_BYTES point at ranges of the store's file, whose name is unique, so a tensor tells which
store holds it. Copies of such a model (with extra outputs, QDQ, fake-quant reference) stay small;
onnxruntime reads it from a model file written into the store's folder and memory-maps the weights
(prepacking off, as it would copy them): every model and session of a run shares one copy on disk.
"""
from __future__ import annotations

import tempfile
import uuid
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

# Models with more tensor data than this keep their large tensors in a store (tests lower it).
LARGE_MODEL_BYTES = 256 << 20
# Tensors smaller than this stay inline in a store-backed model (shape constants, scales, ...).
MIN_TENSOR_BYTES = 1024
# Tensor offsets in the store's file are multiples of this (onnxruntime maps them page-aligned).
ALIGN = 1 << 16
CHUNK_BYTES = 64 << 20  # copies between files go in pieces of this size

_OPEN: "weakref.WeakValueDictionary[str, TensorStore]" = weakref.WeakValueDictionary()


# ---------------------------------------------------------------- the tensors of a model


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


def model_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor stored in a model: initializers and tensor attributes, subgraphs included."""
    yield from _graph_tensors(model.graph)
    for function in model.functions:
        yield from _node_tensors(function.node)


def external_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the model's tensors that are external data (by their recorded lengths)."""
    total = 0
    for tensor in model_tensors(model):
        if uses_external_data(tensor):
            total += ExternalDataInfo(tensor).length or 0
    return total


# ---------------------------------------------------------------- the store


class TensorStore:
    """A temporary folder with one data file that large tensors are moved into (see module doc).

    The folder is removed by ``close()`` or when the store is garbage-collected: keep the store
    alive as long as a model refers to it.
    """

    def __init__(self) -> None:
        self._folder = tempfile.TemporaryDirectory(prefix="eptq-store-")
        self.folder = Path(self._folder.name)
        self.location = f"eptq-store-{uuid.uuid4().hex[:12]}.data"
        self.path = self.folder / self.location
        self.path.touch()
        self.size = 0
        self._adopted: set[int] = set()  # offsets of data copied from a model's external data file
        _OPEN[self.location] = self

    def close(self) -> None:
        """Remove the folder; models still referring to it can no longer be read."""
        _OPEN.pop(self.location, None)
        self._folder.cleanup()

    def _append(self, chunks: Iterable[bytes]) -> tuple[int, int]:
        offset = -(-self.size // ALIGN) * ALIGN
        length = 0
        with open(self.path, "r+b") as file:
            file.seek(offset)
            for chunk in chunks:
                file.write(chunk)
                length += len(chunk)
        self.size = offset + length
        return offset, length

    def _refer(self, tensor: onnx.TensorProto, offset: int, length: int) -> None:
        tensor.ClearField("raw_data")
        tensor.ClearField("external_data")
        tensor.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", offset), ("length", length)):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, str(value)

    def offload(self, tensor: onnx.TensorProto) -> None:
        """Move an inline tensor's raw_data into the store; the tensor becomes a reference to it."""
        offset, length = self._append([tensor.raw_data])
        self._refer(tensor, offset, length)

    def adopt(self, tensor: onnx.TensorProto, base_dir: Path) -> None:
        """Copy an external tensor's data from its own file (relative to ``base_dir``) into the store."""
        info = ExternalDataInfo(tensor)
        offset, length = self._append(_file_chunks(base_dir / info.location, info.offset or 0, info.length))
        self._adopted.add(offset)
        self._refer(tensor, offset, length)

    def keep(self, tensor: onnx.TensorProto) -> None:
        """Offload the tensor if it is inline and has at least MIN_TENSOR_BYTES (else leave it)."""
        if is_large_inline(tensor):
            self.offload(tensor)

    def offload_large(self, model: onnx.ModelProto) -> int:
        """Move every inline tensor of the model of at least MIN_TENSOR_BYTES into the store; how many moved.

        The model's memory shrinks only when it is copied (see ``held``)."""
        moved = 0
        for tensor in model_tensors(model):
            if is_large_inline(tensor):
                self.offload(tensor)
                moved += 1
        return moved

    def held(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """The model with its large inline tensors moved into the store: a fresh copy when any moved
        (protobuf keeps a cleared field's bytes in the message's memory until the message goes)."""
        if not self.offload_large(model):
            return model
        fresh = onnx.ModelProto()
        fresh.CopyFrom(model)
        return fresh

    def hold(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """A model held in memory, as is when its data is at most LARGE_MODEL_BYTES, else a copy with
        its large tensors in the store (the argument is not changed)."""
        try:
            size = model.ByteSize()
        except Exception:  # noqa: BLE001 - protobuf refuses to size a model over 2 GB
            size = LARGE_MODEL_BYTES + 1
        if size + external_bytes(model) <= LARGE_MODEL_BYTES:
            return model
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        return self.held(copy)

    @property
    def used(self) -> bool:
        return self.size > 0

    @contextmanager
    def model_file(self, model: onnx.ModelProto) -> Iterator[Path]:
        """The model written (small: its large tensors offloaded first) next to the store's data."""
        self.offload_large(model)
        path = self.folder / f"model-{uuid.uuid4().hex[:12]}.onnx"
        try:
            path.write_bytes(model.SerializeToString())
            yield path
        finally:
            path.unlink(missing_ok=True)


def _file_chunks(path: Path, offset: int, length: Optional[int]) -> Iterator[bytes]:
    with open(path, "rb") as file:
        file.seek(offset)
        left = length
        while left is None or left > 0:
            chunk = file.read(CHUNK_BYTES if left is None else min(CHUNK_BYTES, left))
            if not chunk:
                break
            if left is not None:
                left -= len(chunk)
            yield chunk


def is_large_inline(tensor: onnx.TensorProto) -> bool:
    """An inline tensor with raw data of at least MIN_TENSOR_BYTES."""
    return tensor.HasField("raw_data") and len(tensor.raw_data) >= MIN_TENSOR_BYTES


def _store_of_tensor(tensor: onnx.TensorProto) -> Optional[TensorStore]:
    if not uses_external_data(tensor):
        return None
    for entry in tensor.external_data:
        if entry.key == "location":
            return _OPEN.get(entry.value)
    return None


def store_of(model: onnx.ModelProto) -> Optional[TensorStore]:
    """The store the model's tensors refer to, or None for a model held in memory."""
    for tensor in model_tensors(model):
        store = _store_of_tensor(tensor)
        if store is not None:
            return store
    return None


def stored_chunks(tensor: onnx.TensorProto) -> Iterator[bytes]:
    """The data of a store-backed tensor, in pieces of at most CHUNK_BYTES."""
    store = _store_of_tensor(tensor)
    if store is None:
        raise ValueError(f"tensor {tensor.name!r} is not held in an open tensor store")
    info = ExternalDataInfo(tensor)
    return _file_chunks(store.path, info.offset or 0, info.length)


def tensor_array(tensor: onnx.TensorProto) -> np.ndarray:
    """``numpy_helper.to_array`` that also reads store-backed tensors (read from disk each time)."""
    if _store_of_tensor(tensor) is None:
        return numpy_helper.to_array(tensor)
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type))
    info = ExternalDataInfo(tensor)
    count = int(np.prod(tensor.dims, dtype=np.int64))
    if count * dtype.itemsize == info.length and dtype.kind in "fiub":
        store = _store_of_tensor(tensor)
        array = np.fromfile(store.path, dtype=dtype.newbyteorder("<"), count=count, offset=info.offset or 0)
        return array.astype(dtype, copy=False).reshape(tuple(tensor.dims))
    return numpy_helper.to_array(_inline_copy(tensor))


def _inline_copy(tensor: onnx.TensorProto) -> onnx.TensorProto:
    copy = onnx.TensorProto()
    copy.CopyFrom(tensor)
    inline(copy)
    return copy


def inline(tensor: onnx.TensorProto) -> None:
    """Bring a store-backed tensor's data back into its raw_data (no-op for other tensors), as
    onnx's loader would have (it sets data_location DEFAULT on tensors read from a data file)."""
    store = _store_of_tensor(tensor)
    if store is None:
        return
    data = b"".join(stored_chunks(tensor))
    adopted = (ExternalDataInfo(tensor).offset or 0) in store._adopted
    tensor.ClearField("external_data")
    tensor.ClearField("data_location")
    tensor.raw_data = data
    if adopted:
        tensor.data_location = onnx.TensorProto.DEFAULT


def inlined(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of the model with every store-backed tensor's data inline (the model held in memory)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for tensor in model_tensors(copy):
        inline(tensor)
    return copy
