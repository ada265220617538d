"""EPTQ optimization: AdaRound pieces, write-back equivalence with onnxruntime, CLI outputs."""
from __future__ import annotations

import dataclasses
import json
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from eptq_onnx import QuantConfig, quantize
from eptq_onnx.cli import main
from eptq_onnx.config import OptimizeOptions
from eptq_onnx.calib.data import held_out_count
from eptq_onnx.context import RunContext
from eptq_onnx.eptq.stage import output_regression, run_eptq
from eptq_onnx.export.reference import fake_quant_model
from eptq_onnx.graph.runtime import float_outputs_of, output_sqnr_db
from eptq_onnx.pipeline import initial_state
from eptq_onnx.report import Report
from eptq_onnx.eptq.schedule import beta_at
from eptq_onnx.graph.runtime import make_session
from eptq_onnx.twin.build import build_twin, model_with_biases, to_tensors
from eptq_onnx.eptq.kernels import rectified_sigmoid
from eptq_onnx.twin.fake_quant import CODES_START_H, WeightFakeQuant, inverse_rectified_sigmoid
from eptq_onnx.eptq.banks import RoundingBank
from eptq_onnx.init.weights import quantize_weight
from models import zoo


def test_rectified_sigmoid_round_trip_and_soft_start_equals_the_float_weight() -> None:
    h = torch.linspace(0.02, 0.98, 50)
    torch.testing.assert_close(rectified_sigmoid(inverse_rectified_sigmoid(h)), h, atol=1e-5, rtol=0)
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.1, (6, 5)).astype(np.float32)
    wfq = WeightFakeQuant(quantize_weight("w", w, 0, 4, "minmax"))
    wt = torch.from_numpy(w)
    wfq.start_rounding(wt)
    with torch.no_grad():
        soft = wfq(wt)
    inside = (np.abs(w / wfq.channel_scale().numpy()) < 7) & (np.abs(np.modf(np.abs(w / wfq.channel_scale().numpy()))[0] - 0.5) < 0.48)
    np.testing.assert_allclose(soft.numpy()[inside], w[inside], rtol=1e-4, atol=1e-6)  # h(V) = frac(w / s)
    assert float(wfq.regularizer(2.0)) > 0
    wfq.mode = "hard"
    with torch.no_grad():
        hard_codes = wfq.rounded(wt, hard=True)
    assert torch.equal(hard_codes, torch.round(hard_codes)) and hard_codes.min() >= -8 and hard_codes.max() <= 7
    exported = wfq.export(wt)
    np.testing.assert_array_equal(exported.codes.astype(np.float32), hard_codes.numpy())


@pytest.mark.parametrize("fixed_scale", [True, False])
def test_rounding_started_from_codes_rounds_to_them(fixed_scale: bool) -> None:
    """--rounding-start init: h(V) sits CODES_START_H from each stored code, so the hard rounding is
    the stored code everywhere, also where GPTQ moved it more than a step from w / s; the other
    choice (h(V) flipped) is one step towards w / s, inside the integer range. The float start
    rounds to nearest instead."""
    rng = np.random.default_rng(3)
    w = rng.normal(0, 0.1, (8, 40)).astype(np.float32)
    wq = quantize_weight("w", w, 0, 4, "minmax")
    s = wq.scale.reshape(-1, 1)
    floor = np.clip(np.floor(w / s), -8, 7)
    codes = wq.codes.astype(np.float32)
    flip = rng.random(w.shape) < 0.3  # decisions that round-to-nearest would not take, as GPTQ's
    codes = np.where(flip, np.clip(floor + (codes == floor), -8, 7), codes)
    codes[0, :3] = np.clip(floor[0, :3] + 2, -8, 7)  # two steps above the floor
    codes[1, :3] = np.clip(floor[1, :3] - 1, -8, 7)  # one below
    wfq = WeightFakeQuant(dataclasses.replace(wq, codes=codes.astype(np.int8)))
    wt = torch.from_numpy(w)
    wfq.start_rounding(wt, fixed_scale=fixed_scale, from_codes=True)
    h = rectified_sigmoid(wfq.rounding.detach()).numpy()
    np.testing.assert_allclose(np.minimum(h, 1 - h), CODES_START_H, atol=1e-5)
    with torch.no_grad():
        np.testing.assert_array_equal(wfq.rounded(wt, hard=True).numpy(), codes)
        wfq.rounding.neg_()  # h(-V) = 1 - h(V): every other choice
        other = wfq.rounded(wt, hard=True).numpy()
    scaled = w / s
    side = np.where(codes > scaled, -1, 1)  # a code on w / s exactly may move up
    towards = np.clip(codes + side, -8, 7)
    np.testing.assert_array_equal(other, towards)
    moved = other != codes
    assert moved.mean() > 0.9 and np.all(np.sign(other - codes)[moved] == side[moved])
    assert not np.array_equal(codes, np.clip(np.round(w / s), -8, 7))
    wfq.start_rounding(wt, fixed_scale=fixed_scale)
    with torch.no_grad():
        np.testing.assert_array_equal(wfq.rounded(wt, hard=True).numpy(), np.clip(np.round(w / s), -8, 7))


