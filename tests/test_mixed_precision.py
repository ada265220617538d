"""Mixed precision: the ILP against brute force, budgets, sensitivities against onnxruntime, CLI runs."""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from rich.console import Console

from eptq_onnx import QuantConfig, quantize
from eptq_onnx.calib.data import CalibrationSet
from eptq_onnx.calib.specs import input_specs
from eptq_onnx.mixed.bit_allocation import (
    TIME_LIMIT_BEST,
    TIME_LIMIT_NONE,
    greedy_top_up,
    memory_bytes,
    objective,
    rank_allocation,
    resolve_budget,
    solve_ilp,
)
from eptq_onnx.cli import main
from eptq_onnx.config import MixedPrecisionOptions, OptimizeOptions
from eptq_onnx.errors import UsageError
from eptq_onnx.export.writer import write_qdq
from eptq_onnx.report import print_summary
from eptq_onnx.graph.runtime import make_session, run
from eptq_onnx.mixed.sensitivity import SearchInputs, measure_sensitivity, neighbour_pairs, weight_sizes
from eptq_onnx.export.validate import INT2_FUSION_OFF
from eptq_onnx.init.weights import init_weights
from models import zoo
from models.calib_files import write_calib

OPTIONS = (2, 4, 8)


def _random_instance(rng: np.random.Generator, layers: int, pairs: bool):
    names = [f"w{i}" for i in range(layers)]
    sizes = {n: int(rng.integers(10, 500)) for n in names}
    table = {}
    for n in names:
        s8 = float(rng.uniform(0, 0.01))
        s4 = s8 + float(rng.uniform(0, 1))
        table[n] = {8: s8, 4: s4, 2: s4 + float(rng.uniform(0, 5))}
    terms = None
    if pairs:
        terms = {(a, c): {(ba, bc): float(rng.normal(0, 0.5)) for ba in (2, 4) for bc in (2, 4)} for a, c in zip(names, names[1:])}
    return table, sizes, terms


def _brute_force(table, sizes, budget, pairs=None) -> float:
    best = np.inf
    names = list(table)
    for combo in itertools.product(OPTIONS, repeat=len(names)):
        bits = dict(zip(names, combo))
        if memory_bytes(bits, sizes) <= budget:
            best = min(best, objective(bits, table, pairs))
    return best


@pytest.mark.parametrize("pairs", [False, True])
def test_ilp_matches_brute_force_and_respects_the_budget(pairs: bool) -> None:
    rng = np.random.default_rng(1 + pairs)
    for _ in range(6):
        table, sizes, terms = _random_instance(rng, 5, pairs)
        elements = sum(sizes.values())
        for avg in (2.5, 3.0, 4.5, 6.0):
            budget = elements * avg / 8
            allocation = solve_ilp(table, sizes, budget, terms)
            assert allocation.status == "optimal"
            assert allocation.memory_bytes <= budget
            assert allocation.objective == pytest.approx(_brute_force(table, sizes, budget, terms), rel=1e-9, abs=1e-9)


def test_infeasible_budget_names_the_smallest_achievable_memory() -> None:
    table = {"a": {2: 3.0, 4: 1.0, 8: 0.0}, "b": {2: 3.0, 4: 1.0, 8: 0.0}}
    sizes = {"a": 100, "b": 60}
    with pytest.raises(UsageError, match=r"smallest achievable is 40 bytes"):
        solve_ilp(table, sizes, 39.0)
    assert solve_ilp(table, sizes, 40.0).bits == {"a": 2, "b": 2}


def test_time_limit_keeps_a_feasible_answer_and_tops_it_up() -> None:
    rng = np.random.default_rng(5)
    table, sizes, terms = _random_instance(rng, 600, pairs=True)
    budget = sum(sizes.values()) * 3.5 / 8
    allocation = solve_ilp(table, sizes, budget, terms, time_limit_s=0.01)
    assert allocation.status in (TIME_LIMIT_BEST, TIME_LIMIT_NONE)
    assert allocation.memory_bytes <= budget and allocation.upgrades
    smallest = objective(dict.fromkeys(table, 2), table, terms)
    assert allocation.objective < smallest


