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

from eptq_onnx import model_io, quantize, runtime, validate
from models import zoo
from tests.helpers import init_only


def _run(path: Path, feeds: dict) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def test_over_the_limit_paths_round_trip_external_data(tmp_path: Path, calib_for, monkeypatch: pytest.MonkeyPatch) -> None:
    model = zoo.residual_cnn()
    source = tmp_path / "in" / "model.onnx"
    source.parent.mkdir()
    onnx.save_model(model, source, save_as_external_data=True, location="model.weights", size_threshold=0)
    calib = calib_for(model, 8)
    expected = quantize(source, calib, init_only(), output=tmp_path / "small.onnx", progress=False)

    for module, name in ((model_io, "EXTERNAL_DATA_THRESHOLD"), (runtime, "PROTOBUF_LIMIT"), (validate, "PROTOBUF_LIMIT"),
                         (model_io, "EXTERNAL_TENSOR_MIN_BYTES")):
        monkeypatch.setattr(module, name, 100)
    out = tmp_path / "out" / "model_q.onnx"
    out.parent.mkdir()
    result = quantize(source, calib, init_only(), output=out, progress=False)

    assert sorted(p.name for p in out.parent.iterdir()) == ["model_q.onnx", "model_q.onnx.data"]
    written = onnx.load(out, load_external_data=False)
    assert any(uses_external_data(t) for t in written.graph.initializer)
    assert result.model.SerializeToString() == expected.model.SerializeToString()
    feeds = zoo.sample_inputs(model, 3, seed=5)
    np.testing.assert_array_equal(_run(out, feeds), _run(tmp_path / "small.onnx", feeds))