def _learned_rounding_quantizers(seed: int, shapes, bits: int, fixed_scale: bool = True):  # type: ignore[no-untyped-def]
    """Weight quantizers (min/max steps, axis 0) of random weights of the given shapes, switched to
    learned rounding (with fixed steps by default); and the weights."""
    rng = np.random.default_rng(seed)
    quantizers, weights = [], []
    for i, shape in enumerate(shapes):
        w = rng.normal(0, 0.1, shape).astype(np.float32)
        wfq = WeightFakeQuant(quantize_weight(f"w{i}", w, 0, bits, "minmax"))
        wfq.start_rounding(torch.from_numpy(w), fixed_scale=fixed_scale)
        quantizers.append(wfq)
        weights.append(torch.from_numpy(w))
    return quantizers, weights


@pytest.mark.parametrize("fixed_scale", [True, False])
def test_rounding_bank_is_the_per_layer_rounding_in_one_tensor(fixed_scale: bool) -> None:
    """One flat V: the same h(V) per quantizer (learned steps: the quantizers read it), the
    regularizer as the mean over layers of each layer's mean (from refresh, fused with the soft
    weights where the steps are fixed), gradients reaching V, and V copied back into each quantizer."""
    quantizers, weights = _learned_rounding_quantizers(1, [(6, 5), (3, 2, 3, 3), (4,)], bits=4, fixed_scale=fixed_scale)
    expected_h = [rectified_sigmoid(q.rounding.detach()) for q in quantizers]
    expected_reg = sum(float(q.regularizer(7.0)) / q.codes.numel() for q in quantizers) / len(quantizers)
    bank = RoundingBank(quantizers)
    assert float(bank.refresh().detach()) == 0.0
    reg = bank.refresh(7.0)
    for q, h in zip(quantizers, expected_h):
        if fixed_scale:
            assert q.h is None and q.soft is not None
        else:
            torch.testing.assert_close(q.h, h)
    assert float(reg.detach()) == pytest.approx(expected_reg, rel=1e-5)
    assert float(bank.regularizer(7.0)) == pytest.approx(expected_reg, rel=1e-5)
    (sum(q(w).sum() for q, w in zip(quantizers, weights)) + reg).backward()
    assert bank.v.grad is not None and bool((bank.v.grad != 0).any())
    h = rectified_sigmoid(bank.v.detach())
    split = torch.split(h, bank.sizes)
    counts = {q.name: int(((p > 0.01) & (p < 0.99)).sum()) for q, p in zip(quantizers, split)}
    assert bank.undecided() == {k: v for k, v in counts.items() if v} and sum(counts.values()) > 0
    with torch.no_grad():
        bank.v.add_(0.5)
    bank.write_back()
    for q in quantizers:
        assert q.h is None
    torch.testing.assert_close(torch.cat([q.rounding.reshape(-1) for q in quantizers]), bank.v.detach())


def test_rounding_bank_soft_weights_equal_each_quantizers_own() -> None:
    """With fixed steps the bank's one fused node gives every quantizer its own soft weight (up to
    float rounding: the fused kernel does not contract floor + h * room into one rounding), and
    gradients through the views reach V."""
    quantizers, weights = _learned_rounding_quantizers(4, [(5, 3), (4, 2, 3, 3), (7,)], bits=3)
    with torch.no_grad():
        own = [q(w) for q, w in zip(quantizers, weights)]  # before the bank: each quantizer's addcmul
    bank = RoundingBank(quantizers)
    bank.refresh()
    for q, w, expected in zip(quantizers, weights, own):
        assert q.soft is not None
        torch.testing.assert_close(q(w), expected, rtol=0, atol=1e-7)
    sum(q(w).square().sum() for q, w in zip(quantizers, weights)).backward()
    assert bank.v.grad is not None and bool((bank.v.grad != 0).any())
    bank.write_back()
    assert all(q.soft is None for q in quantizers)


def test_bias_bank_rounds_like_the_bias_quantizers_and_writes_back(calib_for) -> None:
    """The bank's biases equal what each op's own bias quantizer computes (int32 grid, element for
    element), gradients reach the one flat tensor, and write_back puts the trained values into the ops."""
    from eptq_onnx.twin.weighted import WeightedOp
    from eptq_onnx.eptq.banks import BiasBank

    model = zoo.residual_cnn()
    twin, names = _initialized_twin(model, calib_for)
    ops = [m for m in twin.student.modules() if isinstance(m, WeightedOp) and m.bias is not None]
    assert ops and all(op.bias_quant is not None for op in ops)
    with torch.no_grad():
        for op in ops:  # values off the int32 grid, so that rounding shows
            op.bias.add_(torch.linspace(-0.3, 0.3, op.bias.numel()).view_as(op.bias) * 1e-3)
        own = [op.effective_bias().clone() for op in ops]
    bank = BiasBank(ops)
    bank.fix_steps()
    bank.refresh()
    for op, expected in zip(ops, own):
        assert torch.equal(op.effective_bias(), expected)
    assert not torch.equal(own[0], ops[0].bias.detach())  # the grid rounds
    bank.b.requires_grad_(True)
    sum(op.effective_bias().sum() * (i + 1) for i, op in enumerate(ops)).backward()
    assert torch.equal(bank.b.grad, torch.cat([torch.full((op.bias.numel(),), float(i + 1)) for i, op in enumerate(ops)]))
    with torch.no_grad():
        bank.b.add_(0.25)
    bank.write_back()
    for op, expected in zip(ops, own):
        assert op.trained_bias is None
    torch.testing.assert_close(torch.cat([op.bias.detach().reshape(-1) for op in ops]), bank.b.detach())


