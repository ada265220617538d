"""Real-world traps (models/zoo_traps.py) that break onnxruntime's quantize_static at 8 bits, each
handled by design: ours stays accurate and finite where onnxruntime's does not."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnxruntime.quantization import CalibrationMethod

from eptq_onnx import quantize
from eptq_onnx.plan.range_rules import MASK_FILL_ABS, MAX_SHARED_RANGE_RATIO, GroupStats, refine_plan
from eptq_onnx.graph.normalize import normalize_model
from eptq_onnx.plan.qpoints import ActGroup, QuantPlan, build_plan
from eptq_onnx.graph.runtime import make_session, with_outputs
from models import zoo, zoo_traps
from tests.helpers import init_only
from tools.bench import OrtStatic

CALIB = 16


def _sqnr(ref: np.ndarray, test: np.ndarray) -> float:
    err = np.sum((ref.astype(np.float64) - test) ** 2)
    return float(10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / err)) if np.isfinite(err) else -np.inf


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray], names: list[str] | None = None) -> list[np.ndarray]:
    return make_session(with_outputs(model, names) if names else model, optimize=False).run(names, feeds)


def _both(name: str, calib_for, tmp_path: Path, **config) -> tuple[onnx.ModelProto, onnx.ModelProto, onnx.ModelProto, object]:
    """The float model, onnxruntime's W8A8 QDQ model (MinMax) and ours (W8A8) with its report."""
    model = zoo.ZOO[name]()
    calib = calib_for(model, CALIB)
    float_path, ort_path = tmp_path / "float.onnx", tmp_path / "ort.onnx"
    onnx.save(model, float_path)
    OrtStatic(CalibrationMethod.MinMax)(float_path, calib, CALIB, 8, ort_path)
    result = quantize(model, calib, init_only(weight_bits=8, **config), progress=False)
    return model, onnx.load(ort_path), result.model, result.report


def _dq_readers(model: onnx.ModelProto) -> dict[str, list[str]]:
    """op types reading each DequantizeLinear output (the tensors a QDQ model quantizes)."""
    dq = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    readers: dict[str, list[str]] = {}
    for node in model.graph.node:
        for i in node.input:
            if i in dq:
                readers.setdefault(i, []).append(node.op_type)
    return readers


FEEDS_SEED = 123


def test_attention_mask_of_float32_min(calib_for, tmp_path: Path) -> None:
    model, theirs, ours, report = _both("bert_attention_mask", calib_for, tmp_path)
    feeds = zoo.sample_inputs(model, 16, seed=FEEDS_SEED)
    (ref,), (ort_out,), (our_out,) = (_run(m, feeds) for m in (model, theirs, ours))
    assert _sqnr(ref, our_out) > 28.0
    assert _sqnr(ref, ort_out) < _sqnr(ref, our_out) - 8.0  # ORT's scores all land on one code
    assert any("mask-fill values" in w and "stays float" in w for w in report.warnings)
    scores = next(n.input[0] for n in model.graph.node if n.op_type == "Softmax")  # scores + mask fill
    assert any(f"activation {scores} stays float" in w for w in report.warnings)
    assert scores not in {n.input[0] for n in ours.graph.node if n.op_type == "QuantizeLinear"}


def test_layernorm_with_reciprocal(calib_for, tmp_path: Path) -> None:
    model, theirs, ours, _ = _both("layernorm_reciprocal", calib_for, tmp_path)
    feeds = zoo.sample_inputs(model, 16, seed=FEEDS_SEED)
    (ref,), (ort_out,), (our_out,) = (_run(m, feeds) for m in (model, theirs, ours))
    assert np.isfinite(our_out).all() and _sqnr(ref, our_out) > 25.0
    assert _sqnr(ref, ort_out) < _sqnr(ref, our_out) - 10.0
    # no point between the variance and Reciprocal (ORT quantizes var + eps, which rounds to 0)
    readers = _dq_readers(ours)
    assert not any(op in ("Sqrt", "Reciprocal", "Pow", "ReduceMean") for ops in readers.values() for op in ops)
    assert any(op in ("Sqrt", "Reciprocal") for ops in _dq_readers(theirs).values() for op in ops)


