"""Smoke test of tools/bench_mixed.py on the zoo MLP: one uniform and one mixed-precision row, rendered."""
from __future__ import annotations

from pathlib import Path

from tools import bench_mixed


def test_bench_mixed_rows_and_acceptance_on_the_mlp(tmp_path: Path) -> None:
    model, calib, data = bench_mixed.BENCHMARKS["mlp"].prepare(tmp_path, 8)
    scorer = bench_mixed.Int2Scorer(model, data)
    uniform = bench_mixed.run_one(bench_mixed.Setting("uniform W4", uniform_bits=4), 0, model, calib, scorer, tmp_path / "u.onnx")
    mixed = bench_mixed.run_one(bench_mixed.Setting("MP ILP (LFH) 4", budget=4.0), 0, model, calib, scorer, tmp_path / "m.onnx")
    for row in (uniform, mixed):
        assert row.error is None and row.score is not None, row.error
    assert uniform.avg_bits == 4.0 and 0 < mixed.avg_bits <= 4.0 and mixed.memory_bytes <= uniform.memory_bytes
    assert mixed.sensitivity["evaluations"] > 1 and mixed.search_seconds is not None
    lines = bench_mixed.acceptance([uniform, mixed], "mlp")
    assert len(lines) == 1 and "MP at 4 bits" in lines[0] and "uniform W4" in lines[0]
    assert "| MP ILP (LFH) 4 |" in bench_mixed.render([(bench_mixed.BENCHMARKS["mlp"], scorer.score(model), [uniform, mixed])], "x", 1.0)