def test_on_grid_quantizers_are_the_identity_only_while_training(calib_for) -> None:
    """After a data-movement op of a quantized tensor (here the attention heads' Reshape and
    Transpose) the group's quantizer returns on-grid values unchanged: while training with a fixed
    step it is skipped (identity, gradient passing), otherwise it is the quantizer."""
    from eptq_onnx.twin.fake_quant import OnGridFakeQuant

    twin, _ = _initialized_twin(zoo.transformer_block(), calib_for)
    on_grid = [m for m in twin.student.modules() if isinstance(m, OnGridFakeQuant)]
    assert on_grid
    quantizer = on_grid[0]._quantizer[0]
    step, zero = quantizer.fixed_step
    codes = torch.randint(quantizer.qmin, quantizer.qmax + 1, (4, 30)).float()
    x = ((codes - zero) * step).requires_grad_()
    y = on_grid[0](x)
    assert y is x  # training, fixed step: skipped
    with torch.no_grad():
        assert torch.equal(on_grid[0](x), quantizer(x)) and torch.equal(quantizer(x), x)  # the values are on the grid
        off = x + step / 3
        assert torch.equal(on_grid[0](off), quantizer(off)) and not torch.equal(on_grid[0](off), off)


def _initialized_twin(model, calib_for):  # type: ignore[no-untyped-def]
    """The torch twin of ``model``'s MSE-initialized W8A8 state, tapped at EPTQ's loss tensors."""
    from eptq_onnx.eptq.stage import loss_tensors

    state = quantize(model, calib_for(model, 16), QuantConfig(optimize=OptimizeOptions(iters=0)), progress=False).state
    names = loss_tensors(state.float_model, state.plan)
    return build_twin(state.float_model, state.plan, state.weights, state.acts, taps=names), names


def test_batches_read_a_generator_once_like_a_list() -> None:
    """Streamed calibration batches (a generator, read once) stack to the same tensors as a list."""
    from eptq_onnx.eptq.batches import Batches

    model = zoo.mlp()
    feeds = [zoo.sample_inputs(model, 4, seed=s) for s in range(3)]
    listed, streamed = Batches(feeds, "cpu", 0), Batches((f for f in feeds), "cpu", 0)
    assert streamed.count == listed.count == 12
    for name, tensor in listed.tensors().items():
        assert torch.equal(streamed.tensors()[name], tensor)


def test_cached_reconstruction_equals_the_per_tensor_loss(calib_for) -> None:
    """Eq. 6 against the teacher cache's rows equals Eq. 6 against the teacher run on the fly."""
    from eptq_onnx.eptq.optimizer import start_rounding
    from eptq_onnx.eptq.objective import Objective
    from eptq_onnx.eptq.batches import Batches, TeacherCache

    model = zoo.residual_cnn()
    twin, names = _initialized_twin(model, calib_for)
    start_rounding(twin, fixed_scale=True)
    bank = RoundingBank(list(twin.weight_quant.values()))
    batches = Batches([zoo.sample_inputs(model, 16, seed=3)], "cpu", 0)
    weights = {n: 0.5 + i for i, n in enumerate(names)}
    plain = Objective(twin, weights, OptimizeOptions(), bank)
    cached = Objective(twin, weights, OptimizeOptions(), bank, cache=TeacherCache.build(twin, names, batches, 8, budget=2**30))
    assert cached.cache is not None
    batch = batches.sample(6)
    with torch.no_grad():
        expected = float(plain.reconstruction(batch))
        got = float(cached.reconstruction(batch))
    assert expected > 0 and got == pytest.approx(expected, rel=1e-5)
    # with grad, most terms come from the taps fused with their fake quantizer: the same loss and
    # gradient as the recorded tensors' weighted_mse
    from eptq_onnx.eptq.kernels import weighted_mse
    from eptq_onnx.twin.taps import QuantTap

    assert sum(isinstance(m, QuantTap) for m in twin.student.modules()) >= len(names) // 2
    fused = cached.reconstruction(batch)
    fused.backward()
    fused_grad = bank.v.grad.clone()
    bank.v.grad = None
    with torch.no_grad():
        _, teacher = twin.teacher.run(batch[1], names)
    bank.refresh()
    _, student = twin.student.run(batch[1], names)
    separate = weighted_mse([student[n] for n in names], [teacher[n] for n in names], [weights[n] for n in names])
    separate.backward()
    assert float(fused) == pytest.approx(float(separate), rel=1e-6)
    torch.testing.assert_close(fused_grad, bank.v.grad, rtol=1e-5, atol=1e-12)


