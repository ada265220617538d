"""Large models: external data in, external data out, through the whole pipeline.

The default test lowers the size limits so that a small model takes the paths a model over
2 GB takes (checker from a file, onnxruntime from a file, output written with external data).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx.external_data_helper import uses_external_data

from eptq_onnx import quantize

from eptq_onnx.graph import model_io

from eptq_onnx.graph import runtime

from eptq_onnx.graph import tensor_store

from eptq_onnx.export import validate
from eptq_onnx import QuantConfig
from eptq_onnx.config import OptimizeOptions
from models import zoo, zoo_large
from tests.helpers import init_only


def _run(path: Path, feeds: dict) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


@pytest.mark.parametrize("in_store", [False, True], ids=["in-memory", "tensor-store"])
def test_over_the_limit_paths_round_trip_external_data(tmp_path: Path, calib_for, monkeypatch: pytest.MonkeyPatch,
                                                       in_store: bool) -> None:
    """With lowered limits a small model takes a big model's paths; ``in_store``: also the
    tensor store's (weights on disk, onnxruntime reading them from there). Same model as without."""
    model = zoo.residual_cnn()
    source = tmp_path / "in" / "model.onnx"
    source.parent.mkdir()
    onnx.save_model(model, source, save_as_external_data=True, location="model.weights", size_threshold=0)
    calib = calib_for(model, 8)
    expected = quantize(source, calib, init_only(), output=tmp_path / "small.onnx", progress=False)
    assert expected.store is None

    limits = [(model_io, "EXTERNAL_DATA_THRESHOLD"), (runtime, "PROTOBUF_LIMIT"), (validate, "PROTOBUF_LIMIT"),
              (model_io, "EXTERNAL_TENSOR_MIN_BYTES")]
    if in_store:
        limits += [(tensor_store, "LARGE_MODEL_BYTES"), (tensor_store, "MIN_TENSOR_BYTES")]
    for module, name in limits:
        monkeypatch.setattr(module, name, 100)
    out = tmp_path / "out" / "model_q.onnx"
    out.parent.mkdir()
    result = quantize(source, calib, init_only(), output=out, progress=False)

    assert sorted(p.name for p in out.parent.iterdir()) == ["model_q.onnx", "model_q.onnx.data"]
    written = onnx.load(out, load_external_data=False)
    assert any(uses_external_data(t) for t in written.graph.initializer)
    assert (result.store is not None) == in_store
    if in_store:
        assert any(uses_external_data(t) for t in result.model.graph.initializer)
        assert all(uses_external_data(t) for t in result.state.float_model.graph.initializer if len(t.dims) == 4)
    held = tensor_store.inlined(result.model)
    assert held.SerializeToString() == expected.model.SerializeToString()
    feeds = zoo.sample_inputs(model, 3, seed=5)
    np.testing.assert_array_equal(_run(out, feeds), _run(tmp_path / "small.onnx", feeds))


def test_tensor_store_model_runs_eptq_like_in_memory(tmp_path: Path, calib_for, monkeypatch: pytest.MonkeyPatch) -> None:
    """EPTQ (the torch twin) on a store-backed model: its weights come into memory for the twin; same model."""
    model = zoo.mlp()
    calib = calib_for(model, 8)
    config = QuantConfig(optimize=OptimizeOptions(iters=3, hessian_samples=2, hessian_draws=2, batch_size=4,
                                                  discard_if_worse=False))
    expected = quantize(model, calib, config, progress=False)
    for name in ("LARGE_MODEL_BYTES", "MIN_TENSOR_BYTES"):
        monkeypatch.setattr(tensor_store, name, 100)
    result = quantize(model, calib, config, progress=False)
    assert result.store is not None and result.report.optimization["iters"] == 3
    assert tensor_store.inlined(result.model).SerializeToString() == expected.model.SerializeToString()


def _transposed_weight_model() -> onnx.ModelProto:
    """x [N,16] @ Transpose(W) -> Relu: Transpose(W) computes from a constant only (folding removes it)."""
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((16, 16)).astype(np.float32), "w")
    nodes = [helper.make_node("Transpose", ["w"], ["wt"], name="transpose_w"),
             helper.make_node("MatMul", ["x", "wt"], ["m"], name="matmul"), helper.make_node("Relu", ["m"], ["y"], name="relu")]
    graph = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])], initializer=[w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


@pytest.mark.parametrize("in_store", [False, True], ids=["in-memory", "tensor-store"])
def test_constants_left_unfolded_in_the_store_path_are_reported(calib_for, monkeypatch: pytest.MonkeyPatch,
                                                                in_store: bool) -> None:
    """A large model's constant subgraphs that read a stored weight are not folded: the report says so."""
    model = _transposed_weight_model()
    calib = calib_for(model, 4)
    if in_store:
        for name in ("LARGE_MODEL_BYTES", "MIN_TENSOR_BYTES"):
            monkeypatch.setattr(tensor_store, name, 100)
    result = quantize(model, calib, init_only(), progress=False)
    notes = [w for w in result.report.warnings if "not folded" in w]
    if in_store:
        assert len(notes) == 1 and "transpose_w" in notes[0]
    else:
        assert notes == [] and all(n.op_type != "Transpose" for n in result.state.float_model.graph.node)


@pytest.mark.slow
def test_model_over_2gb_is_read_quantized_and_written(tmp_path: Path) -> None:
    """A model with more than 2 GB of weights (external data): quantized W8, written, run by onnxruntime.

    Weight steps by the weight's own MSE (``output-mse`` gives the same memory, ~4x the time here).
    Peak memory: see docs/BENCHMARKS_SCALE.md (tools/bench_scale.py --big)."""
    source = zoo_large.matmul_chain(tmp_path)
    assert (tmp_path / "big.onnx.data").stat().st_size > 2**31
    calib = tmp_path / "calib"
    calib.mkdir()
    for i in range(2):
        np.save(calib / f"{i}.npy", np.random.default_rng(i).standard_normal(4096).astype(np.float32))
    out = tmp_path / "out" / "big_w8.onnx"
    out.parent.mkdir()
    result = quantize(source, calib, init_only(weight_bits=8, weight_init="mse", validation_samples=2), output=out,
                      progress=False)
    assert result.store is not None
    assert len(result.report.validation["output_sqnr_db"]) == 1
    assert min(result.report.validation["output_sqnr_db"].values()) > 20
    written = onnx.load(out, load_external_data=False)
    assert sorted(t.data_type for t in written.graph.initializer if t.name.endswith("_quantized")) == [onnx.TensorProto.INT8] * 9
    feeds = {"x": np.random.default_rng(9).standard_normal((1, 4096)).astype(np.float32)}
    assert np.isfinite(_run(out, feeds)).all()
