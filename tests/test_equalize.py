"""Depthwise input equalization (graph/equalize.py): exact in float, one range per point, and what it buys."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from eptq_onnx import quantize
from eptq_onnx.calib.channel_ranges import channel_ranges
from eptq_onnx.calib.memory import open_calibration
from eptq_onnx.calib.specs import input_specs
from dataclasses import replace

from eptq_onnx.config import CalibOptions, OptimizeOptions, QuantConfig
from eptq_onnx.graph.equalize import EQUALIZE_BELOW, MIN_SCALE, channel_scales, equalize, find_blocks
from eptq_onnx.graph.runtime import with_outputs
from eptq_onnx.init.quantizers import sqnr_db
from eptq_onnx.plan.qpoints import build_plan
from eptq_onnx.plan.targets import get_target
from models import zoo_analysis
from tests.helpers import init_only

GAINS = np.geomspace(0.02, 20.0, 8)


def _block(activation: str, gains: np.ndarray = GAINS, extra_reader: bool = False) -> onnx.ModelProto:
    """x[N,3,12,12] -> Conv 3->8 (output channels ``gains`` apart) -> ``activation`` (h) -> depthwise Conv -> y."""
    rng = np.random.default_rng(0)
    inits = {"w1": rng.normal(0, 0.5, (8, 3, 3, 3)) * gains[:, None, None, None], "b1": rng.normal(0, 0.1, 8) * gains,
             "w2": rng.normal(0, 0.5, (8, 1, 3, 3)), "b2": rng.normal(0, 0.5, 8)}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c"], name="pw", pads=[1, 1, 1, 1])]
    if activation == "decomposed_hardswish":  # x * clip(x + 3, 0, 6), then / 6: paddle2onnx's spelling
        inits.update(three=np.float32(3), zero=np.float32(0), six=np.float32(6))
        nodes += [helper.make_node("Add", ["c", "three"], ["a"]), helper.make_node("Clip", ["a", "zero", "six"], ["g"]),
                  helper.make_node("Mul", ["c", "g"], ["m"]), helper.make_node("Div", ["m", "six"], ["h"])]
    elif activation == "silu":
        nodes += [helper.make_node("Sigmoid", ["c"], ["g"]), helper.make_node("Mul", ["c", "g"], ["h"])]
    else:
        nodes.append(helper.make_node(activation, ["c"], ["h"], name="act"))
    nodes.append(helper.make_node("Conv", ["h", "w2", "b2"], ["y"], name="dw", pads=[1, 1, 1, 1], group=8))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if extra_reader:
        nodes.append(helper.make_node("ReduceMean", ["h"], ["r"], keepdims=0, axes=[2, 3]))
        outputs.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 12, 12])],
                              outputs, [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = 8
    return onnx.shape_inference.infer_shapes(model)


def _feeds(n: int, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(0, 1, (1, 3, 12, 12)).astype(np.float32)} for _ in range(n)]


def _run(model: onnx.ModelProto, feeds: list, names: list | None = None) -> list:
    tapped = with_outputs(model, names) if names else model
    session = ort.InferenceSession(tapped.SerializeToString(), providers=["CPUExecutionProvider"])
    return [np.concatenate(o) for o in zip(*(session.run(names, f) for f in feeds))]


def _equalized(model: onnx.ModelProto, feeds: list):
    blocks = find_blocks(model)
    calib = open_calibration(feeds, input_specs(model), CalibOptions(batch_size=4))
    ranges = channel_ranges(model, [b.tensor for b in blocks], calib, samples=len(feeds))
    return blocks, ranges, *equalize(model, blocks, ranges)


@pytest.mark.parametrize("activation, kind", [("HardSwish", "hardswish"), ("decomposed_hardswish", "composite"),
                                              ("silu", "composite"), ("Relu", "relu"), ("LeakyRelu", "relu")])
def test_equalization_is_exact_in_float_and_gives_the_point_one_range(activation: str, kind: str) -> None:
    """The model's output is unchanged (onnxruntime, float); the depthwise Conv's input holds every channel at
    the widest one's range, those floored at MIN_SCALE at 1/MIN_SCALE of their own; its filters took s."""
    model = _block(activation)
    feeds = _feeds(16)
    blocks, ranges, rewritten, done = _equalized(model, feeds)
    assert [(b.conv, b.tensor, b.kind) for b in blocks] == [("dw", "h", kind)]
    assert [e.block.conv for e in done] == ["dw"] and done[0].min_scale < EQUALIZE_BELOW
    # the tensors now holding x_c / s_c: the layer output and its Relu; a composite's exit and what reads it
    assert done[0].rescaled == {"relu": ("c", "h"), "hardswish": ("h",)}.get(kind, done[0].rescaled)
    if activation == "decomposed_hardswish":
        assert done[0].rescaled == ("m", "h")
    onnx.checker.check_model(rewritten)
    test = _feeds(8, seed=1)
    [before], [after] = _run(model, test), _run(rewritten, test)
    assert np.max(np.abs(after - before)) <= 1e-4 * np.max(np.abs(before))
    scales = channel_scales(ranges["h"])
    [h] = _run(rewritten, feeds, ["h"])
    now = np.abs(h).max(axis=(0, 2, 3))
    np.testing.assert_allclose(now, ranges["h"] / scales, rtol=1e-4)
    widest = ranges["h"].max()
    assert np.all(now[scales > MIN_SCALE] >= widest * (1 - 1e-4))
    weights = {t.name: numpy_helper.to_array(t) for t in rewritten.graph.initializer}
    dw = next(n for n in rewritten.graph.node if n.name == "dw")
    original = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "w2"))
    np.testing.assert_allclose(weights[dw.input[1]], original * scales[:, None, None, None], rtol=1e-6)
    assert "w2" not in weights  # the replaced filters are not left behind