def test_beta_schedule_warmup_then_linear_anneal_then_settle() -> None:
    options = OptimizeOptions()
    assert beta_at(0, 100, options) is None and beta_at(19, 100, options) is None
    assert beta_at(20, 100, options) == pytest.approx(20.0)
    assert beta_at(50, 100, options) == pytest.approx(20.0 - 18.0 * 30.0 / 60.0)
    assert beta_at(80, 100, options) == pytest.approx(2.0) and beta_at(99, 100, options) == pytest.approx(2.0)
    # long runs settle for settle_steps (100) only: 2000 steps anneal from 400 to 1900
    assert beta_at(1150, 2000, options) == pytest.approx(11.0) and beta_at(1900, 2000, options) == pytest.approx(2.0)
    to_the_end = OptimizeOptions(anneal_end=1.0, settle_steps=0)  # AdaRound's schedule
    assert beta_at(99, 100, to_the_end) == pytest.approx(2.0 + 18.0 / 80.0)


@pytest.mark.parametrize("weighting", ["lfh", "uniform"])
def test_optimized_model_written_back_matches_the_student(weighting: str, calib_for) -> None:
    """After optimization the QDQ file holds exactly what the student computes (issue: write-back)."""
    model = zoo.residual_cnn()
    options = OptimizeOptions(iters=12, weighting=weighting, hessian_samples=2, hessian_draws=3, batch_size=8, discard_if_worse=False)
    config = QuantConfig(weight_bits=4, optimize=options)
    result = quantize(model, calib_for(model, 16), config, progress=False)
    report = result.report
    assert report.optimization["iters"] == 12 and report.optimization["batch_size"] == 8
    assert (report.hessian != {}) == (weighting == "lfh")
    state = result.state
    twin = build_twin(state.float_model, state.plan, state.weights, state.acts)
    feeds = zoo.sample_inputs(model, 3, seed=4)
    with torch.no_grad():
        mine = twin.student(to_tensors(feeds))[0].numpy()
    theirs = make_session(result.model, optimize=False).run(None, feeds)[0]
    assert np.linalg.norm(mine - theirs) / np.linalg.norm(theirs) < 2e-2
    # the learned biases went into the file (int32 codes changed for at least one layer)
    init = quantize(model, calib_for(model, 16, name="c2"), QuantConfig(weight_bits=4, optimize=OptimizeOptions(iters=0)), progress=False)
    q_after = {t.name: t for t in result.model.graph.initializer if t.name.endswith("_quantized")}
    q_before = {t.name: t for t in init.model.graph.initializer if t.name.endswith("_quantized")}
    assert any(q_after[k].SerializeToString() != q_before[k].SerializeToString() for k in q_after)


def test_output_regression_names_the_drop_and_ignores_gains() -> None:
    before = {"logits": 20.0, "hidden": 30.0}
    assert output_regression(before, {"logits": 21.0, "hidden": 10.0}, ["logits"]) is None
    why = output_regression(before, {"logits": 18.5, "hidden": 40.0}, ["logits"])
    assert why is not None and "18.50 dB" in why and "20.00 dB" in why
    assert output_regression(before, {"logits": 0.0}, []) is None


def test_the_optimized_state_is_checked_on_held_out_files(calib_for, monkeypatch: pytest.MonkeyPatch) -> None:
    """The keep-or-discard check measures calibration files the optimization never saw (the last quarter,
    at most 16); one file cannot spare any, and then the check says so."""
    import eptq_onnx.eptq.stage as stage

    trained: list = []
    real = stage.optimize

    def counting(twin, batches, *args, **kwargs):  # type: ignore[no-untyped-def]
        batches = list(batches)
        trained.append(sum(next(iter(b.values())).shape[0] for b in batches))
        return real(twin, iter(batches), *args, **kwargs)

    monkeypatch.setattr(stage, "optimize", counting)
    model = zoo.mlp()
    options = OptimizeOptions(iters=2, batch_size=4, hessian_samples=2, hessian_draws=2)
    result = quantize(model, calib_for(model, 20), QuantConfig(optimize=options), progress=False)
    opt = result.report.optimization
    assert (opt["check_samples"], opt["check_held_out"], trained) == (5, True, [15])
    one = calib_for(model, 1, name="one")
    result = quantize(model, one, QuantConfig(optimize=options), progress=False)
    assert (result.report.optimization["check_samples"], result.report.optimization["check_held_out"]) == (1, False)


def test_a_worse_optimization_is_discarded_loudly(calib_for) -> None:
    """With lambda so large that rounding is forced at once (from the float weights, away from the
    init's GPTQ codes), the result is discarded for the init."""
    model = zoo.residual_cnn()
    calib = calib_for(model, 16)
    options = OptimizeOptions(iters=6, weighting="uniform", batch_size=8, reg_lambda=1e9, lr_rounding=1.0, warmup=0.0,
                              rounding_start="float")
    result = quantize(model, calib, QuantConfig(weight_bits=3, optimize=options), progress=False)
    init = quantize(model, calib, QuantConfig(weight_bits=3, optimize=OptimizeOptions(iters=0)), progress=False)
    kept = result.report.optimization["kept_init"]
    assert kept is not None and "below the MSE-initialized" in kept
    assert any(w.startswith("FALLBACK: EPTQ result discarded") for w in result.report.warnings)
    assert result.model.SerializeToString() == init.model.SerializeToString()