def test_greedy_top_up_spends_leftover_budget_on_the_largest_gain() -> None:
    table = {"a": {2: 5.0, 4: 1.0, 8: 0.5}, "b": {2: 9.0, 4: 2.0, 8: 0.0}, "c": {2: 1.0, 4: 1.0, 8: 1.0}}
    sizes = {"a": 8, "b": 8, "c": 8}
    bits = {"a": 2, "b": 2, "c": 2}  # 6 bytes; budget 12 leaves 6
    made = greedy_top_up(bits, table, sizes, 12.0)
    assert made[0] == ("b", 2, 8)  # gain 9 (the largest), 6 bytes: exactly the leftover
    assert bits == {"a": 2, "b": 8, "c": 2} and memory_bytes(bits, sizes) <= 12.0
    assert greedy_top_up({"a": 2, "b": 2, "c": 2}, table, sizes, 6.0) == []  # nothing left to spend


def test_lfh_rank_gives_the_widest_bits_to_the_most_sensitive_first() -> None:
    sizes = {"a": 100, "b": 100, "c": 100}
    allocation = rank_allocation({"a": 0.1, "b": 0.9, "c": 0.5}, sizes, OPTIONS, budget_bytes=300 * 4 / 8)
    assert allocation.bits == {"b": 8, "c": 2, "a": 2}  # b 8 bits takes 75 B of 150; c at 8 would need 150
    assert allocation.memory_bytes <= 150


def test_budget_forms() -> None:
    sizes = {"a": 1000, "b": 600}
    assert resolve_budget(sizes, None, 4.0) == 800.0
    assert resolve_budget(sizes, "12.5%", None) == pytest.approx(800.0)  # of 6400 float32 bytes
    assert resolve_budget(sizes, "800", None) == 800.0
    for bad in ("lots", "-5", "1.5"):
        with pytest.raises(UsageError, match="--weight-memory"):
            resolve_budget(sizes, bad, None)
    with pytest.raises(UsageError, match="exactly one budget"):
        MixedPrecisionOptions(weight_memory="10%", avg_weight_bits=4.0)
    with pytest.raises(UsageError, match="--bit-options"):
        MixedPrecisionOptions(bit_options=(4, 9), avg_weight_bits=4.0)


@pytest.fixture(scope="module")
def cnn_state(tmp_path_factory):
    """A residual CNN prepared for mixed precision (opset raised for INT2), its candidates and calibration."""
    model = zoo.residual_cnn()
    folder = write_calib(model, tmp_path_factory.mktemp("calib"), 16)
    config = QuantConfig(weight_init="mse", optimize=OptimizeOptions(iters=0, hessian_samples=2, hessian_draws=3),
                         mixed=MixedPrecisionOptions(avg_weight_bits=8.0, samples=8))
    state = quantize(model, folder, config, progress=False).state
    candidates = {b: init_weights(state.float_model, state.plan, b, "mse") for b in OPTIONS}
    calib = CalibrationSet(folder, input_specs(state.float_model), config.calib)
    return state, candidates, calib, SearchInputs(state.float_model, state.plan, candidates, state.acts, calib, state.config)


def test_sensitivity_grows_as_bits_shrink(cnn_state) -> None:
    state, candidates, calib, inputs = cnn_state
    sens = measure_sensitivity(inputs, samples=8, progress=False)
    assert set(sens.table) == set(weight_sizes(state.float_model, state.plan))
    for name, row in sens.table.items():
        assert row[2] > row[8], name
        assert row[2] >= row[4], name
    assert sens.evaluations == 1 + 2 * len(sens.table) and sens.samples == 8
    assert sens.lfh and all(t in sens.lfh for t in sens.layer_tensor.values())


def test_output_sensitivity_equals_onnxruntime_on_the_written_model(cnn_state) -> None:
    """s(l, 2) with the plain output metric = the output MSE onnxruntime measures on the QDQ file
    with l at 2 bits and every other weight at 8."""
    state, candidates, calib, inputs = cnn_state
    sens = measure_sensitivity(inputs, metric="output", samples=8, progress=False)
    feeds = next(calib.batches(batch_size=8, limit=8))
    reference = run(make_session(state.float_model, optimize=False), feeds)
    for name in list(sens.table)[:3]:
        weights = {**candidates[8], name: candidates[2][name]}
        qdq, _ = write_qdq(state.float_model, state.plan, weights, state.acts)
        out = run(make_session(qdq, optimize=False, config=INT2_FUSION_OFF), feeds)
        expected = sum(float(np.mean((reference[k].astype(np.float64) - out[k]) ** 2)) for k in reference)
        assert sens.table[name][2] == pytest.approx(expected, rel=0.02), name


