"""Helpers shared by tests: fast configurations, the twin checked against onnxruntime (calibration folders: models/calib_files.py)."""
from __future__ import annotations


import numpy as np
import onnx

from eptq_onnx import QuantConfig
from eptq_onnx.config import OptimizeOptions
from models import zoo


def init_only(**fields) -> QuantConfig:
    """A configuration without EPTQ optimization (the MSE-initialized model): fast."""
    return QuantConfig(optimize=OptimizeOptions(iters=0), **fields)


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def assert_student_matches_onnxruntime(model: onnx.ModelProto, result, seed: int = 11) -> None:
    """The hard-rounded torch student computes what onnxruntime computes on the written QDQ model.

    Exact quantizer semantics on every tensor; network-wide, only rounding-tie flips differ:
    torch and onnxruntime sum in different orders (differences ~1e-7), which now and then puts a
    value on the other side of a rounding boundary: that code moves by one step and the change
    propagates downstream. Such flips must stay rare and the outputs close.
    """
    import torch

    from eptq_onnx.graph.runtime import make_session, with_outputs
    from eptq_onnx.twin.build import build_twin, to_tensors

    state = result.state
    twin = build_twin(state.float_model, state.plan, state.weights, state.acts)
    feeds = zoo.sample_inputs(model, 4, seed=seed)
    roots = [g.roots[0] for g in state.plan.groups]
    q_names = [f"{r}_QuantizeLinear_Output" for r in roots]
    session = make_session(with_outputs(result.model, q_names + roots), optimize=False)
    ort_values = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
    with torch.no_grad():
        outputs, taps = twin.student.run(to_tensors(feeds), roots)
    flips = total = 0
    for g, r, qn in zip(state.plan.groups, roots, q_names):
        fq = twin.act_quant[g.id]
        theirs = ort_values[qn].astype(np.float32)
        with torch.no_grad():  # the same float input gives exactly onnxruntime's codes
            np.testing.assert_array_equal(fq.codes(torch.from_numpy(ort_values[r])).numpy(), theirs, err_msg=r)
            mine = fq.codes(taps[r]).numpy()
        total += mine.size
        flips += int((mine != theirs).sum())
    assert flips <= 0.01 * total, f"{flips} of {total} codes differ"
    for out_name, value in zip(twin.student.outputs, outputs):
        err = _relative(value.numpy(), ort_values[out_name])
        assert err < (1e-5 if flips == 0 else 2e-2), f"{out_name}: relative error {err:.2e} ({flips} tie flips)"
