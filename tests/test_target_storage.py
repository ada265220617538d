"""What is written for a target runs there with that runtime's defaults: 2-bit weights under
--target ort-cpu are INT4 containers of 2-bit codes (onnxruntime's QDQ fusions refuse INT2 with
default session options), which onnxruntime loads and runs as the fake-quant reference computes;
--target generic keeps native INT2."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper

from eptq_onnx import quantize
from eptq_onnx.export.reference import fake_quant_model
from eptq_onnx.export.validate import INT2_FUSION_OFF
from models import zoo
from tests.helpers import init_only
from models.calib_files import write_calib

MIN_REFERENCE_DB = 30.0  # QDQ model under onnxruntime's defaults vs its fake-quant reference


def _session(model: onnx.ModelProto, config: dict | None = None) -> ort.InferenceSession:
    """onnxruntime's default session options (plus ``config`` entries)."""
    options = ort.SessionOptions()
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _sqnr(ref: np.ndarray, got: np.ndarray) -> float:
    ref = ref.astype(np.float64)
    return float(10 * np.log10(np.sum(ref**2) / max(np.sum((ref - got) ** 2), 1e-30)))


def _weight_types(model: onnx.ModelProto) -> set[int]:
    return {t.data_type for t in model.graph.initializer if t.name.endswith("_quantized") and t.data_type != TensorProto.INT32}


@pytest.fixture(scope="module")
def calib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_calib(zoo.residual_cnn(), tmp_path_factory.mktemp("calib"), 16)


@pytest.mark.parametrize("target,storage", [("ort-cpu", TensorProto.INT4), ("generic", TensorProto.INT2)])
def test_two_bit_weights_run_with_the_targets_defaults(target: str, storage: int, calib: Path) -> None:
    model = zoo.residual_cnn()
    result = quantize(model, calib, init_only(weight_bits=2, target=target), progress=False)
    written, state = result.model, result.state
    assert _weight_types(written) == {storage}
    for t in written.graph.initializer:
        if t.data_type == storage and t.name.endswith("_quantized"):
            codes = numpy_helper.to_array(t).astype(np.int32)
            assert codes.min() >= -2 and codes.max() <= 1, t.name  # 2-bit codes, whatever the container
    config = INT2_FUSION_OFF if storage == TensorProto.INT2 else {}
    assert result.report.validation["qdq_fusion_disabled"] == bool(config)
    session = _session(written, config)  # ort-cpu: onnxruntime's defaults, nothing else
    reference = fake_quant_model(state.float_model, state.plan, state.weights, state.acts,
                                 state.config.quantize_outputs, state.config.quantize_bias)
    feeds = zoo.sample_inputs(model, 8, seed=5)
    got = session.run(None, feeds)[0]
    want = _session(reference).run(None, feeds)[0]
    assert _sqnr(want, got) > MIN_REFERENCE_DB