def test_pair_terms_cover_neighbouring_layers(cnn_state) -> None:
    state, candidates, calib, inputs = cnn_state
    pairs = neighbour_pairs(state.float_model, state.plan)
    order = [p.weight for p in state.plan.weights]
    assert pairs and all(order.index(a) < order.index(b) for a, b in pairs)
    assert (order[0], order[1]) in pairs  # the stem conv feeds the next conv
    sens = measure_sensitivity(inputs, metric="output", samples=8, pairs=pairs[:2], progress=False)
    assert set(sens.pairs) == set(pairs[:2]) and all(len(t) == 4 for t in sens.pairs.values())
    assert sens.evaluations == 1 + 2 * len(sens.table) + 4 * 2
    assert any(abs(v) > 0 for t in sens.pairs.values() for v in t.values())


def _cli(*args) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def cnn_files(tmp_path_factory) -> tuple[Path, Path, Path]:
    folder = tmp_path_factory.mktemp("cnn")
    model = zoo.residual_cnn()
    onnx.save(model, folder / "cnn.onnx")
    return folder, folder / "cnn.onnx", write_calib(model, folder / "calib", 16)


FAST = ("--iters", "0", "--hessian-samples", "2", "--hessian-draws", "3", "--sensitivity-samples", "8", "--quiet")


@pytest.mark.parametrize("storage", ["native", "int8"])
def test_cli_mixed_precision_writes_each_weight_at_its_bits(cnn_files, storage: str) -> None:
    folder, model, calib = cnn_files
    out, report_path = folder / f"mp_{storage}.onnx", folder / f"mp_{storage}.json"
    code, text = _cli(model, out, "--calib", calib, "--mixed-precision", "--avg-weight-bits", "5",
                      "--weight-storage", storage, "--report", report_path, "--force", *FAST)
    assert code == 0, text
    report = json.loads(report_path.read_text())
    mixed = report["mixed_precision"]
    chosen = {layer["weight"]: layer["bits"] for layer in mixed["layers"]}
    assert len(set(chosen.values())) >= 2 and mixed["memory_bytes"] <= mixed["budget_bytes"]
    assert mixed["memory_bytes"] == sum(layer["elements"] * layer["bits"] for layer in mixed["layers"]) / 8
    types = {t.name: t.data_type for t in onnx.load(out).graph.initializer}
    native = {2: onnx.TensorProto.INT4, 4: onnx.TensorProto.INT4, 8: onnx.TensorProto.INT8}  # ort-cpu: 2 bits in INT4
    for name, bits in chosen.items():
        assert types[f"{name}_quantized"] == (native[bits] if storage == "native" else onnx.TensorProto.INT8)
    assert all(v > 5 for v in report["validation"]["output_sqnr_db"].values())  # validated by onnxruntime


def test_cli_mixed_precision_file_shrinks_with_the_budget(cnn_files) -> None:
    folder, model, calib = cnn_files
    sizes = {}
    for avg in ("3", "7"):
        out = folder / f"mp_avg{avg}.onnx"
        code, text = _cli(model, out, "--calib", calib, "--mixed-precision", "--avg-weight-bits", avg, "--force", *FAST)
        assert code == 0, text
        sizes[avg] = out.stat().st_size
    w8 = folder / "w8.onnx"
    assert _cli(model, w8, "--calib", calib, "--weight-bits", "8", "--force", "--iters", "0", "--quiet")[0] == 0
    assert sizes["3"] < sizes["7"] <= w8.stat().st_size


@pytest.mark.parametrize("args, message", [
    (("--mixed-precision", "--weight-memory", "10"), "infeasible: the smallest achievable is"),
    (("--mixed-precision",), "exactly one budget"),
    (("--mixed-precision", "--avg-weight-bits", "4", "--weight-memory", "20%"), "exactly one budget"),
    (("--avg-weight-bits", "4"), "need --mixed-precision"),
    (("--mixed-precision", "--avg-weight-bits", "4", "--bit-options", "2,x"), "--bit-options"),
])
def test_cli_mixed_precision_bad_input_exits_2_without_output(cnn_files, args, message: str) -> None:
    folder, model, calib = cnn_files
    out = folder / "never.onnx"
    code, text = _cli(model, out, "--calib", calib, *args, *FAST)
    assert code == 2 and message in text and not out.exists(), text


