"""Smoke test of tools/bench.py: its core function on the zoo MLP, W8 ours (mse) vs onnxruntime MinMax."""
from __future__ import annotations

import math
from pathlib import Path

from onnxruntime.quantization import CalibrationMethod

from tools import bench


def test_bench_model_mlp_w8(tmp_path: Path) -> None:
    methods = [bench.METHODS[0], bench.ort_static(CalibrationMethod.MinMax)]
    result = bench.bench_model(bench.BENCHMARKS["mlp"], tmp_path, calib_samples=8, methods=methods, bits=(8,))
    assert [(r.method, r.bits) for r in result.rows] == [("float", None), ("ours mse", 8), ("ORT MinMax", 8)]
    for row in result.rows[1:]:
        assert row.error is None, row.error
        assert row.score is not None and row.score.sqnr_db > 20.0
        assert row.time_s and row.size_kb and row.latency_ms and math.isfinite(row.latency_ms)
    text = bench.render([result], "bench smoke", 8, 1.0)
    assert "| ours mse | W8A8 |" in text and "(b) mlp W8A8" in text


def test_failing_method_becomes_a_row(tmp_path: Path) -> None:
    def broken(*_: object) -> None:
        raise RuntimeError("boom\nsecond line")

    result = bench.bench_model(bench.BENCHMARKS["mlp"], tmp_path, calib_samples=4, methods=[bench.Method("broken", broken)], bits=(8,))
    assert result.rows[1].error == "quantize: RuntimeError: boom"
    assert "failed: quantize: RuntimeError: boom" in bench.render([result], "x", 4, 1.0)


def test_eptq_row_mlp_isolated(tmp_path: Path) -> None:
    """One EPTQ-LFH row (5 steps) in its own process, with peak RSS, and an n/a ORT row at W3."""
    methods = [m for m in bench.eptq_methods(5) if m.label in ("EPTQ-LFH", "ORT MinMax")]
    result = bench.bench_model(bench.BENCHMARKS["mlp"], tmp_path, calib_samples=8, methods=methods, bits=(3,),
                               isolate=True, latency=False)
    lfh, ort_row = result.rows[1:]
    assert lfh.error is None, lfh.error
    assert lfh.outcome is not None and lfh.outcome.iters == 5 and lfh.score is not None and math.isfinite(lfh.score.sqnr_db)
    assert lfh.outcome.sqnr_before_db is not None and lfh.outcome.sqnr_after_db is not None
    assert lfh.peak_rss_mb and lfh.start_rss_mb and lfh.peak_rss_mb >= lfh.start_rss_mb > 10
    assert ort_row.not_applicable == "onnxruntime has no 3-bit type" and ort_row.error is None
    text = bench.render([], "x", 8, 1.0, sections=("eptq",), eptq=[result], eptq_iters=5)
    assert "| EPTQ-LFH | W3A8 |" in text and "n/a: onnxruntime has no 3-bit type" in text


def test_seed_acceptance_compares_the_weightings_seed_by_seed() -> None:
    score = bench.Score
    runs = {"lfh": [(0, score(25.0, 0.97)), (1, score(26.0, 0.96)), (2, score(24.0, 0.98))],
            "uniform": [(2, score(24.5, 0.97)), (0, score(24.0, 0.97)), (1, score(26.5, 0.96))]}
    [(ok, line)] = bench.seed_acceptance("m", 4, runs)
    assert ok  # mean SQNR 25.0 vs 25.0 dB, top-1 97.0 vs 96.7 %
    assert "SQNR +1.00 / -0.50 / -0.50 dB" in line and "top-1 +0.0 / +0.0 / +1.0 points" in line
    runs["lfh"][0] = (0, score(24.9, 0.97))
    assert not bench.seed_acceptance("m", 4, runs)[0][0]


def test_step_cost_at_the_batch_the_loop_ran(tmp_path: Path) -> None:
    """measure_cost_once (tools/corpus_steps.py's measure): the step time of a short uniform-weight run and
    the bare model timed at the loop's own batch, no LFH and no Python-kernel run when not asked."""
    cost = bench.measure_cost_once(bench.BENCHMARKS["mlp"], tmp_path, calib_samples=8, steps=3, weighting="uniform",
                                   python_kernels=False)
    assert cost.error is None, cost.error
    assert cost.batch == 8 and cost.step_s and cost.bare_s and cost.lfh_s is None and cost.python_step_s is None
    assert "| mlp | 8 |" in "\n".join(bench.cost_tables([cost], ("step",)))
