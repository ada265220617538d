"""Ranges chosen for what the activation behind a point computes (calib/transfer.py, params_mse's transfer)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from eptq_onnx.calib.transfer import point_transfers
from eptq_onnx.init.quantizers import Histogram, fake_quant, params_for_range, params_mse
from eptq_onnx.ops.registry import ORT_FUSED_ACTIVATIONS
from eptq_onnx.plan.qpoints import build_plan


def _hardswish(x: np.ndarray) -> np.ndarray:
    return x * np.clip(x + 3.0, 0.0, 6.0) / 6.0


def _hardsigmoid(x: np.ndarray) -> np.ndarray:
    return np.clip(x / 6.0 + 0.5, 0.0, 1.0)


def _conv_act_conv(act_nodes, act_out: str, extra_reader: bool = False) -> onnx.ModelProto:
    """x -> Conv -> c -> (activation nodes) -> act_out -> Conv -> y [+ Conv(c + act_out)]."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c"]), *act_nodes,
             helper.make_node("Conv", [act_out, "w2"], ["y"])]
    outputs = ["y"]
    if extra_reader:
        nodes += [helper.make_node("Add", ["c", act_out], ["skip"]), helper.make_node("Conv", ["skip", "w2"], ["y2"])]
        outputs.append("y2")
    inits = {"w1": rng.normal(size=(4, 3, 1, 1)), "b1": rng.normal(size=4), "w2": rng.normal(size=(2, 4, 1, 1)),
             "three": 3.0, "sixth": 1.0 / 6.0, "zero": 0.0, "six": 6.0}
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
        initializer=[numpy_helper.from_array(np.asarray(v, dtype=np.float32), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = 8
    return onnx.shape_inference.infer_shapes(model)


SPELLINGS = {
    "HardSwish": ([helper.make_node("HardSwish", ["c"], ["h"])], _hardswish),
    "x * HardSigmoid(x)": ([helper.make_node("HardSigmoid", ["c"], ["s"], alpha=1.0 / 6.0),
                            helper.make_node("Mul", ["c", "s"], ["h"])], _hardswish),
    "x * Relu6(x + 3) / 6": ([helper.make_node("Add", ["c", "three"], ["c3"]),
                              helper.make_node("Clip", ["c3", "zero", "six"], ["r6"]),
                              helper.make_node("Mul", ["c", "r6"], ["m"]),
                              helper.make_node("Mul", ["m", "sixth"], ["h"])], _hardswish),
    "HardSigmoid": ([helper.make_node("HardSigmoid", ["c"], ["h"], alpha=1.0 / 6.0)], _hardsigmoid),
}


def _conv_output_transfer(model: onnx.ModelProto):
    """The transfer of the point on the Conv output "c" (ort-cpu's placement), or None."""
    plan = build_plan(model, fusible=ORT_FUSED_ACTIVATIONS)
    group = next((g for g in plan.groups if g.tensors == ["c"]), None)
    assert group is not None, "ort-cpu's placement puts a point on the Conv output"
    return point_transfers(model, plan).get(group.id)


@pytest.mark.parametrize("spelling", list(SPELLINGS))
def test_the_activation_behind_a_point_is_found_in_any_spelling(spelling: str) -> None:
    nodes, reference = SPELLINGS[spelling]
    transfer = _conv_output_transfer(_conv_act_conv(nodes, "h"))
    assert transfer is not None
    x = np.linspace(-8.0, 8.0, 1001)
    np.testing.assert_allclose(transfer(x), reference(x), atol=1e-6)


def test_no_transfer_when_another_op_reads_the_point() -> None:
    """A residual Add reads the Conv output too: its error counts there as it is, no function applies."""
    model = _conv_act_conv(SPELLINGS["HardSwish"][0], "h", extra_reader=True)
    assert _conv_output_transfer(model) is None


def _output_error(x: np.ndarray, f, p) -> float:
    qmin, qmax = p.qrange
    return float(((f(fake_quant(x, np.float32(p.scale), p.zero_point, qmin, qmax)) - f(x)) ** 2).mean())


@pytest.mark.parametrize("name,f", [("hardswish", _hardswish), ("relu", lambda x: np.maximum(x, 0.0)),
                                    ("hardsigmoid", _hardsigmoid)])
def test_range_for_the_activation_output_near_brute_force(name: str, f) -> None:
    """The range chosen through a transfer is within 15% of the best of a grid of ranges in the error of the
    activation's output (fake-quant in numpy, the function applied after), and beats the range chosen for
    the values themselves there."""
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.normal(-2.0, 3.0, 150_000), rng.normal(0.5, 0.4, 50_000)]).astype(np.float32)
    hist = Histogram(float(x.min()), float(x.max()))
    for chunk in np.array_split(x, 5):
        hist.add(chunk)
    chosen = params_mse(hist, 8, False, transfer=f)
    plain = params_mse(hist, 8, False)
    lo, hi = float(x.min()), float(x.max())
    grid = [params_for_range(a * lo, b * hi, 8, False) for a in [0.0, *np.linspace(0.02, 1, 50)]
            for b in np.linspace(0.02, 1, 50)]
    best = min(_output_error(x, f, p) for p in grid)
    assert _output_error(x, f, chosen) <= best * 1.15
    assert _output_error(x, f, chosen) < 0.7 * _output_error(x, f, plain)
