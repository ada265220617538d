"""--report is written on every exit after the model was read, and says why; disagreements are traced to their first op."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from eptq_onnx import pipeline, quantize
from eptq_onnx.calib.data import CalibrationSet
from eptq_onnx.calib.specs import input_specs
from eptq_onnx.cli import main
from eptq_onnx.export.divergence import diagnose_optimization
from eptq_onnx.export.validate import MIN_AGREEMENT_DB, validate
from models import zoo
from tests.helpers import init_only
from models.calib_files import write_calib
from tests.test_error_catalogue import calib_folder, corrupt_first_activation_scale, mlp


def _cli(tmp_path: Path, calib: Path, *extra: str):
    model = tmp_path / "mlp.onnx"
    onnx.save(mlp(), model)
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    result = CliRunner().invoke(main, [str(model), str(out), "--calib", str(calib), "--report", str(report),
                                       "--iters", "0", "-q", *extra])
    return result, out, report


def _stages(report: dict) -> dict:
    return {s["name"]: s["status"] for s in report["stages"]}


def test_calibration_error_leaves_a_report(tmp_path: Path) -> None:
    calib = calib_folder(tmp_path / "calib")
    np.save(calib / "bad.npy", np.zeros(7, np.float32))  # not the model's [N, 8]
    result, out, report_path = _cli(tmp_path, calib)
    assert result.exit_code == 4, result.output
    assert not out.exists()
    report = json.loads(report_path.read_text())
    assert report["error"]["code"] == 4 and report["error"]["category"] == "CalibrationError"
    assert report["error"]["stage"] == "calibration data" and "bad.npy" in report["error"]["message"]
    assert _stages(report) == {"load": "ok", "normalize": "ok", "quantization points": "ok", "calibration data": "failed"}
    assert report["output"] is None
    assert str(report_path) in result.output.strip().splitlines()[-1]  # the error line points at the report


def test_validation_error_leaves_a_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The written model's first activation dequantizes to infinity: exit 5, no model, a report that names the tensor."""
    real_write = pipeline.write_qdq
    corrupted = []

    def write_broken(*args, **kwargs):
        model, summary = real_write(*args, **kwargs)
        corrupted.append(corrupt_first_activation_scale(model, np.inf))
        return model, summary

    monkeypatch.setattr(pipeline, "write_qdq", write_broken)
    result, out, report_path = _cli(tmp_path, calib_folder(tmp_path / "calib"))
    assert result.exit_code == 5, result.output
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))
    report = json.loads(report_path.read_text())
    assert report["error"]["code"] == 5 and report["error"]["stage"] == "validate"
    assert _stages(report)["validate"] == "failed" and _stages(report)["write"] == "ok"
    first = report["validation"]["first_difference"]["qdq_vs_reference"]
    made_by = {"x": "input", "h": "MatMul", "r": "Relu"}  # mlp: x -> MatMul -> h -> Relu -> r -> MatMul -> y
    assert first["tensor"] == corrupted[0] and first["op_type"] == made_by[corrupted[0]]
    assert report["validation"]["output_sqnr_db"]  # measured before the check failed
    assert report["tensors"]  # the quantizers are reported too


def test_success_report_lists_stages_and_no_error(tmp_path: Path) -> None:
    result, out, report_path = _cli(tmp_path, calib_folder(tmp_path / "calib"))
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    assert report["error"] is None and all(s["status"] == "ok" for s in report["stages"])
    assert set(report["timings_s"]) == {s["name"] for s in report["stages"]}


@pytest.fixture(scope="module")
def bias_overflow(tmp_path_factory: pytest.TempPathFactory):
    """A W8A8 residual CNN whose first Conv's int32 bias codes sit just below the int32 maximum.

    onnxruntime's fused QLinearConv adds them to its int32 accumulators, which wrap around; the
    unoptimized DequantizeLinear -> Conv computes in float: the two runs part at that Conv.
    """
    model = zoo.residual_cnn()
    calib_dir = write_calib(model, tmp_path_factory.mktemp("calib"), 8)
    result = quantize(model, calib_dir, init_only(weight_bits=8), progress=False)
    qdq = onnx.ModelProto()
    qdq.CopyFrom(result.model)
    inits = {t.name: t for t in qdq.graph.initializer}
    dq = next(n for n in qdq.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
              and inits[n.input[0]].data_type == onnx.TensorProto.INT32)
    conv = next(n for n in qdq.graph.node if n.op_type == "Conv" and dq.output[0] in n.input)
    bias = numpy_helper.to_array(inits[dq.input[0]])
    inits[dq.input[0]].CopyFrom(numpy_helper.from_array(np.full_like(bias, 2**31 - 1000), dq.input[0]))
    calib = CalibrationSet(calib_dir, input_specs(result.state.float_model), result.state.config.calib)
    return result, qdq, calib, conv


