"""The torch twin: the hard-rounded student computes what onnxruntime computes on the QDQ model."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from eptq_onnx import quantize
from eptq_onnx.graph.runtime import make_session, with_outputs
from eptq_onnx.twin.build import build_twin, to_tensors
from models import zoo
from tests.helpers import assert_student_matches_onnxruntime, init_only

MODELS = ["residual_cnn", "transformer_block", "transformer_block_decomposed", "mlp_mixer_block", "nhwc_tf_style",
          "helper_opset11", "paddle_style", "multi_input", "token_model", "dynamic_spatial_cnn", "residual_cnn_dynamo"]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("name", MODELS)
def test_student_matches_onnxruntime_on_the_qdq_model(name: str, bits: int, calib_for) -> None:
    """Exact quantizer semantics on every tensor; only rare rounding-tie flips network-wide."""
    model = zoo.ZOO[name]()
    result = quantize(model, calib_for(model, 8), init_only(weight_bits=bits), progress=False)
    assert_student_matches_onnxruntime(model, result)


def test_teacher_is_the_float_model(calib_for) -> None:
    model = zoo.transformer_block()
    result = quantize(model, calib_for(model, 8), init_only(weight_bits=8), progress=False)
    state = result.state
    twin = build_twin(state.float_model, state.plan, state.weights, state.acts)
    feeds = zoo.sample_inputs(model, 3, seed=3)
    roots = [g.roots[0] for g in state.plan.groups]
    session = make_session(with_outputs(state.float_model, roots), optimize=False)
    ref = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
    with torch.no_grad():
        outputs, taps = twin.teacher.run(to_tensors(feeds), roots)
    for r in roots:
        np.testing.assert_allclose(taps[r].numpy(), ref[r], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(outputs[0].numpy(), ref[twin.teacher.outputs[0]], rtol=1e-4, atol=1e-5)


def test_student_is_differentiable(calib_for) -> None:
    model = zoo.residual_cnn()
    result = quantize(model, calib_for(model, 8), init_only(weight_bits=4), progress=False)
    state = result.state
    twin = build_twin(state.float_model, state.plan, state.weights, state.acts)
    for fq in twin.act_quant.values():
        fq.factor.requires_grad_(True)
    feeds = to_tensors(zoo.sample_inputs(model, 2, seed=1))
    out = twin.student(feeds)[0]
    out.square().sum().backward()
    assert any(fq.factor.grad is not None and fq.factor.grad.abs().sum() > 0 for fq in twin.act_quant.values())