def test_channels_of_one_range_and_shared_inputs_are_left_alone() -> None:
    """Channels within EQUALIZE_BELOW of each other need no rescaling; an input that another node reads too
    cannot take a factor for the depthwise Conv alone."""
    model = _block("HardSwish", gains=np.linspace(0.8, 1.0, 8))
    _, _, rewritten, done = _equalized(model, _feeds(8))
    assert not done and [n.op_type for n in rewritten.graph.node] == [n.op_type for n in model.graph.node]
    assert find_blocks(_block("HardSwish", extra_reader=True)) == []
    assert channel_scales(np.array([1.0, np.nan])) is None and channel_scales(np.zeros(4)) is None


def test_on_ort_cpu_the_equalized_point_replaces_the_pre_activation_point() -> None:
    """onnxruntime's placement puts a point on the Conv output before a HardSwish (c: one grid over channels
    1000x apart); with the block equalized, its layer's point moves past the activation to h, the only one."""
    model = _block("HardSwish")
    assert {"c", "h"} <= {t for g in build_plan(model, fusible=get_target("ort-cpu").fusible).groups for t in g.tensors}
    result = quantize(model, _feeds(16), init_only(weight_bits=8, act16_below=0.0), progress=False)
    assert [e["conv"] for e in result.report.equalized] == ["dw"]
    quantized = {n.input[0] for n in result.model.graph.node if n.op_type == "QuantizeLinear"}
    assert "c" not in quantized and "h" in quantized, quantized


def test_equalization_lifts_an_8bit_model_whose_depthwise_input_spreads() -> None:
    """spread_stem_cnn at W8A8 with 8-bit activations only: equalized, its output is far closer to the float
    model than without (--no-equalize), and at least as close as with the 16-bit points the widening keeps."""
    model = zoo_analysis.spread_stem_cnn()
    calib, test = _feeds(24), _feeds(8, seed=1)
    run = lambda **kw: _run(quantize(model, calib, init_only(weight_bits=8, **kw), progress=False).model, test)[0]
    [reference] = _run(model, test)
    equalized = sqnr_db(reference, run(act16_below=0.0))
    plain = sqnr_db(reference, run(act16_below=0.0, equalize=False))
    widened = sqnr_db(reference, run(equalize=False))
    assert equalized > plain + 10.0, (equalized, plain)
    assert equalized > widened - 1.5, (equalized, widened)


@pytest.mark.parametrize("activation, rescaled", [("Relu", {"c", "h"}), ("HardSwish", {"h"})])
def test_eptq_does_not_tap_the_tensors_equalization_rescaled(activation: str, rescaled: set) -> None:
    """Their channel c holds x_c / s_c: a loss there weighs the narrow channels' errors 1 / s_c^2 more than in
    the model as exported. EPTQ's loss taps the other points and the output; without equalization it taps them."""
    model = _block(activation)
    config = QuantConfig(weight_bits=4, optimize=OptimizeOptions(iters=4, batch_size=4), measure_latency=False)
    tapped = quantize(model, _feeds(16), config, progress=False).report.optimization["loss_weights"]
    assert not rescaled & set(tapped) and "y" in tapped, tapped
    plain = quantize(model, _feeds(16), replace(config, equalize=False), progress=False).report.optimization["loss_weights"]
    assert "h" in plain, plain


def test_mixed_precision_probes_what_eptq_taps_and_eptq_reuses_its_lfh(monkeypatch) -> None:
    """The bit-width search's LFH leaves out the same rescaled tensors, so EPTQ reuses it (no second LFH)."""
    from eptq_onnx.config import MixedPrecisionOptions
    from eptq_onnx.eptq import stage as eptq_stage

    computed = []
    compute = eptq_stage.compute_lfh
    monkeypatch.setattr(eptq_stage, "compute_lfh", lambda *a, **kw: computed.append(1) or compute(*a, **kw))
    config = QuantConfig(weight_bits=8, mixed=MixedPrecisionOptions(bit_options=(4, 8), avg_weight_bits=6.0, samples=8),
                         optimize=OptimizeOptions(iters=4, batch_size=4), measure_latency=False)
    report = quantize(_block("Relu"), _feeds(16), config, progress=False).report
    assert "h" not in report.optimization["loss_weights"] and report.equalized
    assert computed == [], "EPTQ computed the LFH again"


def test_the_cli_equalizes_by_default_and_not_with_no_equalize(tmp_path) -> None:
    """--no-equalize leaves the model as it is; the default lists the block in the JSON report."""
    import json

    from click.testing import CliRunner

    from eptq_onnx.cli import main

    model_path, calib = tmp_path / "m.onnx", tmp_path / "calib"
    onnx.save(_block("HardSwish"), model_path)
    calib.mkdir()
    for i, feeds in enumerate(_feeds(8)):
        np.save(calib / f"{i}.npy", feeds["x"])
    listed = {}
    for flag in ("--equalize", "--no-equalize"):
        report = tmp_path / f"{flag}.json"
        argv = [str(model_path), str(tmp_path / f"{flag}.onnx"), "--calib", str(calib), "--weight-bits", "8",
                "--iters", "0", "--no-latency", "-q", "--report", str(report), flag]
        done = CliRunner().invoke(main, argv)
        assert done.exit_code == 0, done.output
        listed[flag] = [e["conv"] for e in json.loads(report.read_text())["equalized"]]
    assert listed == {"--equalize": ["dw"], "--no-equalize": []}
