"""The optimization's batch under a memory budget: the bytes a step saves for backward, measured and fitted."""
from __future__ import annotations

import pytest

from eptq_onnx import QuantConfig, quantize
from eptq_onnx.config import OptimizeOptions
from eptq_onnx.eptq.banks import BiasBank, RoundingBank
from eptq_onnx.eptq.batches import Batches
from eptq_onnx.eptq.memory import available_bytes, fit_batch, saved_bytes
from eptq_onnx.eptq.objective import Objective
from eptq_onnx.eptq.optimizer import start_rounding
from eptq_onnx.eptq.stage import loss_tensors
from eptq_onnx.twin.build import build_twin
from eptq_onnx.twin.weighted import WeightedOp
from models import zoo
from tests.helpers import init_only


@pytest.fixture(scope="module")
def objective_and_batches(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from models.calib_files import write_calib

    model = zoo.residual_cnn()
    calib = write_calib(model, tmp_path_factory.mktemp("calib"), 24)
    state = quantize(model, calib, init_only(), progress=False).state
    names = loss_tensors(state.float_model, state.plan)
    twin = build_twin(state.float_model, state.plan, state.weights, state.acts, taps=names)
    start_rounding(twin, fixed_scale=True)
    bank = RoundingBank(list(twin.weight_quant.values()))
    biases = BiasBank([m for m in twin.student.modules() if isinstance(m, WeightedOp) and m.weight_quant is not None])
    feeds = [zoo.sample_inputs(model, 1, seed=i) for i in range(24)]
    batches = Batches(feeds, "cpu", seed=0)
    return Objective(twin, dict.fromkeys(names, 1.0), OptimizeOptions(), bank, biases=biases), batches, calib, model


def test_saved_bytes_grow_with_the_batch_as_the_fit_extrapolates(objective_and_batches) -> None:
    objective, batches, *_ = objective_and_batches
    fit = fit_batch(objective, batches, 16, 20.0, "cpu", max_memory_gb=1e-9)
    assert fit is not None and fit.batch_size == 1 and "even batch 1 exceeds that" in fit.note
    measured = saved_bytes(objective, batches, 16, 20.0)
    assert measured == pytest.approx(fit.fixed + 16 * fit.per_sample, rel=0.1)
    roomy = fit_batch(objective, batches, 16, 20.0, "cpu", max_memory_gb=64.0)
    assert roomy is not None and roomy.batch_size == 16 and roomy.note == ""
    budget = (fit.fixed + 5.5 * fit.per_sample) / 2**30  # room for five samples and a half
    five = fit_batch(objective, batches, 16, 20.0, "cpu", max_memory_gb=budget)
    assert five is not None and five.batch_size == 5 and "batch 5 instead of 16" in five.note
    assert available_bytes("cpu") > 0


def test_the_probes_leave_the_minibatch_draws_alone(objective_and_batches) -> None:
    objective, batches, *_ = objective_and_batches
    state = batches.rng.bit_generator.state
    fit_batch(objective, batches, 16, 20.0, "cpu", max_memory_gb=1.0)
    assert batches.rng.bit_generator.state == state


def test_a_run_under_a_small_budget_says_it_lowered_the_batch(objective_and_batches) -> None:
    *_, calib, model = objective_and_batches
    options = OptimizeOptions(iters=2, batch_size=16, max_memory_gb=0.002, weighting="uniform", discard_if_worse=False)
    result = quantize(model, calib, QuantConfig(optimize=options), progress=False)
    assert "instead of 16 (--opt-batch-size)" in result.report.optimization["why"]
