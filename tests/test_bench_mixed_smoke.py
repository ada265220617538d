"""Smoke test of tools/bench_mixed.py on the zoo MLP: uniform and mixed-precision rows, the sensitivity
cache, the predicted and measured distances, rendered."""
from __future__ import annotations

from pathlib import Path

from tools import bench_mixed


def test_bench_mixed_rows_cache_and_acceptance_on_the_mlp(tmp_path: Path) -> None:
    model, calib, data = bench_mixed.BENCHMARKS["mlp"].prepare(tmp_path, 8)
    scorer = bench_mixed.Int2Scorer(model, data)
    uniform = bench_mixed.Setting("uniform W4", uniform_bits=4)
    wide, narrow, rank, *_ = bench_mixed.mixed_rows(4.0)
    rows = []
    with bench_mixed.cached_sensitivities(bench_mixed.SensitivityCache()) as cache:
        for setting in (uniform, wide, narrow, rank):
            rows.append(bench_mixed.run_one(setting, 0, model, calib, scorer, tmp_path / "out.onnx"))
        for row in rows:
            assert row.error is None and row.score is not None, row.error
            row.predicted, row.measured = cache.lfh_distance(row.bits)
    assert bench_mixed.mixed_precision.measure_sensitivity is bench_mixed.measure_sensitivity  # restored
    assert len(cache.measurements) == 1 and cache.measurements[0].reused == 2  # {2,4,8} and LFH rank reused it
    assert cache.measurements[0].widths == bench_mixed.ALL_WIDTHS
    u, w, n, r = rows
    assert u.avg_bits == 4.0 and all(0 < m.avg_bits <= 4.0 for m in (w, n, r))
    assert w.sensitivity["evaluations"] > 1 and set(n.bits.values()) <= set(bench_mixed.OPTIONS)
    assert u.measured is not None and u.predicted is not None and n.measured is not None
    # the ILP over every width minimizes the predicted distance, and uniform W4 is one of its choices
    assert w.predicted <= u.predicted + 1e-12 and w.predicted <= n.predicted + 1e-12
    lines = bench_mixed.acceptance(rows, "mlp")
    assert len(lines) == 2 and all("uniform W4" in line for line in lines)
    text = bench_mixed.render([(bench_mixed.BENCHMARKS["mlp"], scorer.score(model), rows, cache.measurements)], "x", 1.0)
    assert f"| {wide.label} |" in text and "rows that reused it" in text


def test_bench_mixed_eptq_row_says_what_the_optimization_did(tmp_path: Path) -> None:
    model, calib, data = bench_mixed.BENCHMARKS["mlp"].prepare(tmp_path, 8)
    scorer = bench_mixed.Int2Scorer(model, data)
    row = bench_mixed.run_one(bench_mixed.Setting("uniform W4", uniform_bits=4), 2, model, calib, scorer, tmp_path / "u.onnx")
    assert row.error is None and row.eptq.startswith("2 steps"), (row.error, row.eptq)
    assert f"| {row.eptq} |" in bench_mixed._row(row)


def test_acceptance_explains_a_loss_after_eptq_with_the_zero_step_rows() -> None:
    from tools.bench_mixed import Result, Score, Setting, acceptance

    uniform, mixed = Setting("uniform W4", uniform_bits=4), Setting("MP", budget=4.0)
    rows = [Result(uniform, 0, Score(18.0, 0.95), avg_bits=4.0), Result(mixed, 0, Score(19.0, 0.96), avg_bits=3.9),
            Result(uniform, 10, Score(21.0, 0.97), avg_bits=4.0), Result(mixed, 10, Score(20.0, 0.96), avg_bits=3.9)]
    lines = acceptance(rows, "m")
    assert lines[0].startswith("- PASS m, 0 steps") and lines[1].startswith("- **FAIL** m, 10 steps")
    assert "MP 96.0% (19.00 dB) vs uniform 95.0% (18.00 dB)" in lines[1] and "+1.00 dB and uniform by +3.00 dB" in lines[1]
    assert "not the allocation, reversed the order" in lines[1]
