"""16-bit activations where one 8-bit grid loses a layer's input (calib/wide_acts.py, --act16-below).

spread_stem_cnn's HardSwish -> depthwise Conv is what equalization (test_equalize.py) takes first: these
tests run without it, as the widening finds such points where no factor passes (a shared input, a Clip)."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from eptq_onnx import quantize
from eptq_onnx.calib.layer_inputs import collect_layer_inputs
from eptq_onnx.calib.memory import open_calibration
from eptq_onnx.calib.specs import input_specs
from eptq_onnx.calib.wide_acts import WideningCheck, layer_output_sqnr
from eptq_onnx.config import CalibOptions, QuantConfig
from eptq_onnx.errors import UsageError
from eptq_onnx.init.quantizers import params_for_range, sqnr_db
from eptq_onnx.plan.qpoints import build_plan
from models import zoo_analysis
from tests.helpers import init_only


def _depthwise(weight: np.ndarray, qdq: tuple | None = None) -> onnx.ModelProto:
    """x[2,4,6,6] -> (QuantizeLinear/DequantizeLinear with (scale, zero point)) -> depthwise Conv 3x3, pads 1."""
    inits = [numpy_helper.from_array(weight, "w")]
    nodes, src = [], "x"
    if qdq is not None:
        inits += [numpy_helper.from_array(np.float32(qdq[0]), "s"), numpy_helper.from_array(np.uint8(qdq[1]), "z")]
        nodes += [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
                  helper.make_node("DequantizeLinear", ["q", "s", "z"], ["xq"])]
        src = "xq"
    nodes.append(helper.make_node("Conv", [src, "w"], ["y"], name="dw", pads=[1, 1, 1, 1], group=4))
    graph = helper.make_graph(nodes, "dw", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, 6, 6])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def test_layer_output_sqnr_is_what_onnxruntime_computes() -> None:
    """With every im2col row sampled (2 x 36 positions < 512), the rows-based SQNR of the layer's output is
    the SQNR onnxruntime gives between the float Conv and the Conv behind a QuantizeLinear/DequantizeLinear."""
    rng = np.random.default_rng(0)
    x = (rng.normal(0, 1, (2, 4, 6, 6)) * np.array([0.05, 1, 3, 10])[None, :, None, None]).astype(np.float32)
    w = (rng.normal(0, 1, (4, 1, 3, 3)) / np.array([0.05, 1, 3, 10])[:, None, None, None]).astype(np.float32)
    params = params_for_range(float(x.min()), float(x.max()), 8, False)
    model = _depthwise(w)
    calib = open_calibration([{"x": x}], input_specs(model), CalibOptions(batch_size=2))
    rows = collect_layer_inputs(model, build_plan(model), calib)["w"]
    assert rows.shape == (72, 4, 9)
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    expected = sqnr_db(run(model), run(_depthwise(w, (params.scale, params.zero_point))))
    assert layer_output_sqnr(rows, w, 0, params) == pytest.approx(expected, abs=1e-3)
    assert expected < 25.0  # the small channel's rounding, amplified by its filter, dominates
    wide = params_for_range(float(x.min()), float(x.max()), 16, False)
    assert layer_output_sqnr(rows, w, 0, wide) > expected + 40.0


def _feeds(model: onnx.ModelProto, n: int, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(0, 1, (1, 3, 12, 12)).astype(np.float32)} for _ in range(n)]


def _output_sqnr(float_model: onnx.ModelProto, qdq: onnx.ModelProto, feeds: list, optimized: bool = True) -> float:
    """Output SQNR in onnxruntime (default graph optimizations, or none: ONNX's semantics as written)."""
    options = ort.SessionOptions()
    if not optimized:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    run = lambda m: np.concatenate([ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"])
                                    .run(None, f)[0] for f in feeds])
    return sqnr_db(run(float_model), run(qdq))


def test_a_point_whose_8bit_grid_loses_its_layer_takes_16_bits_with_the_point_in_front_of_it() -> None:
    """spread_stem_cnn (stem channels 0.02x-20x apart, a HardSwish, a depthwise Conv amplifying the small
    channels): the HardSwish output and the stem's Conv output in front of it (onnxruntime's placement)
    take 16 bits, the model is raised to opset 21 and runs in onnxruntime with default options, and its
    output is far closer to the float model than with --act16-below 0. (Its depthwise output sits at
    25.1 dB on the 8-bit grid: the test asks for 30.)"""
    model = zoo_analysis.spread_stem_cnn()
    calib, test = _feeds(model, 24), _feeds(model, 8, seed=1)
    wide = quantize(model, calib, init_only(weight_bits=8, act16_below=30.0, equalize=False), progress=False)
    narrow = quantize(model, calib, init_only(weight_bits=8, act16_below=0.0, equalize=False), progress=False)
    [point] = wide.report.wide_activations
    assert point["tensor"] == "h1" and point["layer"] == "dw" and point["fused"] == ["c1"], point
    assert point["db_8"] < 30.0 and point["db_16"] > point["db_8"] + 20.0
    assert any(w.startswith("WIDE: ") and "opset raised to 21" in w for w in wide.report.warnings)
    inits = {t.name: t for t in wide.model.graph.initializer}
    coded = {n.input[0]: inits[n.input[2]].data_type for n in wide.model.graph.node if n.op_type == "QuantizeLinear"}
    assert coded["h1"] == coded["c1"] == TensorProto.UINT16 and coded["x"] == TensorProto.UINT8, coded
    assert wide.report.opset == 21 and narrow.report.opset < 21 and not narrow.report.wide_activations
    narrow_inits = {t.name: t for t in narrow.model.graph.initializer}
    assert {narrow_inits[n.input[2]].data_type for n in narrow.model.graph.node
            if n.op_type == "QuantizeLinear"} == {TensorProto.UINT8}
    gained = _output_sqnr(model, wide.model, test) - _output_sqnr(model, narrow.model, test)
    assert gained > 10.0, gained
    check = wide.report.wide_output_sqnr_db
    assert check["samples"] == 16 and check["16-bit"] > check["8-bit"] + 10.0, check


def test_a_widening_that_lowers_the_output_sqnr_is_not_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    """Layers judged alone can mislead (errors that cancelled at the outputs): the output check decides."""
    model = zoo_analysis.spread_stem_cnn()
    monkeypatch.setattr(WideningCheck, "output_sqnr", lambda self, *args: (20.0, 19.5))
    result = quantize(model, _feeds(model, 24), init_only(weight_bits=8, act16_below=30.0, equalize=False), progress=False)
    assert not result.report.wide_activations and result.report.opset < 21
    assert any("lower the model's output SQNR" in w and "(19.5 vs 20.0 dB" in w for w in result.report.warnings)
    inits = {t.name: t for t in result.model.graph.initializer}
    assert {inits[n.input[2]].data_type for n in result.model.graph.node
            if n.op_type == "QuantizeLinear"} == {TensorProto.UINT8}


def test_a_target_without_16bit_activations_keeps_8_bits_and_says_so() -> None:
    model = zoo_analysis.spread_stem_cnn()
    result = quantize(model, _feeds(model, 16), init_only(weight_bits=8, target="trt", act16_below=30.0, equalize=False), progress=False)
    assert not result.report.wide_activations
    assert any("--target trt reads no 16-bit activations, so they stay at 8 bits" in w for w in result.report.warnings)


def test_user_set_points_are_not_widened(tmp_path) -> None:
    """An --overrides entry decides its point: h1 set to 8 bits stays there, so nothing widens (c1 is widened
    only with the point its HardSwish feeds)."""
    model = zoo_analysis.spread_stem_cnn()
    overrides = tmp_path / "o.json"
    overrides.write_text('{"h1": {"bits": 8}}')
    from eptq_onnx.plan.overrides import read_overrides
    result = quantize(model, _feeds(model, 16), init_only(weight_bits=8, overrides=read_overrides(overrides),
                                                          act16_below=30.0, equalize=False), progress=False)
    assert not result.report.wide_activations


def test_act16_below_must_be_a_db_value() -> None:
    with pytest.raises(UsageError, match="--act16-below -1"):
        QuantConfig(act16_below=-1.0)


def test_the_outlier_channel_that_ruins_8_bits_is_widened_where_no_matmul_requantizes_it(calib_for) -> None:
    """outlier_channel_mlp (one huge, unread channel in front of the MatMul fc3, test_analysis's culprit): on
    --target generic the default widens that point and the model meets 25 dB in ONNX's semantics (onnxruntime
    without graph optimizations), which --act16-below 0 does not.
    On ort-cpu the point stays at 8 bits with a warning: onnxruntime's CPU turns a MatMul with a float input
    into MatMulNBits, which would quantize the wide input to int8 again (measured: 0.0 dB)."""
    model = zoo_analysis.outlier_channel_mlp()
    folder = calib_for(model, 32)
    wide = quantize(model, folder, init_only(weight_bits=8, target="generic"), progress=False)
    narrow = quantize(model, folder, init_only(weight_bits=8, target="generic", act16_below=0.0), progress=False)
    assert [p["tensor"] for p in wide.report.wide_activations] == [zoo_analysis.CULPRIT]
    x = np.stack([np.load(f)["x"] for f in sorted(folder.glob("*.npz"))[:8]])
    feeds = [{"x": x}]
    assert _output_sqnr(model, wide.model, feeds, False) > 25.0 > 10.0 > _output_sqnr(model, narrow.model, feeds, False)
    ort_cpu = quantize(model, folder, init_only(weight_bits=8), progress=False)
    assert not ort_cpu.report.wide_activations
    assert any("stay at 8 bits: onnxruntime's CPU would requantize" in w and "h2 (fc3" in w
               for w in ort_cpu.report.warnings), ort_cpu.report.warnings