def test_cli_optimization_writes_report_and_plots(tmp_path: Path, calib_for) -> None:
    model = zoo.mlp()
    import onnx

    src = tmp_path / "mlp.onnx"
    onnx.save(model, src)
    out, report, plots = tmp_path / "q.onnx", tmp_path / "r.json", tmp_path / "plots"
    result = CliRunner().invoke(main, [str(src), str(out), "--calib", str(calib_for(model, 16)), "--iters", "6",
                                       "--hessian-samples", "2", "--hessian-draws", "3", "--opt-batch-size", "4",
                                       "--report", str(report), "--plots", str(plots), "-q"])
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert data["optimization"]["iters"] == 6 and len(data["optimization"]["curve"]) >= 2
    assert set(data["hessian"]["normalized"]) == set(data["optimization"]["loss_weights"])
    assert all(0.0 <= v <= 1.0 for v in data["hessian"]["normalized"].values())
    for name in ("lfh.png", "loss.png"):
        assert (plots / name).stat().st_size > 1000


def test_hessian_trace_option_sums_positions_of_each_channel(tmp_path: Path, calib_for) -> None:
    """--hessian-trace channel (default) sums the Hutchinson gradient over each tensor's position axes:
    right before the global average pool that is exactly 64x the paper's elementwise trace (8x8
    positions, the same draws); --hessian-trace element is the paper's."""
    import onnx

    model = zoo.residual_cnn()
    src = tmp_path / "cnn.onnx"
    onnx.save(model, src)
    calib = calib_for(model, 8)
    pooled = next(n.input[0] for n in model.graph.node if n.op_type == "GlobalAveragePool")
    reports = {}
    for trace in ("channel", "element"):
        report = tmp_path / f"{trace}.json"
        args = [str(src), str(tmp_path / f"{trace}.onnx"), "--calib", str(calib), "--iters", "2", "--hessian-samples", "2",
                "--hessian-draws", "3", "--opt-batch-size", "4", "--report", str(report), "-q"]
        result = CliRunner().invoke(main, args + (["--hessian-trace", "element"] if trace == "element" else []))
        assert result.exit_code == 0, result.output
        reports[trace] = json.loads(report.read_text())["hessian"]
    channel, element = reports["channel"], reports["element"]
    assert element["position_axes"] == {} and channel["position_axes"][pooled] == [2, 3]
    assert channel["unknown_axes"] == [] and set(channel["position_axes"]) < set(channel["traces"])  # not the pooled/logits
    assert channel["traces"][pooled] == pytest.approx(64 * element["traces"][pooled], rel=1e-6)
    assert channel["normalized"] != element["normalized"]


def test_interrupt_during_optimization_writes_nothing(tmp_path: Path, calib_for, monkeypatch) -> None:
    import onnx

    import eptq_onnx.eptq.stage as eptq_stage

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(eptq_stage, "optimize", interrupted)
    model = zoo.mlp()
    src = tmp_path / "mlp.onnx"
    onnx.save(model, src)
    out = tmp_path / "q.onnx"
    result = CliRunner().invoke(main, [str(src), str(out), "--calib", str(calib_for(model, 8)), "--iters", "3",
                                       "--weighting", "uniform", "-q"])
    assert result.exit_code == 130 and "interrupted" in result.output
    assert not out.exists() and list(tmp_path.glob("q.onnx*")) == []


def test_bad_optimization_options_are_usage_errors() -> None:
    from eptq_onnx import UsageError

    with pytest.raises(UsageError):
        QuantConfig(optimize=OptimizeOptions(iters=-1))
    with pytest.raises(UsageError):
        QuantConfig(optimize=OptimizeOptions(time_budget_min=0))
    with pytest.raises(UsageError, match="anneal_end"):
        QuantConfig(optimize=OptimizeOptions(warmup=0.5, anneal_end=0.4))
    with pytest.raises(UsageError, match="hessian-trace"):
        QuantConfig(optimize=OptimizeOptions(hessian_trace="diagonal"))  # type: ignore[arg-type]


class _FakeObjective:
    """A 'step' that sleeps a fixed time: enough for choose_iters."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.p = torch.ones((), requires_grad=True)

    def losses(self, batch, beta):  # type: ignore[no-untyped-def]
        import time

        time.sleep(self.seconds)
        return self.p * 2.0, self.p * 0.0


class _FakeBatches:
    def sample(self, size: int):  # type: ignore[no-untyped-def]
        return None, {}


def test_time_budget_counts_the_whole_run() -> None:
    import time

    from eptq_onnx.eptq.schedule import RESERVE, STEP_OVERHEAD, choose_iters

    options = OptimizeOptions(time_budget_min=0.05)  # 3 s
    step = 0.01
    iters, measured, scale, why = choose_iters(_FakeObjective(step), _FakeBatches(), options, started_at=time.perf_counter())
    assert scale == pytest.approx(2.0) and measured >= step
    assert iters <= 3 * (1 - RESERVE) / (step * STEP_OVERHEAD) and iters > 100 and f"chose {iters}" in why
    # stages before the optimization used the budget up: the fewest steps, and the reason says so
    iters, *_, why = choose_iters(_FakeObjective(step), _FakeBatches(), options, started_at=time.perf_counter() - 10)
    assert iters == 1 and "0 steps fit" in why


class _FakeClock:
    """Stands in for optimize's ``time`` module: every perf_counter() call advances ``tick`` seconds."""

    def __init__(self, tick: float) -> None:
        self.now, self.tick = 0.0, tick

    def perf_counter(self) -> float:
        self.now += self.tick
        return self.now