def test_output_concat_of_pixels_and_probabilities(calib_for, tmp_path: Path) -> None:
    model, theirs, ours, _ = _both("detection_concat", calib_for, tmp_path)
    feeds = zoo.sample_inputs(model, 16, seed=FEEDS_SEED)
    (ref,), (ort_out,), (our_out,) = (_run(m, feeds) for m in (model, theirs, ours))
    probs = np.s_[..., 4:]
    assert _sqnr(ref[probs], our_out[probs]) > 35.0
    assert _sqnr(ref[probs], ort_out[probs]) < 10.0  # one scale for 0..640 rounds probabilities to 0
    # asked to quantize outputs, the Concat still does not put both ranges on one grid
    result = quantize(model, calib_for(model, CALIB, name="c2"), init_only(weight_bits=8, quantize_outputs=True),
                      progress=False)
    (out,) = _run(result.model, feeds)
    assert _sqnr(ref[probs], out[probs]) > 35.0
    assert any("Concat output detections stays float" in w for w in result.report.warnings)


def test_log_of_a_squared_spectrum(calib_for, tmp_path: Path) -> None:
    model, theirs, ours, _ = _both("log_spectrum", calib_for, tmp_path)
    log = next(n.output[0] for n in model.graph.node if n.op_type == "Log")
    feeds = zoo.sample_inputs(model, 16, seed=FEEDS_SEED)
    ref, ort_log, our_log = (_run(m, feeds, [log])[0] for m in (model, theirs, ours))
    assert not np.isfinite(ort_log).all()  # ORT quantizes the power: 0 -> log(0) = -inf
    assert np.isfinite(our_log).all() and _sqnr(ref, our_log) > 18.0
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    quantized_roots = {n.input[0] for n in ours.graph.node if n.op_type == "QuantizeLinear"}
    assert "Log" in {producers.get(t) for t in quantized_roots}  # the point sits after the Log
    assert not {"Add", "Mul"} & {producers.get(t) for t in quantized_roots}  # never on the power


def test_log_of_a_stacked_spectrum_keeps_its_filter_banks_float(calib_for, tmp_path: Path) -> None:
    """Real and imaginary Convs joined by a Concat before the power and the Log: their rounding reaches the
    network only through the Log (a relative error there is unbounded), so no point sits on them."""
    model, _, ours, report = _both("stacked_spectrum", calib_for, tmp_path)
    spectrum = [n.output[0] for n in model.graph.node if n.op_type == "Conv"][:2]
    stacked = [n.output[0] for n in model.graph.node if n.op_type == "Unsqueeze"]
    quantized_roots = {n.input[0] for n in ours.graph.node if n.op_type == "QuantizeLinear"}
    assert not (set(spectrum) | set(stacked)) & quantized_roots
    assert set(spectrum) <= set(report.singular_float)
    log = next(n.output[0] for n in model.graph.node if n.op_type == "Log")
    feeds = zoo.sample_inputs(model, 16, seed=FEEDS_SEED)
    ref, our_log = (_run(m, feeds, [log])[0] for m in (model, ours))
    assert _sqnr(ref, our_log) > 25.0


def test_lstm_stays_float(calib_for, tmp_path: Path) -> None:
    model, _, ours, report = _both("conv_lstm", calib_for, tmp_path)
    feeds = zoo.sample_inputs(model, 16, seed=FEEDS_SEED)
    (ref,), (our_out,) = (_run(m, feeds) for m in (model, ours))
    assert _sqnr(ref, our_out) > 35.0
    assert [f["op_type"] for f in report.float_ops if "recurrent" in f["why"]] == ["LSTM"]
    lstm = next(n for n in ours.graph.node if n.op_type == "LSTM")
    initializers = {t.name: t for t in ours.graph.initializer}
    assert all(initializers[i].data_type == onnx.TensorProto.FLOAT for i in lstm.input[1:4])
    convs = [n for n in ours.graph.node if n.op_type == "Conv"]
    assert all(n.input[1].endswith("_DequantizeLinear_Output") for n in convs)


