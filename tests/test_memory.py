"""The optimization's batch under a memory budget: the memory a whole step takes, measured and fitted."""
from __future__ import annotations

import pytest
import torch

from eptq_onnx import QuantConfig, quantize
from eptq_onnx.config import OptimizeOptions
from eptq_onnx.eptq.banks import BiasBank, RoundingBank
from eptq_onnx.eptq.batches import Batches
from eptq_onnx.eptq import memory
from eptq_onnx.eptq.memory import StepBytes, _peak_since, _reset_peak, available_bytes, fit_batch, step_bytes
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


def test_the_fit_follows_the_peak_a_step_takes(objective_and_batches, monkeypatch: pytest.MonkeyPatch) -> None:
    objective, batches, *_ = objective_and_batches
    mib = 1 << 20  # a step saves 80 + 40 MiB a sample and peaks at 100 + 50 MiB a sample
    monkeypatch.setattr(memory, "step_bytes", lambda o, b, size, beta, device: StepBytes((80 + 40 * size) * mib,
                                                                                         (100 + 50 * size) * mib))
    fit = fit_batch(objective, batches, 16, 20.0, "cpu", max_memory_gb=(100 + 5.5 * 50) / 1024)
    assert fit is not None and (fit.per_sample, fit.fixed) == (50 * mib, 100 * mib) and fit.batch_size == 5
    assert "batch 5 instead of 16" in fit.note and "50 MiB a sample" in fit.note
    tight = fit_batch(objective, batches, 16, 20.0, "cpu", max_memory_gb=0.1)
    assert tight is not None and tight.batch_size == 1 and "even batch 1 exceeds that" in tight.note
    roomy = fit_batch(objective, batches, 16, 20.0, "cpu", max_memory_gb=64.0)
    assert roomy is not None and roomy.batch_size == 16 and roomy.note == ""
    # where the peak is not measured, the saved bytes bound it
    monkeypatch.setattr(memory, "step_bytes", lambda o, b, size, beta, device: StepBytes((80 + 40 * size) * mib, 0))
    unmeasured = fit_batch(objective, batches, 16, 20.0, "cpu", max_memory_gb=(80 + 5.5 * 40) / 1024)
    assert unmeasured is not None and (unmeasured.per_sample, unmeasured.batch_size) == (40 * mib, 5)


def test_a_probe_step_saves_tensors_and_leaves_no_gradients(objective_and_batches) -> None:
    objective, batches, *_ = objective_and_batches
    one, many = (step_bytes(objective, batches, size, 20.0, "cpu") for size in (1, 16))
    assert 0 < one.saved < many.saved
    assert all(p.grad is None for p in objective.twin.student.parameters())
    assert available_bytes("cpu") > 0


def test_the_peak_measure_sees_an_allocation_that_is_freed_again() -> None:
    before = _reset_peak("cpu")
    if before is None:
        pytest.skip("no /proc/self/clear_refs: the peak is not measured here")
    block = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB, touched
    del block
    assert _peak_since("cpu", before) >= 60 << 20
    before = _reset_peak("cpu")
    assert _peak_since("cpu", before) < 60 << 20  # the reset forgets it


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