class _FakeOptimizer:
    def zero_grad(self, set_to_none: bool = True) -> None:
        pass

    def step(self) -> None:
        pass


@pytest.mark.parametrize("planned,expected", [(50, 1000), (5000, 200)])
def test_time_budgeted_loop_replans_from_its_own_step_times(planned: int, expected: int, monkeypatch) -> None:
    """Steps of 10 ms and 10 s left: a plan of 50 steps (pessimistic pre-loop timing) grows to ~1000,
    one of 5000 (optimistic) shrinks to ~200 from a 2 s deadline; the loop runs exactly that many."""
    from eptq_onnx.eptq import optimize as opt
    from eptq_onnx.eptq.checkpoint import LoopState

    clock = _FakeClock(0.01)
    monkeypatch.setattr(opt, "time", clock)
    objective = _FakeObjective(0.0)
    objective.twin = types.SimpleNamespace(student=None)  # type: ignore[attr-defined]
    options = OptimizeOptions(max_iters=20000)
    loop = LoopState(step=0, iters=planned, loss_scale=1.0, step_seconds=0.1, why="planned")
    deadline = (10.0 if expected == 1000 else 2.0) + clock.tick
    messages: list = []
    opt._run_loop(objective, _FakeOptimizer(), _FakeBatches(), loop, options, None, False, deadline, messages.append)
    assert loop.replanned and len(messages) == 1 and "re-planned at step" in loop.why  # steady steps: one change
    assert abs(loop.iters - expected) <= 0.02 * expected and loop.step == loop.iters
    # without a deadline (--iters) the plan stands
    fixed = LoopState(step=0, iters=40, loss_scale=1.0, step_seconds=0.1, why="asked")
    opt._run_loop(objective, _FakeOptimizer(), _FakeBatches(), fixed, options, None, False, None, messages.append)
    assert fixed.iters == 40 and fixed.step == 40 and not fixed.replanned


def test_teacher_cache_precision_follows_the_budget(calib_for) -> None:
    from eptq_onnx.eptq.batches import Batches, TeacherCache

    model = zoo.mlp()
    twin, names = _initialized_twin(model, calib_for)
    feeds = [zoo.sample_inputs(model, 16, seed=3)]
    batches = Batches(feeds, "cpu", 0)
    elements = sum(twin.teacher.run(to_tensors(zoo.sample_inputs(model, 1, seed=3)), names)[1][n].numel() for n in names) * 16
    full = TeacherCache.build(twin, names, batches, 5, budget=elements * 4)
    half = TeacherCache.build(twin, names, batches, 5, budget=elements * 4 - 1)
    assert TeacherCache.build(twin, names, batches, 5, budget=elements * 2 - 1) is None
    assert full is not None and half is not None
    assert full.matrix.dtype == torch.float32 and half.matrix.dtype == torch.float16 and half.nbytes() == elements * 2
    index = torch.tensor([3, 0, 7])
    with torch.no_grad():
        _, expected = twin.teacher.run({k: v[index] for k, v in batches.stacked.items()}, names)
    rows = torch.cat([expected[n].reshape(3, -1) for n in names], dim=1)
    torch.testing.assert_close(full.get(index), rows)
    torch.testing.assert_close(half.get(index), rows, rtol=2e-3, atol=1e-4)


def test_bias_updates_stay_bounded_from_the_first_step(calib_for) -> None:
    """Float biases, 16-bit activations: the initial loss is tiny and its gradients huge; Adam keeps
    every bias update near lr (RAdam's momentum-SGD first steps moved a bias by 4e5)."""
    from onnx import numpy_helper

    model = zoo.residual_cnn()
    options = OptimizeOptions(iters=3, weighting="uniform", batch_size=8, discard_if_worse=False)
    config = QuantConfig(weight_bits=8, act_bits=16, quantize_bias=False, target="generic", optimize=options)
    result = quantize(model, calib_for(model, 16), config, progress=False)
    init = quantize(model, calib_for(model, 16, name="c2"), QuantConfig(weight_bits=8, act_bits=16, quantize_bias=False,
                                                                        target="generic", optimize=OptimizeOptions(iters=0)),
                    progress=False)
    before = {t.name: numpy_helper.to_array(t) for t in init.state.float_model.graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in result.state.float_model.graph.initializer}
    biases = [p.bias for p in result.state.plan.weights if p.bias]
    assert biases
    moved = max(float(np.abs(after[b] - before[b]).max()) for b in biases)
    assert 0 < moved <= 3 * options.lr_bias * 1.01