def _after(model: onnx.ModelProto, conv: onnx.NodeProto) -> onnx.NodeProto:
    """The node that reads the Conv's output (its Relu, the first quantized tensor after the Conv)."""
    return next(n for n in model.graph.node if conv.output[0] in n.input)


def test_optimization_disagreement_is_traced_to_its_first_op(bias_overflow) -> None:
    _, qdq, calib, conv = bias_overflow
    relu = _after(qdq, conv)
    first = diagnose_optimization(qdq, calib, MIN_AGREEMENT_DB, {})
    assert first is not None
    assert (first.tensor, first.op_type, first.node) == (relu.output[0], "Relu", relu.name)
    assert first.optimized_op.startswith("QLinearConv")  # through the layout Transpose onnxruntime adds
    assert first.sqnr_db < MIN_AGREEMENT_DB and first.max_abs_difference > 0


def test_optimization_disagreement_warning_names_the_first_op(bias_overflow) -> None:
    result, qdq, calib, conv = bias_overflow
    state = result.state
    v = validate(state.float_model, qdq, state.plan, calib, 8, progress=False)
    notes = [n for n in v.notes if n.startswith("VALIDATION:")]
    relu = _after(qdq, conv)
    assert notes and all(f"first differ at tensor {relu.output[0]!r}" in n for n in notes)
    assert v.first_difference["optimized_vs_unoptimized"]["node"] == relu.name


def test_clean_model_has_no_first_difference(bias_overflow) -> None:
    result, _, calib, _ = bias_overflow
    assert diagnose_optimization(result.model, calib, MIN_AGREEMENT_DB, {}) is None


@pytest.mark.parametrize("optimized_db, input_db, warned", [
    (6.5, 25.0, True),  # the optimized run is less faithful than the QDQ ops as written
    (7.9, 25.0, False),  # as faithful, and the first differing op inherits its inputs' difference: rounding
    (8.1, None, False),
    (8.1, float("inf"), True),  # its inputs agree exactly: that op computes differently by itself
])
def test_disagreement_is_a_warning_where_a_kernel_computes_differently(
        bias_overflow, monkeypatch: pytest.MonkeyPatch, optimized_db: float, input_db, warned: bool) -> None:
    """Optimized and unoptimized runs 12 dB apart, the unoptimized one 8 dB from the float model (a model
    that grows rounding differences as it grows quantization noise): a note, or a VALIDATION warning where
    the optimized run loses fidelity or the first op that differs does so with inputs that agree."""
    from eptq_onnx.export import validate as validation
    from eptq_onnx.export.divergence import FirstDifference

    _, qdq, calib, _ = bias_overflow
    first = None if input_db is None else FirstDifference("t", "Mul", "m", 18.0, 1.0, input_sqnr_db=input_db)
    monkeypatch.setattr(validation, "diagnose_optimization", lambda *args: first)
    v = validation.Validation(output_sqnr_db={"y": optimized_db}, unoptimized_output_sqnr_db={"y": 8.0},
                              optimized_agreement_db={"y": 12.0})
    validation._note_disagreement(qdq, calib, {}, ["y"], v)
    assert len(v.notes) == 1 and v.notes[0].startswith("VALIDATION:") == warned
    assert "disagree (SQNR 12.0 dB" in v.notes[0]


def _acc(db: float):
    from eptq_onnx.export.divergence import Accumulator

    return Accumulator(signal=1.0, noise=10 ** (-db / 10), max_abs=0.1)


@pytest.mark.parametrize("input_db, error", [(float("inf"), True), (45.0, True), (35.0, False)])
def test_reference_departure_is_an_error_only_where_an_op_departs_by_itself(input_db: float, error: bool) -> None:
    """mlp: x -> MatMul -> Relu -> r (quantized) -> MatMul -> y; r first below 30 dB from its reference.
    With x agreeing, r's ops are written wrong (exit 5); with x already 35 dB apart, r inherits (a warning)."""
    from eptq_onnx.errors import ValidationError
    from eptq_onnx.export.validate import Validation, _check_divergence

    divergence = {"x": _acc(input_db), "r": _acc(25.0), "y": _acc(20.0)}
    v = Validation()
    if error:
        with pytest.raises(ValidationError, match="first at tensor 'r' .*output of Relu node"):
            _check_divergence(divergence, ["x", "r", "y"], mlp(), v)
    else:
        _check_divergence(divergence, ["x", "r", "y"], mlp(), v)
        assert len(v.notes) == 1 and v.notes[0].startswith("VALIDATION:") and "tensor 'r'" in v.notes[0]
    assert v.first_difference["qdq_vs_reference"]["input_sqnr_db"] == pytest.approx(input_db)
