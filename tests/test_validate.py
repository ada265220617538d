"""Validation failures are errors that name the first tensor where the written model goes wrong."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from eptq_onnx import quantize
from eptq_onnx.calib.data import CalibrationSet
from eptq_onnx.calib.specs import input_specs
from eptq_onnx.errors import ValidationError
from eptq_onnx.export.reference import fake_quant_model, fake_quant_name
from eptq_onnx.export.validate import validate
from models import zoo
from tests.helpers import init_only


@pytest.fixture(scope="module")
def quantized(tmp_path_factory: pytest.TempPathFactory):
    """The residual CNN quantized W4A8 (no optimization), its calibration set and fake-quant reference."""
    from models.calib_files import write_calib

    model = zoo.residual_cnn()
    calib_dir = write_calib(model, tmp_path_factory.mktemp("calib"), 8)
    result = quantize(model, calib_dir, init_only(), progress=False)
    state = result.state
    calib = CalibrationSet(calib_dir, input_specs(state.float_model), state.config.calib)
    reference = fake_quant_model(state.float_model, state.plan, state.weights, state.acts)
    return result, calib, reference


def _validate(result, calib, reference, qdq: onnx.ModelProto) -> None:
    state = result.state
    validate(state.float_model, qdq, state.plan, calib, 8, progress=False, reference=reference)


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def test_written_model_matches_its_fake_quant_reference(quantized) -> None:
    result, calib, reference = quantized
    _validate(result, calib, reference, result.model)  # no error


def test_fake_quant_reference_matches_numpy(quantized) -> None:
    """The reference's quantized model input is the numpy fake-quant of the input."""
    result, calib, reference = quantized
    state = result.state
    name = state.float_model.graph.input[0].name
    group = next(g for g in state.plan.groups if name in g.tensors)
    p = state.acts[group.id]
    feeds = next(iter(calib.batches()))
    session = ort.InferenceSession(_with_output(reference, fake_quant_name(name)).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    got = session.run([fake_quant_name(name)], feeds)[0]
    x = feeds[name].astype(np.float32)
    qmin, qmax = p.qrange
    expected = (np.clip(np.rint(x / np.float32(p.scale)) + p.zero_point, qmin, qmax) - p.zero_point) * np.float32(p.scale)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def _with_output(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    out = _copy(model)
    out.graph.output.append(onnx.ValueInfoProto(name=name))
    return out


@pytest.mark.parametrize("position", [0, 3, -1])
def test_corrupted_scale_names_the_first_diverging_tensor(quantized, position: int) -> None:
    """A DequantizeLinear reading a wrong scale: the error names its tensor, not a later one."""
    result, calib, reference = quantized
    qdq = _copy(result.model)
    quantized_tensors = {n.output[0] for n in qdq.graph.node if n.op_type == "QuantizeLinear"}
    dqs = [n for n in qdq.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in quantized_tensors]
    dq = dqs[position]
    tensor = dq.input[0].removesuffix("_QuantizeLinear_Output")
    scale = next(t for t in qdq.graph.initializer if t.name == dq.input[1])
    qdq.graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(scale) * 3, "corrupt_scale"))
    dq.input[1] = "corrupt_scale"
    with pytest.raises(ValidationError, match=f"first at tensor '{tensor}'"):
        _validate(result, calib, reference, qdq)


def test_corrupted_weight_codes_name_the_layer_output(quantized) -> None:
    """Flipped weight codes of the first Conv: the first diverging tensor is that Conv's output point."""
    result, calib, reference = quantized
    qdq = _copy(result.model)
    state = result.state
    point = state.plan.weights[0]
    codes = next(t for t in qdq.graph.initializer if t.name == f"{point.weight}_quantized")
    stored = numpy_helper.to_array(codes)
    flipped = np.clip(-stored.astype(np.int8), -7, 7).astype(stored.dtype)  # int4 storage: stay in range
    codes.CopyFrom(numpy_helper.from_array(flipped, codes.name))
    conv = next(n for n in state.float_model.graph.node if (n.name or n.output[0]) == point.node)
    group = state.plan.group_of()
    first = next(t for t in _downstream(state.float_model, conv.output[0]) if t in group)
    with pytest.raises(ValidationError, match=f"first at tensor '{first}'"):
        _validate(result, calib, reference, qdq)