def test_a_run_too_short_to_decide_the_rounding_is_reported(calib_for) -> None:
    """Rounding variables left between 0 and 1 are counted per weight in the report and warned about."""
    model = zoo.mlp()
    options = OptimizeOptions(iters=3, weighting="uniform", batch_size=8, discard_if_worse=False)
    result = quantize(model, calib_for(model, 16), QuantConfig(weight_bits=4, optimize=options), progress=False)
    undecided = result.report.optimization["undecided_rounding"]
    assert undecided and all(count > 0 for count in undecided.values())
    assert any("rounding variables were still undecided" in w for w in result.report.warnings)


def _fixed_batch_reshape_model():  # type: ignore[no-untyped-def]
    """x [1, 8] -> MatMul -> Reshape to the constant [1, 4, 4] -> Relu -> Reshape [1, 16] -> MatMul:
    the batch dim is fixed at 1 and baked into the Reshape constants, as exporters write it."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, (8, 16)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(0, 0.5, (16, 4)).astype(np.float32), "w2"),
             numpy_helper.from_array(np.array([1, 4, 4], np.int64), "s3"),
             numpy_helper.from_array(np.array([1, 16], np.int64), "s2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["m1"], name="fc1"),
             helper.make_node("Reshape", ["m1", "s3"], ["r1"], name="to3d"),
             helper.make_node("Relu", ["r1"], ["h1"], name="relu"),
             helper.make_node("Reshape", ["h1", "s2"], ["r2"], name="to2d"),
             helper.make_node("MatMul", ["r2", "w2"], ["y"], name="fc2")]
    graph = helper.make_graph(nodes, "fixed_batch", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def test_a_model_with_its_batch_fixed_at_one_is_optimized_one_sample_a_step(calib_for) -> None:
    """Minibatches are not stacked past the model's fixed batch (its Reshape constants hold the 1)."""
    model = _fixed_batch_reshape_model()
    calib = calib_for(model, 12)
    options = OptimizeOptions(iters=3, weighting="uniform", batch_size=8, discard_if_worse=False)
    result = quantize(model, calib, QuantConfig(weight_bits=4, optimize=options), progress=False)
    assert result.report.optimization["iters"] == 3
    assert not any("FALLBACK" in w for w in result.report.warnings)


def _two_output_model(second: str):  # type: ignore[no-untyped-def]
    """x [N, 8] -> MatMul w [8, 4] -> y, beside a second output computed without any weight:
    ``second`` = "relu" (z = Relu(x) [N, 8]) or "norm" (y's L2 norm, sqrt(sum(y * y)), as a power spectrum
    gives its magnitude)."""
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(5).normal(0, 0.5, (8, 4)).astype(np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")]
    if second == "relu":
        nodes.append(helper.make_node("Relu", ["x"], ["z"], name="relu"))
        z = helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 8])
    else:
        axes = numpy_helper.from_array(np.array([1], np.int64), "axes")
        nodes += [helper.make_node("Mul", ["y", "y"], ["power"], name="square"),
                  helper.make_node("ReduceSum", ["power", "axes"], ["energy"], name="sum", keepdims=1),
                  helper.make_node("Sqrt", ["energy"], ["z"], name="magnitude")]
        z = helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 1])
    graph = helper.make_graph(nodes, "two_outputs", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4]), z],
                              [w] + ([axes] if second == "norm" else []))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def test_a_tensor_no_learned_layer_reaches_is_no_loss_term(calib_for) -> None:
    """z = Relu(x) is equal in teacher and student: not a loss tensor. Were it one, its larger trace (8
    elements against y's 4) would leave y, the one tensor the rounding changes, the log-normalized weight 0."""
    from eptq_onnx.eptq.stage import loss_tensors

    model = _two_output_model("relu")
    calib = calib_for(model, 16)
    options = OptimizeOptions(iters=3, hessian_samples=2, hessian_draws=3, batch_size=8, discard_if_worse=False)
    result = quantize(model, calib, QuantConfig(weight_bits=4, optimize=options), progress=False)
    assert loss_tensors(result.state.float_model, result.state.plan) == ["y"]
    assert result.report.optimization["iters"] == 3 and result.report.optimization["loss_weights"] == {"y": 1.0}


def test_a_norm_of_exact_zeros_keeps_the_hessian_and_the_steps_finite(calib_for) -> None:
    """sqrt(sum(y * y)) at an all-zero input: d sqrt / dx = inf there, and inf * 0 = NaN would reach the
    weight's rounding variables; the twin's gradient guard at the Sqrt gives 0 instead."""
    from eptq_onnx.twin.finite_grad import finite_gradient

    x = torch.zeros(3, requires_grad=True)
    torch.sqrt(finite_gradient(x * x)).sum().backward()
    assert torch.equal(x.grad, torch.zeros(3))  # unguarded: NaN
    model = _two_output_model("norm")
    calib = calib_for(model, 16)
    np.savez(calib / "zero.npz", x=np.zeros(8, np.float32))  # a silent frame
    options = OptimizeOptions(iters=4, hessian_samples=17, hessian_draws=3, batch_size=17, discard_if_worse=False)
    result = quantize(model, calib, QuantConfig(weight_bits=4, optimize=options), progress=False)
    assert all(np.isfinite(t) for t in result.report.hessian["traces"].values())
    assert result.report.optimization["iters"] == 4 and not any("FALLBACK" in w for w in result.report.warnings)
    session = make_session(result.model)
    assert np.isfinite(session.run(None, {"x": np.ones((2, 8), np.float32)})[0]).all()


