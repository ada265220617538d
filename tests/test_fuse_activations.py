"""Decomposed HardSwish written as one op (graph/fuse_activations.py): every spelling, checked in onnxruntime."""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from eptq_onnx import quantize
from eptq_onnx.graph.fuse_activations import fuse_hardswish
from tests.helpers import init_only


def _hardswish(x: np.ndarray) -> np.ndarray:
    return x * np.clip(x + 3.0, 0.0, 6.0) / 6.0


def _spelled(spelling: str, opset: int, swap: bool = False, extra_reader: bool = False,
             high: float = 6.0) -> onnx.ModelProto:
    """x[N,4,5,5] -> Conv 1x1 (c) -> HardSwish(c) in ``spelling`` (h) -> Conv 1x1 -> y; ``swap`` reverses the
    operands of the Add and the Muls; ``extra_reader`` makes the Clip's output a model output too."""
    rng = np.random.default_rng(0)
    inits = {"w1": rng.normal(0, 2.0, (4, 4, 1, 1)), "w2": rng.normal(0, 0.5, (3, 4, 1, 1)),
             "three": np.float32(3), "zero": np.float32(0), "six": np.float32(high), "sixth": np.float32(1 / 6)}

    def pair(a: str, b: str) -> list:
        return [b, a] if swap else [a, b]

    nodes = [helper.make_node("Conv", ["x", "w1"], ["c"], name="conv1"),
             helper.make_node("Add", pair("c", "three"), ["a"], name="add"),
             helper.make_node("Clip", ["a", "zero", "six"], ["g"], name="clip")]
    if spelling == "div_after":  # (c * relu6(c + 3)) / 6
        nodes += [helper.make_node("Mul", pair("c", "g"), ["m"], name="mul"),
                  helper.make_node("Div", ["m", "six"], ["h"], name="exit")]
    elif spelling == "mul_sixth":  # c * relu6(c + 3) * (1/6)
        nodes += [helper.make_node("Mul", pair("c", "g"), ["m"], name="mul"),
                  helper.make_node("Mul", pair("m", "sixth"), ["h"], name="exit")]
    else:  # c * (relu6(c + 3) / 6)
        nodes += [helper.make_node("Div", ["g", "six"], ["m"], name="gate"),
                  helper.make_node("Mul", pair("c", "m"), ["h"], name="exit")]
    nodes.append(helper.make_node("Conv", ["h", "w2"], ["y"], name="conv2"))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if extra_reader:
        outputs.append(helper.make_tensor_value_info("g", TensorProto.FLOAT, None))
    read = {i for n in nodes for i in n.input}
    inits = {k: v for k, v in inits.items() if k in read}
    graph = helper.make_graph(nodes, "hardswish", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 5, 5])],
                              outputs, [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return onnx.shape_inference.infer_shapes(model)


def _outputs(model: onnx.ModelProto, x: np.ndarray) -> list:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


def _x() -> np.ndarray:
    return np.random.default_rng(1).normal(0, 1, (2, 4, 5, 5)).astype(np.float32)


@pytest.mark.parametrize("spelling", ["div_after", "mul_sixth", "gate_over_6"])
@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("opset, ops", [(13, {"HardSigmoid": 1, "Mul": 1}), (14, {"HardSwish": 1})])
def test_every_spelling_becomes_one_activation_with_the_same_outputs(spelling, swap, opset, ops):
    model = _spelled(spelling, opset, swap)
    x = _x()
    before = _outputs(model, x)[0]
    fused = onnx.ModelProto()
    fused.CopyFrom(model)
    assert fuse_hardswish(fused, opset) == 1
    onnx.checker.check_model(fused, full_check=True)
    counts = Counter(n.op_type for n in fused.graph.node)
    assert counts == Counter({"Conv": 2, **ops})
    assert {t.name for t in fused.graph.initializer} == {"w1", "w2"}  # the pattern's constants are gone
    assert fused.graph.node[-2].output[0] == "h"  # the exit keeps its name
    np.testing.assert_allclose(_outputs(fused, x)[0], before, rtol=1e-5, atol=1e-5)
    # an independent numpy reference of the fused activation
    w1, w2 = (numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == n)) for n in ("w1", "w2"))
    c = np.einsum("oi,nihw->nohw", w1[:, :, 0, 0], x)
    np.testing.assert_allclose(np.einsum("oi,nihw->nohw", w2[:, :, 0, 0], _hardswish(c)), before, rtol=1e-4, atol=1e-4)


def test_patterns_that_are_not_hardswish_stay():
    """Another Clip bound, or an intermediate that something else reads: the graph is left as it is."""
    for model in (_spelled("div_after", 14, high=5.0), _spelled("div_after", 14, extra_reader=True)):
        nodes = [n.op_type for n in model.graph.node]
        assert fuse_hardswish(model, 14) == 0
        assert [n.op_type for n in model.graph.node] == nodes


def test_the_pipeline_fuses_and_reports_them():
    model = _spelled("div_after", 13)
    feeds = [{"x": np.random.default_rng(i).normal(0, 1, (1, 4, 5, 5)).astype(np.float32)} for i in range(8)]
    result = quantize(model, feeds, init_only(weight_bits=8), progress=False)
    assert result.report.fused_hardswish == 1
    ops = Counter(n.op_type for n in result.model.graph.node)
    assert ops["HardSigmoid"] == 1 and ops["Clip"] == 0 and ops["Div"] == 0
    x = feeds[0]["x"]
    q = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    ref = _outputs(model, x)[0]
    assert 10 * np.log10(np.sum(ref ** 2) / np.sum((ref - q) ** 2)) > 25  # W8A8 of the same function


def test_latency_is_measured_against_the_model_as_read(monkeypatch):
    """The written model replaces the user's model, not the prepared one (whose HardSwish is one op and may run
    faster): the report's latency times the model as read, and says so."""
    from eptq_onnx.export import latency as latency_module

    timed = []
    measure = latency_module.measure_latency
    monkeypatch.setattr(latency_module, "measure_latency",
                        lambda float_model, *args, **kw: timed.append(float_model) or measure(float_model, *args, **kw))
    model = _spelled("div_after", 13)
    feeds = [{"x": np.random.default_rng(i).normal(0, 1, (1, 4, 5, 5)).astype(np.float32)} for i in range(8)]
    config = init_only(weight_bits=8)
    result = quantize(model, feeds, config, progress=False)
    assert result.report.latency["float_model"] == "as read"
    assert [n.op_type for n in timed[0].graph.node].count("Clip") == 1  # the decomposed HardSwish, as exported
