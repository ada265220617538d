"""LSTM/GRU in the torch twin (twin.recurrent.RecurrentOp, float): every variant against onnxruntime."""
from __future__ import annotations

import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from eptq_onnx.errors import ModelError
from eptq_onnx.twin.convert import to_torch
from tests.test_torch_convert import _assert_every_tensor_matches, _finish, _float

STEPS, BATCH, INPUT, HIDDEN = 5, 3, 4, 6


def _recurrent(kind: str, direction: str, layout: int, opset: int, with_initial: bool, **attrs) -> onnx.ModelProto:
    dirs = 2 if direction == "bidirectional" else 1
    gates = 4 if kind == "LSTM" else 3
    inits = [numpy_helper.from_array(_float(dirs, gates * HIDDEN, INPUT, bound=0.5), "W"),
             numpy_helper.from_array(_float(dirs, gates * HIDDEN, HIDDEN, bound=0.5), "R"),
             numpy_helper.from_array(_float(dirs, 2 * gates * HIDDEN, bound=0.5), "B")]
    x_shape = [BATCH, STEPS, INPUT] if layout else [STEPS, BATCH, INPUT]
    state_shape = [BATCH, dirs, HIDDEN] if layout else [dirs, BATCH, HIDDEN]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)]
    node_inputs = ["x", "W", "R", "B", ""]
    states = ["h0", "c0"][: 2 if kind == "LSTM" else 1]
    if with_initial:
        inputs += [helper.make_tensor_value_info(s, TensorProto.FLOAT, state_shape) for s in states]
        node_inputs += states
    outputs = ["y", "y_h", "y_c"][: 3 if kind == "LSTM" else 2]
    if opset >= 14:  # layout exists from opset 14
        attrs["layout"] = layout
    node = helper.make_node(kind, node_inputs, outputs, hidden_size=HIDDEN, direction=direction, **attrs)
    y_shape = [BATCH, STEPS, dirs, HIDDEN] if layout else [STEPS, dirs, BATCH, HIDDEN]
    outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)]
    outs += [helper.make_tensor_value_info(o, TensorProto.FLOAT, state_shape) for o in outputs[1:]]
    return _finish(helper.make_graph([node], kind, inputs, outs, inits), opset)


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
@pytest.mark.parametrize("opset", [13, 14, 22])
def test_recurrent_matches_onnxruntime(kind: str, direction: str, opset: int) -> None:
    _assert_every_tensor_matches(_recurrent(kind, direction, 0, opset, with_initial=opset == 14))


def test_gru_linear_before_reset() -> None:
    _assert_every_tensor_matches(_recurrent("GRU", "forward", 0, 14, True, linear_before_reset=1))


@pytest.mark.parametrize(("layout", "attrs", "message"), [(0, {"clip": 1.0}, "clip"), (1, {}, "layout")])
def test_unsupported_variants_are_refused(layout: int, attrs: dict, message: str) -> None:
    """What onnxruntime's CPU kernels also refuse (layout 1) or we do not model (clip) stops the twin."""
    with pytest.raises(ModelError, match=message):
        to_torch(_recurrent("LSTM", "forward", layout, 14, False, **attrs))
