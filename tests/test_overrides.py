"""--overrides: per-tensor and per-node settings reach the written model (checked in the file itself)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from eptq_onnx import quantize
from eptq_onnx.cli import main
from eptq_onnx.config import OptimizeOptions, QuantConfig
from eptq_onnx.errors import UsageError
from eptq_onnx.plan.overrides import layer_weight_bits, parse_overrides
from models import zoo_analysis
from tests.helpers import init_only


def _inits(model: onnx.ModelProto) -> dict:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _quantized_inputs(model: onnx.ModelProto) -> set:
    return {n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}


@pytest.fixture(scope="module")
def mlp(tmp_path_factory: pytest.TempPathFactory) -> tuple[onnx.ModelProto, Path]:
    from models.calib_files import write_calib

    model = zoo_analysis.tiny_mlp()
    return model, write_calib(model, tmp_path_factory.mktemp("calib"), 16)


@pytest.mark.parametrize("data, message", [
    ({"x": {"bitz": 8}}, "unknown setting 'bitz'"),
    ({"x": {"quant_type": "QUInt9"}}, "quant_type 'QUInt9'"),
    ({"x": {"scale": 0.1}}, "needs both scale and zero_point"),
    ({"x": {"float": True, "bits": 8}}, "is float: it takes no other setting"),
    ({"x": {"rmin": 1.0, "rmax": 0.0}}, "rmin <= rmax"),
    ({"x": {"scale": -1.0, "zero_point": 0}}, "must be positive"),
    ({"x": 8}, "not an object of settings"),
])
def test_malformed_entries_are_usage_errors_naming_them(data, message) -> None:
    with pytest.raises(UsageError, match=message):
        parse_overrides(data)


def test_weight_bits_override_sets_that_weight_alone(mlp) -> None:
    model, calib = mlp
    result = quantize(model, calib, init_only(weight_bits=4, overrides={"w1": {"bits": 8}}), progress=False)
    codes = _inits(result.model)
    assert np.abs(codes["w1_quantized"]).max() > 7  # 8-bit codes (7-bit range on ort-cpu: at most 63)
    assert codes["w2_quantized"].min() >= -8 and codes["w2_quantized"].max() <= 7
    assert {"name": "w1", "applied_to": "weight", "bits": 8} in result.report.overrides


def test_layer_weight_bits_reads_weight_and_node_overrides() -> None:
    """The width a layer's placement is decided for (ort-cpu fuses 8-bit layers only): its weight's or
    its node's override, not an activation's."""
    overrides = parse_overrides({"w": {"bits": 8}, "conv2": {"bits": 3}, "x": {"bits": 16, "symmetric": True}})
    conv = onnx.helper.make_node("Conv", ["x", "w"], ["y"], name="conv1")
    assert layer_weight_bits(overrides, {"w", "v"}, conv, 4) == 8
    assert layer_weight_bits(overrides, {"w", "v"}, onnx.helper.make_node("Conv", ["x", "v"], ["z"], name="conv2"), 4) == 3
    assert layer_weight_bits(overrides, {"w", "v"}, onnx.helper.make_node("Conv", ["x", "v"], ["u"], name="conv3"), 4) == 4


def test_fixed_scale_and_range_are_written_and_never_learned(mlp) -> None:
    model, calib = mlp
    overrides = {"h1": {"scale": 0.05, "zero_point": 3}, "x": {"rmin": -1.28, "rmax": 1.27}}
    config = QuantConfig(weight_bits=8, overrides=overrides,
                         optimize=OptimizeOptions(iters=8, batch_size=8, learn_act_scales=True, weighting="uniform"))
    result = quantize(model, calib, config, progress=False)
    values = _inits(result.model)
    assert values["h1_scale"] == np.float32(0.05) and values["h1_zero_point"] == 3
    assert np.isclose(values["x_scale"], 0.01, rtol=1e-6) and values["x_zero_point"] == 128


def test_activation_coding_override_and_the_targets_types(mlp) -> None:
    model, calib = mlp
    result = quantize(model, calib, init_only(weight_bits=8, overrides={"relu1": {"quant_type": "QInt8"}}), progress=False)
    zp = next(t for t in result.model.graph.initializer if t.name == "h1_zero_point")
    assert zp.data_type == onnx.TensorProto.INT8 and numpy_helper.to_array(zp) == 0
    with pytest.raises(UsageError, match="--target trt does not read"):
        quantize(model, calib, init_only(weight_bits=8, target="trt", overrides={"h1": {"bits": 16}}), progress=False)
    wide = quantize(model, calib, init_only(weight_bits=8, target="generic", overrides={"h1": {"bits": 16}}),
                    progress=False)
    zp = next(t for t in wide.model.graph.initializer if t.name == "h1_zero_point")
    assert zp.data_type == onnx.TensorProto.UINT16 and "x" in _quantized_inputs(wide.model)
    x_zp = next(t for t in wide.model.graph.initializer if t.name == "x_zero_point")
    assert x_zp.data_type == onnx.TensorProto.UINT8


def test_float_override_keeps_the_producer_float(mlp) -> None:
    model, calib = mlp
    result = quantize(model, calib, init_only(weight_bits=8, overrides={"h1": {"float": True}}), progress=False)
    assert "h1" not in _quantized_inputs(result.model)
    assert any(e["node"] == "relu1" for e in result.report.excluded)


def test_cli_reads_the_file_and_names_a_wrong_name_in_one_line(mlp, tmp_path: Path) -> None:
    model, calib = mlp
    src, out = tmp_path / "m.onnx", tmp_path / "q.onnx"
    onnx.save(model, src)
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps({"w2": [{"bits": 8}]}))  # onnxruntime's list form
    bad.write_text(json.dumps({"no_such_tensor": {"bits": 8}}))
    args = [str(src), str(out), "--calib", str(calib), "--iters", "0", "-q"]
    result = CliRunner().invoke(main, [*args, "--overrides", str(good)])
    assert result.exit_code == 0 and out.exists(), result.output
    out.unlink()
    result = CliRunner().invoke(main, [*args, "--overrides", str(bad)])
    assert result.exit_code == 2 and not out.exists()
    assert "'no_such_tensor' is no weight or activation" in result.output and len(result.output.strip().splitlines()) == 1


def test_a_yaml_file_reads_as_its_json_twin(tmp_path: Path) -> None:
    from eptq_onnx.plan.overrides import read_overrides

    yml, js = tmp_path / "o.yaml", tmp_path / "o.json"
    yml.write_text("w1:\n  bits: 8\nh1: {scale: 0.05, zero_point: 0}\nfc2: {float: true}\n")
    js.write_text(json.dumps({"w1": {"bits": 8}, "h1": {"scale": 0.05, "zero_point": 0}, "fc2": {"float": True}}))
    assert read_overrides(yml) == read_overrides(js) and len(read_overrides(yml)) == 3
    (tmp_path / "bad.yml").write_text("w1: [bits: 8\n")
    with pytest.raises(UsageError, match="--overrides .*not valid YAML"):
        read_overrides(tmp_path / "bad.yml")