class _SlowingClock(_FakeClock):
    """Steps of ``tick`` seconds until ``at`` seconds have passed, then four times slower (a machine that gets busy)."""

    def __init__(self, tick: float, at: float) -> None:
        super().__init__(tick)
        self.at = at

    def perf_counter(self) -> float:
        self.now += self.tick if self.now < self.at else 4 * self.tick
        return self.now


def test_a_loop_that_slows_down_halfway_still_ends_near_its_deadline(monkeypatch) -> None:
    """10 ms steps for 5 s, then 40 ms: a plan made once (at 10 ms a step, 1000 steps in 10 s) would run
    until 5 + 500 * 0.04 = 25 s; re-planned as it goes, the loop ends within 5% of its 10 s."""
    from eptq_onnx.eptq import optimize as opt
    from eptq_onnx.eptq.checkpoint import LoopState

    clock = _SlowingClock(0.01, at=5.0)
    monkeypatch.setattr(opt, "time", clock)
    objective = _FakeObjective(0.0)
    objective.twin = types.SimpleNamespace(student=None)  # type: ignore[attr-defined]
    loop = LoopState(step=0, iters=1000, loss_scale=1.0, step_seconds=0.01, why="planned")
    deadline = clock.now + 10.0
    messages: list = []
    opt._run_loop(objective, _FakeOptimizer(), _FakeBatches(), loop, OptimizeOptions(max_iters=20000), None, False,
                  deadline, messages.append)
    assert loop.step == loop.iters and abs(clock.now - deadline) <= 0.05 * 10.0, (clock.now, loop.iters)
    assert len(messages) >= 1 and "re-planned at step" in loop.why


def test_eptq_starts_from_the_given_biases_with_the_float_model_as_teacher(calib_for) -> None:
    """run_eptq(start=...): the student starts from ``start``'s biases (bias correction's, as --iters 0
    writes them), so the check's "before" is onnxruntime's SQNR of start's fake-quant model against
    the float model, while the teacher stays the float model (the LFH does not see start's biases)."""
    model = zoo.mlp()
    config = QuantConfig(weight_bits=4, optimize=OptimizeOptions(iters=1, hessian_samples=2, hessian_draws=2,
                                                                 batch_size=4))
    run = RunContext(config, Report(input="mlp", output=None, config={}), progress=False)
    float_model, plan, calib, candidates, acts = initial_state(run, model, calib_for(model, 16))
    weights = candidates[4]
    initializers = {t.name: onnx.numpy_helper.to_array(t) for t in float_model.graph.initializer}
    biases = {p.bias: initializers[p.bias] for p in plan.weights if p.bias}
    assert biases
    start = model_with_biases(float_model, {m: b + 0.3 * (np.abs(b).max() + 0.1) for m, b in biases.items()})
    quiet = dict(progress=False, log=lambda message: None)
    plain = run_eptq(float_model, plan, weights, acts, calib, config, **quiet)
    started = run_eptq(float_model, plan, weights, acts, calib, config, start=start, **quiet)
    output = float_model.graph.output[0].name
    check = list(calib.split(held_out_count(len(calib)))[1].batches(limit=config.validation_samples))
    reference = float_outputs_of(float_model, check)
    expected = output_sqnr_db(reference, float_outputs_of(fake_quant_model(start, plan, weights, acts), check))
    assert started.sqnr_before[output] == pytest.approx(expected, abs=0.05)
    assert abs(started.sqnr_before[output] - plain.sqnr_before[output]) > 1.0
    assert started.hessian.traces == pytest.approx(plain.hessian.traces)


def test_a_short_eptq_run_on_a_trained_model_is_kept_and_beats_its_init() -> None:
    """The demo CNN (trained on real digits) at W4A8: 30 EPTQ steps are kept (better on the held-out
    check samples) and the written model's output SQNR on the validation samples beats --iters 0's
    (26.7 against 24.1 dB when written)."""
    demo = Path(__file__).resolve().parents[1] / "models" / "demo"
    options = OptimizeOptions(iters=30, batch_size=16, hessian_samples=4, hessian_draws=4)
    result = quantize(demo / "digits_resnet.onnx", demo / "calib", QuantConfig(weight_bits=4, optimize=options),
                      progress=False)
    init = quantize(demo / "digits_resnet.onnx", demo / "calib",
                    QuantConfig(weight_bits=4, optimize=OptimizeOptions(iters=0)), progress=False)
    assert result.report.optimization["kept_init"] is None
    optimized = min(result.report.validation["output_sqnr_db"].values())
    initialized = min(init.report.validation["output_sqnr_db"].values())
    assert optimized > initialized + 1.0, (optimized, initialized)
