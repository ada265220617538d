"""The tensor store: large tensors on disk as external data, read back exactly, written out streamed."""
from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import uses_external_data

from eptq_onnx.graph import model_io

from eptq_onnx.graph import runtime

from eptq_onnx.graph import tensor_store
from eptq_onnx.graph.tensor_store import TensorStore


@pytest.mark.parametrize("array", [
    np.arange(600, dtype=np.float32).reshape(20, 30) / 7,
    (np.arange(1200) % 256 - 128).astype(np.int8).reshape(4, 300),
    np.linspace(-2, 2, 2048).astype(np.float16),
    np.arange(400, dtype=np.int64),
    np.linspace(-1, 1, 1024).astype(ml_dtypes.bfloat16),
], ids=["float32", "int8", "float16", "int64", "bfloat16"])
def test_offloaded_tensor_reads_back_exactly(array: np.ndarray) -> None:
    store = TensorStore()
    tensor = numpy_helper.from_array(array, "t")
    expected = numpy_helper.to_array(tensor)
    store.offload(tensor)
    assert uses_external_data(tensor) and not tensor.HasField("raw_data")
    np.testing.assert_array_equal(tensor_store.tensor_array(tensor), expected)
    assert tensor_store.tensor_array(tensor).dtype == expected.dtype
    tensor_store.inline(tensor)
    assert tensor.SerializeToString() == numpy_helper.from_array(array, "t").SerializeToString()
    store.close()


def _mlp() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w1, w2 = rng.standard_normal((16, 64)).astype(np.float32), rng.standard_normal((64, 8)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["y"])],
        "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
        initializer=[numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def test_store_backed_model_runs_saves_and_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sessions of a store-backed model compute what the in-memory model does; the model is written with
    its data streamed from the store (external data or inline by size), and read back into a store."""
    model = _mlp()
    x = np.random.default_rng(1).standard_normal((3, 16)).astype(np.float32)
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    monkeypatch.setattr(tensor_store, "LARGE_MODEL_BYTES", 100)
    store = TensorStore()
    held = store.hold(model)
    assert held is not model and tensor_store.store_of(held) is store and tensor_store.store_of(model) is None
    assert all(uses_external_data(t) for t in held.graph.initializer)
    assert model_io.serialized_size(held) >= 4 * (16 * 64 + 64 * 8) > held.ByteSize()
    np.testing.assert_array_equal(runtime.run(runtime.make_session(held), {"x": x})["y"], expected)

    model_io.save_model(held, tmp_path / "inline.onnx")  # small: one file, data inline
    assert not (tmp_path / "inline.onnx.data").exists()
    assert onnx.load(tmp_path / "inline.onnx").graph.initializer[0].raw_data == model.graph.initializer[0].raw_data
    monkeypatch.setattr(model_io, "EXTERNAL_DATA_THRESHOLD", 100)
    model_io.save_model(held, tmp_path / "ext.onnx")
    assert (tmp_path / "ext.onnx.data").stat().st_size == 4 * (16 * 64 + 64 * 8)
    assert tensor_store.store_of(held) is store  # saving left the model pointing at the store
    other = TensorStore()
    loaded = model_io.load_model(tmp_path / "ext.onnx", other)
    assert tensor_store.store_of(loaded) is other
    out = ort.InferenceSession(str(tmp_path / "ext.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(out, expected)
    assert tensor_store.inlined(loaded).graph.initializer[1].raw_data == model.graph.initializer[1].raw_data


def test_small_model_is_not_held_in_a_store() -> None:
    store = TensorStore()
    model = _mlp()
    assert store.hold(model) is model and not store.used