def test_eptq_optimizes_at_the_chosen_bits(cnn_files) -> None:
    """Algorithm 1: search first, then optimize; the optimized weights keep their chosen widths."""
    folder, model, calib = cnn_files
    config = QuantConfig(optimize=OptimizeOptions(iters=6, hessian_samples=2, hessian_draws=3, batch_size=8),
                         mixed=MixedPrecisionOptions(avg_weight_bits=4.0, samples=8))
    result = quantize(model, calib, config, progress=False)
    chosen = {layer["weight"]: layer["bits"] for layer in result.report.mixed_precision["layers"]}
    assert result.report.optimization["iters"] == 6
    for name, wq in result.state.weights.items():
        u8s8 = result.report.u8s8_range.get("weight_bits", 8)  # ort-cpu's U8S8 range of 8-bit weights (targets.with_reduce_range)
        assert wq.bits == (u8s8 if chosen[name] == 8 else chosen[name])
        assert wq.codes.min() >= -(1 << (wq.bits - 1)) and wq.codes.max() <= (1 << (wq.bits - 1)) - 1


def test_cli_pairwise_adds_the_measured_pairs_to_the_report(cnn_files) -> None:
    folder, model, calib = cnn_files
    out, report_path = folder / "mp_pairs.onnx", folder / "mp_pairs.json"
    code, text = _cli(model, out, "--calib", calib, "--mixed-precision", "--avg-weight-bits", "4", "--pairwise",
                      "--sensitivity-metric", "output", "--report", report_path, "--force", *FAST)
    assert code == 0, text
    mixed = json.loads(report_path.read_text())["mixed_precision"]
    pairs = mixed["sensitivity"]["pairs"]
    assert pairs and all(set(p["interaction"]) == {"2,2", "2,4", "4,2", "4,4"} for p in pairs)
    layers = len(mixed["layers"])
    assert mixed["sensitivity"]["evaluations"] == 1 + 2 * layers + 4 * len(pairs)
    assert mixed["memory_bytes"] <= mixed["budget_bytes"]


def test_restricted_sensitivities_equal_a_measurement_at_fewer_widths(cnn_state) -> None:
    """Sensitivities measured once over {2, 4, 8} serve a search over {2, 8} (the bench reuses them across
    budgets and option sets): the same numbers as measuring {2, 8} alone."""
    state, candidates, calib, inputs = cnn_state
    pairs = neighbour_pairs(state.float_model, state.plan)[:1]
    full = measure_sensitivity(inputs, metric="output", samples=8, pairs=pairs, progress=False)
    fewer = SearchInputs(state.float_model, state.plan, {b: candidates[b] for b in (2, 8)}, state.acts, calib, state.config)
    alone = measure_sensitivity(fewer, metric="output", samples=8, pairs=pairs, progress=False)
    sub = full.restricted((2, 8))
    assert set(b for row in sub.table.values() for b in row) == {2, 8}
    for name, row in alone.table.items():
        assert sub.table[name] == pytest.approx(row, rel=1e-9, abs=1e-12), name
    assert set(sub.pairs[pairs[0]]) == {(2, 2)}
    assert sub.pairs[pairs[0]][2, 2] == pytest.approx(alone.pairs[pairs[0]][2, 2], rel=1e-6, abs=1e-12)
    assert set(full.table[next(iter(full.table))]) == {2, 4, 8}  # the original is untouched
    with pytest.raises(ValueError, match="not a subset"):
        full.restricted((2, 4))  # a different widest width changes what the other weights sat at


