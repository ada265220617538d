"""End to end: every test architecture quantized at W8A8 and W4A8, validated by onnxruntime."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from eptq_onnx import CalibOptions, ImageOptions, quantize
from models import zoo
from tests.helpers import init_only

ARCHITECTURES = zoo.ZOO
DEMO = Path(__file__).resolve().parents[1] / "models" / "demo"
# Output SQNR floors (dB) on random-weight models: W8A8 keeps the output within a few percent.
MIN_SQNR = {8: 25.0, 4: 8.0}


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_architecture_quantizes_and_validates(name: str, bits: int, tmp_path: Path, calib_for) -> None:
    model = ARCHITECTURES[name]()
    src = tmp_path / "in.onnx"
    onnx.save(model, src)
    out = tmp_path / "out.onnx"
    result = quantize(src, calib_for(model, 16), init_only(weight_bits=bits), output=out, progress=False)
    v = result.report.validation
    assert v["samples"] > 0
    for output, sqnr in v["output_sqnr_db"].items():
        assert sqnr >= MIN_SQNR[bits], f"{name} W{bits}A8 output {output}: {sqnr:.1f} dB"
    written = onnx.load(out)
    assert [i.name for i in written.graph.input] == [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    assert [o.name for o in written.graph.output] == [o.name for o in model.graph.output]
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    feeds = zoo.sample_inputs(model, 2, seed=5)
    for value, meta in zip(session.run(None, feeds), session.get_outputs()):
        assert np.all(np.isfinite(value)), meta.name
    kinds = {t.kind for t in result.report.tensors}
    assert kinds == {"weight", "activation"}
    # ort-cpu: 8-bit weights that onnxruntime fuses into a U8S8 GEMM take the 7-bit range (targets.integer_kernel_bits)
    assert all(t.bits in ({7, 8} if bits == 8 else {bits}) for t in result.report.tensors if t.kind == "weight")


def test_w8a8_residual_cnn_fuses_every_conv(tmp_path: Path, calib_for) -> None:
    model = zoo.residual_cnn()
    result = quantize(model, calib_for(model, 16), init_only(weight_bits=8), progress=False)
    v = result.report.validation
    convs = sum(1 for n in result.model.graph.node if n.op_type == "Conv")
    assert v["fused_op_types"].get("QLinearConv", 0) == convs > 0


def test_w4_weights_native_int4_and_smaller_file(tmp_path: Path, calib_for) -> None:
    model = zoo.residual_cnn()
    calib = calib_for(model, 16)
    sizes = {}
    for storage in ("native", "int8"):
        out = tmp_path / f"{storage}.onnx"
        quantize(model, calib, init_only(weight_bits=4, weight_storage=storage), output=out, progress=False)
        types = {t.data_type for t in onnx.load(out).graph.initializer if t.name.endswith("_quantized") and t.data_type != onnx.TensorProto.INT32}
        assert types == {onnx.TensorProto.INT4 if storage == "native" else onnx.TensorProto.INT8}
        sizes[storage] = out.stat().st_size
    assert sizes["native"] < sizes["int8"]


@pytest.mark.parametrize("method", ["minmax", "percentile", "mse"])
def test_calibration_methods_and_symmetric_activations(method: str, calib_for) -> None:
    model = zoo.residual_cnn()
    calib = calib_for(model, 16)
    result = quantize(model, calib, init_only(weight_bits=8, calib_method=method, act_symmetric=True), progress=False)
    zero_points = {t.zero_point for t in result.report.tensors if t.kind == "activation"}
    assert zero_points == {0}
    assert min(result.report.validation["output_sqnr_db"].values()) > MIN_SQNR[8]


def test_output_mse_weight_init_beats_minmax_and_weight_mse_at_4_bits() -> None:
    """On the demo model (trained on real digits), output-aware steps beat weight-space ones."""
    model = DEMO / "digits_resnet.onnx"
    sqnr = {
        m: min(quantize(model, DEMO / "calib", init_only(weight_bits=4, weight_init=m), progress=False)
               .report.validation["output_sqnr_db"].values())
        for m in ("minmax", "mse", "output-mse")
    }
    assert sqnr["output-mse"] > max(sqnr["minmax"], sqnr["mse"]) + 1.0


def test_report_json_lists_every_tensor(tmp_path: Path, calib_for) -> None:
    import json

    model = zoo.mlp()
    report_path = tmp_path / "report.json"
    quantize(model, calib_for(model, 8), init_only(weight_bits=8), report_path=report_path, progress=False)
    data = json.loads(report_path.read_text())
    names = {t["name"] for t in data["tensors"]}
    assert {t.name for t in model.graph.initializer if t.name.endswith("weight")} <= names
    for t in data["tensors"]:
        assert {"name", "op", "kind", "bits", "scale", "zero_point", "sqnr_db"} <= set(t)


def test_model_with_external_data_and_image_calibration(tmp_path: Path) -> None:
    """A model whose weights live in an external file, calibrated from PNG images."""
    from PIL import Image

    model = zoo.residual_cnn()
    src = tmp_path / "ext" / "model.onnx"
    src.parent.mkdir()
    onnx.save_model(model, src, save_as_external_data=True, location="weights.bin", size_threshold=0)
    assert (src.parent / "weights.bin").stat().st_size > 10_000
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(images / f"{i}.png")
    config = init_only(weight_bits=8, calib=CalibOptions(image=ImageOptions(size=(32, 32), mean=(0.5,), std=(0.25,))))
    result = quantize(src, images, config, output=tmp_path / "q.onnx", progress=False)
    assert result.report.calibration_samples == 6
    assert min(result.report.validation["output_sqnr_db"].values()) > MIN_SQNR[8]


def test_nothing_to_quantize_is_a_model_error(calib_for) -> None:
    from onnx import TensorProto, helper

    from eptq_onnx import ModelError

    graph = helper.make_graph([helper.make_node("Shape", ["ids"], ["s"])], "g",
                              [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 3])],
                              [helper.make_tensor_value_info("s", TensorProto.INT64, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    with pytest.raises(ModelError, match="no quantizable layer"):
        quantize(model, calib_for(model, 2), init_only(), progress=False)


def test_histogram_threads_leave_the_activation_scales_unchanged(monkeypatch, calib_for) -> None:
    from eptq_onnx.calib import calibrate

    model = zoo.residual_cnn()
    calib = calib_for(model, 8)
    reports = {}
    for threads in (1, 4):
        monkeypatch.setattr(calibrate, "HISTOGRAM_THREADS", threads)
        tensors = quantize(model, calib, init_only(weight_bits=8, measure_latency=False), progress=False).report.tensors
        reports[threads] = [(t.name, t.scale, t.zero_point) for t in tensors if t.kind == "activation"]
    assert reports[1] and reports[1] == reports[4]