# ------------------------------------------------------------------ the range rules, on synthetic statistics


def _stats(*values: float) -> GroupStats:
    s = GroupStats()
    s.add(np.array(values, dtype=np.float32))
    return s


def test_group_stats_ignore_mask_fill_and_non_finite() -> None:
    s = _stats(-3.4e38, -1.0, 2.0, np.inf, np.nan, 1e31)
    assert (s.lo, s.hi, s.mask_fill, s.nonfinite, s.count) == (-1.0, 2.0, 2, 2, 6)
    assert _stats(-0.99 * MASK_FILL_ABS, 1.0).mask_fill == 0


def test_refine_drops_extreme_groups_and_splits_wide_concats() -> None:
    model = normalize_model(zoo_traps.detection_concat())
    plan = build_plan(model, quantize_outputs=True)
    concat = next(n for n in model.graph.node if n.op_type == "Concat" and n.output[0] == "detections")
    assert concat.output[0] in plan.group_of()
    stats = {r: _stats(0.0, 1.0) for g in plan.groups for r in g.roots}
    count = len(plan.groups)
    refined, notes = refine_plan(model, plan, stats)
    assert notes == [] and len(refined.groups) == count  # similar ranges: unchanged

    plan = build_plan(model, quantize_outputs=True)
    wide = dict(stats)
    box_root = concat.input[0]  # sigmoid x 640: merged into the Concat's group as a sole-use input
    assert box_root in plan.group_of()[concat.output[0]].roots
    wide[box_root] = _stats(0.0, 2 * MAX_SHARED_RANGE_RATIO)  # boxes 32x the probabilities
    masked = plan.groups[1].roots[0]  # the first Conv output
    wide[masked] = _stats(-3.4e38, 1.0)
    original, before = plan, [list(g.roots) for g in plan.groups]
    plan, notes = refine_plan(model, plan, wide)
    assert [list(g.roots) for g in original.groups] == before  # a new plan: the input plan is unchanged
    quantized = set(plan.group_of())
    assert concat.output[0] not in quantized
    assert masked not in quantized, masked
    assert plan.group_of()[box_root].roots == [box_root]
    assert [g.id for g in plan.groups] == list(range(len(plan.groups)))
    assert len(notes) == 2 and "32x" in notes[1]


def test_refine_keeps_a_shared_scale_for_similar_ranges() -> None:
    plan = QuantPlan(groups=[ActGroup(0, ["a"], ["a"], "x")])
    refined, notes = refine_plan(zoo.mlp(), plan, {"a": _stats(-1.0, 1.0)})
    assert notes == [] and len(refined.groups) == 1


@pytest.mark.parametrize("scale", [[1.0, 1e-3], [2.0, 0.0]])
def test_no_fusion_over_uneven_constant_scaling(scale: list[float]) -> None:
    """A point after Linear stays before a Mul by constants spanning > 16x (tokens x1 and x1e-3)."""
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.eye(2, dtype=np.float32), "w")
    s = numpy_helper.from_array(np.array(scale, dtype=np.float32), "s")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Mul", ["y", "s"], ["z"]),
             helper.make_node("MatMul", ["z", "w"], ["out"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 2])], [w, s])
    model = zoo.finalize(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    model = onnx.shape_inference.infer_shapes(model)
    points = set(build_plan(model).group_of())
    assert "y" in points and "z" in points  # y: MatMul output, z: the next MatMul's input (own scale)
    even = numpy_helper.from_array(np.array([1.0, 2.0], dtype=np.float32), "s")
    model.graph.initializer[1].CopyFrom(even)
    assert "y" not in set(build_plan(model).group_of())  # fused: the point moves after the Mul