def test_eptq_reuses_the_search_lfh(cnn_files, monkeypatch) -> None:
    """MP + EPTQ computes the Label-Free Hessian once (in the search); the EPTQ stage's result is the
    one it would have computed itself."""
    from eptq_onnx import pipeline
    from eptq_onnx.eptq import stage as eptq
    from eptq_onnx.mixed import sensitivity

    folder, model, calib = cnn_files
    config = QuantConfig(optimize=OptimizeOptions(iters=4, hessian_samples=2, hessian_draws=3, batch_size=8,
                                                  discard_if_worse=False),
                         mixed=MixedPrecisionOptions(avg_weight_bits=4.0, samples=8))
    calls = []
    original = eptq.compute_lfh

    def counted(*args, **kwargs):
        calls.append(args[3])
        return original(*args, **kwargs)

    monkeypatch.setattr(eptq, "compute_lfh", counted)
    monkeypatch.setattr(sensitivity, "compute_lfh", counted)
    reused = quantize(model, calib, config, progress=False)
    assert len(calls) == 1  # the search's; run_eptq took it over
    run_eptq = pipeline.run_eptq
    monkeypatch.setattr(pipeline, "run_eptq", lambda *a, lfh=None, **k: run_eptq(*a, **k))  # no hand-over
    fresh = quantize(model, calib, config, progress=False)
    assert len(calls) == 3 and calls[1] == calls[2]  # search and EPTQ each computed it, at the same tensors
    assert reused.report.hessian["traces"] == fresh.report.hessian["traces"]
    assert reused.report.optimization["loss_weights"] == fresh.report.optimization["loss_weights"]
    for name, wq in fresh.state.weights.items():
        np.testing.assert_array_equal(reused.state.weights[name].codes, wq.codes)
        np.testing.assert_array_equal(reused.state.weights[name].scale, wq.scale)


def test_joint_distance_of_an_allocation_against_the_additive_prediction(cnn_state) -> None:
    """With one weight below the widest width the additive model is exact (the same measurement); with
    every weight at 2 bits the measured distance differs from the prediction."""
    state, candidates, calib, inputs = cnn_state
    sens = measure_sensitivity(inputs, samples=8, progress=False)
    widest = dict.fromkeys(sens.table, 8)
    first = next(iter(sens.table))
    assert sens.joint(widest) == pytest.approx(sens.base, rel=1e-9)
    one = {**widest, first: 2}
    assert sens.joint(one) == pytest.approx(sens.table[first][2], rel=1e-9) == pytest.approx(sens.predicted(one), rel=1e-9)
    low = dict.fromkeys(sens.table, 2)
    assert sens.predicted(low) == pytest.approx(sens.base + sum(r[2] - sens.base for r in sens.table.values()))
    assert sens.joint(low) != pytest.approx(sens.predicted(low), rel=1e-3)


def test_report_has_the_predicted_and_measured_distance_of_the_pick(cnn_files) -> None:
    folder, model, calib = cnn_files
    config = QuantConfig(optimize=OptimizeOptions(iters=0, hessian_samples=2, hessian_draws=3),
                         mixed=MixedPrecisionOptions(avg_weight_bits=4.0, samples=8))
    report = quantize(model, calib, config, progress=False).report
    sens = report.mixed_precision["sensitivity"]
    assert sens["measured_distance"] > sens["base_distance"] and sens["predicted_distance"] > sens["base_distance"]
    console = Console(record=True, width=400)
    print_summary(report, console)
    assert f"predicted {sens['predicted_distance']:.4g}, measured {sens['measured_distance']:.4g}" in console.export_text()


def test_the_ilp_finds_the_optimum_of_distances_far_below_one() -> None:
    """Output distances of a well-quantized MLP (1e-5): unscaled, CBC's tolerances took {4, 3, 6} for as good
    as uniform W4, which sums to 4.1e-6 less and fits the budget exactly."""
    table = {"a": {2: 4.06e-4, 3: 4.24e-5, 4: 1.209e-5, 6: 4.30e-6, 8: 3.587e-6},
             "b": {2: 7.01e-5, 3: 9.83e-6, 4: 4.78e-6, 6: 3.64e-6, 8: 3.587e-6},
             "c": {2: 4.62e-5, 3: 7.30e-6, 4: 4.52e-6, 6: 3.60e-6, 8: 3.587e-6}}
    sizes = {"a": 8192, "b": 8192, "c": 640}
    allocation = solve_ilp(table, sizes, 4.0 * sum(sizes.values()) / 8)
    assert allocation.bits == {"a": 4, "b": 4, "c": 4}