def _downstream(model: onnx.ModelProto, start: str) -> list[str]:
    """Tensors computed from ``start`` (itself first), in graph order."""
    reached, order = {start}, [start]
    for node in model.graph.node:
        if any(i in reached for i in node.input):
            reached.update(node.output)
            order.extend(node.output)
    return order


def test_onnxruntime_cannot_load_is_a_validation_error(quantized) -> None:
    result, calib, reference = quantized
    qdq = _copy(result.model)
    dq = next(n for n in qdq.graph.node if n.op_type == "DequantizeLinear")
    dq.op_type = "DequantizeLinearX"  # passes nothing at run time: onnxruntime has no such op
    dq.domain = "com.example"
    qdq.opset_import.append(onnx.helper.make_opsetid("com.example", 1))
    with pytest.raises(ValidationError, match="onnxruntime cannot load the quantized model"):
        _validate(result, calib, reference, qdq)


@pytest.mark.parametrize("in_store", [False, True], ids=["in-memory", "tensor-store"])
def test_pipeline_validation_error_writes_nothing(tmp_path: Path, calib_for, monkeypatch: pytest.MonkeyPatch,
                                                  in_store: bool) -> None:
    """In a tensor store (large models) the reference is compared in a second pass: found all the same."""
    from eptq_onnx import pipeline
    from eptq_onnx.graph import tensor_store
    from tests.test_error_catalogue import corrupt_first_activation_scale

    if in_store:
        for name in ("LARGE_MODEL_BYTES", "MIN_TENSOR_BYTES"):
            monkeypatch.setattr(tensor_store, name, 100)

    real_write = pipeline.write_qdq

    def corrupted(*args, **kwargs):
        model, summary = real_write(*args, **kwargs)
        corrupt_first_activation_scale(model)
        return model, summary

    monkeypatch.setattr(pipeline, "write_qdq", corrupted)
    model = zoo.mlp()
    with pytest.raises(ValidationError, match="diverges from its fake-quant reference"):
        quantize(model, calib_for(model, 8), init_only(), output=tmp_path / "out.onnx", report_path=tmp_path / "r.json",
                 progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib", "r.json"]  # the report says why; no model
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["error"]["code"] == 5 and report["error"]["stage"] == "validate"
    assert report["validation"]["first_difference"]["qdq_vs_reference"]["op_type"] != "?"


def test_outputs_on_every_sample_tensor_diagnostics_on_a_byte_budget(quantized, monkeypatch) -> None:
    """Past the tapped-bytes budget only the outputs are compared: output SQNR over all samples equals
    a direct onnxruntime computation; the per-tensor diagnostics ran on TAPPED_MIN_SAMPLES."""
    from eptq_onnx.export import validate as validation
    from eptq_onnx.init.quantizers import sqnr_db

    result, calib, reference = quantized
    state = result.state
    monkeypatch.setattr(validation, "TAPPED_VALIDATION_BYTES", 1)
    one_by_one = CalibrationSet(calib._folder, input_specs(state.float_model), replace(state.config.calib, batch_size=1))
    measured = validate(state.float_model, result.model, state.plan, one_by_one, 8, progress=False, reference=reference)
    assert (measured.samples, measured.tapped_samples) == (8, validation.TAPPED_MIN_SAMPLES)
    float_sess = ort.InferenceSession(state.float_model.SerializeToString(), providers=["CPUExecutionProvider"])
    qdq_sess = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
    name = state.float_model.graph.output[0].name
    feeds = [f for f in one_by_one.batches(1, limit=8)]
    ref = np.concatenate([float_sess.run([name], f)[0] for f in feeds])
    got = np.concatenate([qdq_sess.run([name], f)[0] for f in feeds])
    assert measured.output_sqnr_db[name] == pytest.approx(sqnr_db(ref, got), abs=0.05)
    full = validate(state.float_model, result.model, state.plan, calib, 8, progress=False, reference=reference)
    assert full.tapped_samples == 8 and full.output_sqnr_db[name] == pytest.approx(measured.output_sqnr_db[name], abs=1e-3)
