"""Benchmark mixed precision (accuracy vs weight memory, paper Figure 6); write docs/BENCHMARKS_MIXED.md.

Usage: ``.venv/bin/python tools/bench_mixed.py [--models demo,digits_vit] [--eptq-iters N] [--budgets 3,4,6]
[--out docs/BENCHMARKS_MIXED.md]``

On the models trained on real labels (demo CNN, digits ViT), at 8-bit activations, each with no
optimization (``--iters 0``) and with a short EPTQ run (``--eptq-iters`` steps) after the search:

- uniform weights at 3, 4, 6 and 8 bits;
- mixed precision over {2, 4, 8} (ILP on LFH-weighted sensitivities) at average budgets equal to
  uniform 3, 4 and 6 bits (``--budgets``);
- the same budgets allocated by Label-Free Hessian rank alone (``--bit-search lfh-rank``);
- the ILP on the plain output distance, and with ``--pairwise``, at the smallest budget.

Every model is scored on its labelled test set (top-1) and against the float model (output SQNR).
Weight memory is counted as elements x bits / 8 (3 and 6 bits are stored in INT4 / INT8 containers,
so their file is larger than that count).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "tools"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402

import bench  # noqa: E402  (tools/bench.py: models, scoring, machine description)
from bench import BENCHMARKS, Score, Scorer, _command, _cpu_model, _git_state, _log, _quiet  # noqa: E402

from eptq_onnx import QuantConfig, quantize  # noqa: E402
from eptq_onnx.config import MixedPrecisionOptions, OptimizeOptions  # noqa: E402
from eptq_onnx.sensitivity import weight_sizes  # noqa: E402
from eptq_onnx.validate import INT2_FUSION_OFF  # noqa: E402

DEFAULT_MODELS = ("demo", "digits_vit")
DEFAULT_BUDGETS = (3.0, 4.0, 6.0)
UNIFORM_BITS = (3, 4, 6, 8)
DEFAULT_EPTQ_ITERS = 300
DEFAULT_EPTQ_BUDGETS = (4.0,)
DEFAULT_EPTQ_MODELS = ("demo",)  # the whole run stays under ~20 min on 2 shared cores


class Int2Scorer(Scorer):
    """bench.Scorer with onnxruntime's QDQ fusion off (its fuser rejects INT2 weights; README)."""

    def _outputs(self, path: Path) -> List[np.ndarray]:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        for key, value in INT2_FUSION_OFF.items():
            opts.add_session_config_entry(key, value)
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        return session.run(self.names, self.data.feeds)


@dataclass(frozen=True)
class Setting:
    """One row: uniform bits, or a mixed-precision search at an average-bits budget."""

    label: str
    uniform_bits: Optional[int] = None
    budget: Optional[float] = None
    search: str = "ilp"
    metric: str = "lfh"
    pairwise: bool = False

    def config(self, iters: int) -> QuantConfig:
        optimize = OptimizeOptions(iters=iters)
        if self.uniform_bits is not None:
            return QuantConfig(weight_bits=self.uniform_bits, optimize=optimize)
        mixed = MixedPrecisionOptions(avg_weight_bits=self.budget, search=self.search,  # type: ignore[arg-type]
                                      metric=self.metric, pairwise=self.pairwise)  # type: ignore[arg-type]
        return QuantConfig(optimize=optimize, mixed=mixed)


def settings(budgets: Sequence[float], eptq_budgets: Optional[Sequence[float]] = None) -> List[Setting]:
    """The rows at --iters 0; with ``eptq_budgets`` the rows of the EPTQ runs: uniform, ILP and LFH rank
    at those budgets only (EPTQ rows cost minutes each on a shared 2-core machine)."""
    if eptq_budgets is not None:
        return [row for b in eptq_budgets for row in (
            Setting(f"uniform W{b:g}", uniform_bits=int(b)), Setting(f"MP ILP (LFH) {b:g}", budget=b),
            Setting(f"MP LFH-rank {b:g}", budget=b, search="lfh-rank"))]
    rows = [Setting(f"uniform W{b}", uniform_bits=b) for b in UNIFORM_BITS]
    rows += [Setting(f"MP ILP (LFH) {b:g}", budget=b) for b in budgets]
    rows += [Setting(f"MP LFH-rank {b:g}", budget=b, search="lfh-rank") for b in budgets]
    low = min(budgets)
    return rows + [Setting(f"MP ILP (output) {low:g}", budget=low, metric="output"),
                   Setting(f"MP ILP (LFH) pairwise {low:g}", budget=low, pairwise=True)]


@dataclass
class Result:
    setting: Setting
    iters: int
    score: Optional[Score] = None
    memory_bytes: float = 0.0
    avg_bits: float = 0.0
    histogram: str = ""
    size_kb: float = 0.0
    seconds: float = 0.0
    search_seconds: Optional[float] = None
    sensitivity: Dict = field(default_factory=dict)
    error: Optional[str] = None


def run_one(setting: Setting, iters: int, model: Path, calib: Path, scorer: Scorer, out: Path) -> Result:
    result = Result(setting, iters)
    try:
        start = time.perf_counter()
        run = quantize(model, calib, setting.config(iters), output=out, force=True, progress=False)
        result.seconds = time.perf_counter() - start
        report = run.report
        weights = [t for t in report.tensors if t.kind == "weight"]
        counts = Counter(t.bits for t in weights)
        result.histogram = " ".join(f"{counts[b]}x{b}" for b in sorted(counts))
        mixed = report.mixed_precision
        if mixed:
            result.memory_bytes, result.avg_bits = mixed["memory_bytes"], mixed["average_bits"]
            result.search_seconds = report.timings_s.get("mixed precision")
            result.sensitivity = mixed["sensitivity"]
        else:
            assert run.state is not None and setting.uniform_bits is not None
            elements = sum(weight_sizes(run.state.float_model, run.state.plan).values())
            result.memory_bytes, result.avg_bits = elements * setting.uniform_bits / 8, float(setting.uniform_bits)
        result.size_kb = out.stat().st_size / 1024
        result.score = scorer.score(out)
    except Exception as exc:  # noqa: BLE001 - a failed row is reported, the run goes on
        result.error = bench._one_line(exc)
    return result


def _row(r: Result) -> str:
    if r.error or r.score is None:
        return f"| {r.setting.label} | failed: {r.error} | | | | | | |"
    top1 = "-" if r.score.top1 is None else f"{100 * r.score.top1:.1f}%"
    search = "-" if r.search_seconds is None else f"{r.search_seconds:.1f}"
    return (f"| {r.setting.label} | {r.memory_bytes:.0f} ({r.avg_bits:.2f}) | {r.histogram} | {top1} | "
            f"{r.score.sqnr_db:.2f} | {r.size_kb:.1f} | {search} | {r.seconds:.1f} |")


HEADER = ["| method | weight memory B (avg bits) | weights x bits | top-1 | output SQNR dB | file KB | search s | total s |",
          "|---|---|---|---|---|---|---|---|"]


def acceptance(results: Sequence[Result], name: str) -> List[str]:
    """Mixed precision at least as accurate as uniform at equal memory (same budget, same iters)."""
    lines = []
    for r in results:
        s = r.setting
        if s.search != "ilp" or s.pairwise or s.metric != "lfh" or r.score is None or s.budget is None:
            continue
        uniform = next((u for u in results if u.setting.uniform_bits == s.budget and u.iters == r.iters and u.score), None)
        if uniform is None or uniform.score is None:
            continue
        ok = (r.score.top1 or 0) >= (uniform.score.top1 or 0)
        lines.append(f"- {'PASS' if ok else '**FAIL**'} {name}, {r.iters} steps: MP at {s.budget:g} bits top-1 "
                     f"{100 * (r.score.top1 or 0):.1f}% ({r.score.sqnr_db:.2f} dB) vs uniform W{uniform.setting.uniform_bits} "
                     f"{100 * (uniform.score.top1 or 0):.1f}% ({uniform.score.sqnr_db:.2f} dB)")
    return lines


def pairwise_lines(results: Sequence[Result], name: str) -> List[str]:
    """Pairwise interaction terms against the independence assumption, same budget and steps."""
    lines = []
    for r in results:
        if not r.setting.pairwise or r.score is None:
            continue
        plain = next((p for p in results if p.iters == r.iters and p.setting.budget == r.setting.budget
                      and p.setting.search == "ilp" and p.setting.metric == "lfh" and not p.setting.pairwise and p.score), None)
        if plain is None or plain.score is None:
            continue
        lines.append(f"- {name}, {r.iters} steps, {r.setting.budget:g} bits: pairwise top-1 {100 * (r.score.top1 or 0):.1f}% "
                     f"({r.score.sqnr_db:.2f} dB, {r.histogram}) vs independent {100 * (plain.score.top1 or 0):.1f}% "
                     f"({plain.score.sqnr_db:.2f} dB, {plain.histogram})")
    return lines


def bench_model(name: str, iters_list: Sequence[int], budgets: Sequence[float], eptq_budgets: Sequence[float], workdir: Path):
    benchmark = BENCHMARKS[name]
    model, calib, data = benchmark.prepare(workdir, 0)
    scorer = Int2Scorer(model, data)
    float_score = scorer.score(model)
    results: List[Result] = []
    for iters in iters_list:
        for setting in settings(budgets, eptq_budgets if iters > 0 else None):
            r = run_one(setting, iters, model, calib, scorer, workdir / "out.onnx")
            _log(f"  {name} {iters} steps {setting.label}: "
                 + (r.error or f"{r.histogram}, top-1 {r.score.top1}, {r.score.sqnr_db:.2f} dB, {r.seconds:.1f} s"))  # type: ignore[union-attr]
            results.append(r)
    return benchmark, float_score, results


def render(models, command: str, elapsed: float) -> str:
    lines = [
        "# Benchmarks: mixed precision (accuracy vs weight memory)",
        "",
        "Generated by `tools/bench_mixed.py`; do not edit by hand. Command:",
        "",
        f"    {command}",
        "",
        f"- total run time {elapsed / 60:.1f} min on {_cpu_model()}, {os.cpu_count()} CPUs; git {_git_state()}",
        "- activations 8 bits; bit options {2, 4, 8}; sensitivity on 32 calibration samples; all bundled "
        "calibration samples (256) for calibration and EPTQ; `total s` is the whole quantize call, `search s` "
        "the mixed-precision stage (twin, LFH, sensitivities, ILP)",
        "",
        "## Acceptance: mixed precision at least as accurate (top-1) as uniform at equal memory",
        "",
    ]
    for benchmark, _, results in models:
        lines += acceptance(results, benchmark.name)
    lines += ["", "## Pairwise interaction terms (--pairwise) vs the independence assumption", ""]
    for benchmark, _, results in models:
        lines += pairwise_lines(results, benchmark.name)
    for benchmark, float_score, results in models:
        lines += ["", f"## {benchmark.name}", "", benchmark.description + ".",
                  f" Float: top-1 {100 * (float_score.top1 or 0):.1f}%."]
        for iters in sorted({r.iters for r in results}):
            lines += ["", f"### {'no optimization (--iters 0)' if iters == 0 else f'EPTQ, {iters} steps after the search'}",
                      "", *HEADER, *[_row(r) for r in results if r.iters == iters]]
        costs = [r for r in results if r.sensitivity and r.iters == 0 and r.sensitivity.get("evaluations")]
        if costs:
            lines += ["", "Sensitivity cost (no optimization runs):", "",
                      "| method | evaluations | samples | forward passes s | whole stage s (twin, LFH, teacher cache) |",
                      "|---|---|---|---|---|"]
            lines += [f"| {r.setting.label} | {r.sensitivity['evaluations']} | {r.sensitivity['samples']} | "
                      f"{r.sensitivity['eval_seconds']:.2f} | {r.sensitivity['seconds']:.1f} |" for r in costs]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS))
    parser.add_argument("--eptq-iters", type=int, default=DEFAULT_EPTQ_ITERS, help="0 skips the EPTQ rows")
    parser.add_argument("--eptq-budgets", default=",".join(f"{b:g}" for b in DEFAULT_EPTQ_BUDGETS),
                        help="average bits of the EPTQ rows (uniform, ILP, LFH rank)")
    parser.add_argument("--eptq-models", default=",".join(DEFAULT_EPTQ_MODELS), help="models that also get the EPTQ rows")
    parser.add_argument("--budgets", default=",".join(f"{b:g}" for b in DEFAULT_BUDGETS), help="average bits")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "BENCHMARKS_MIXED.md")
    args = parser.parse_args(argv)
    names = [n for n in args.models.split(",") if n]
    budgets = [float(b) for b in args.budgets.split(",") if b]
    eptq_models = [n for n in args.eptq_models.split(",") if n]
    eptq_budgets = [float(b) for b in args.eptq_budgets.split(",") if b]
    _quiet()
    start = time.perf_counter()
    models = []
    for name in names:
        _log(f"{name} ...")
        with tempfile.TemporaryDirectory(prefix=f"bench-mixed-{name}-") as tmp:
            iters_list = [0] + ([args.eptq_iters] if args.eptq_iters > 0 and name in eptq_models else [])
            models.append(bench_model(name, iters_list, budgets, eptq_budgets, Path(tmp)))
        # written after every model, so that an interrupted run keeps what it measured
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(render(models, _command([sys.argv[0], *argv]), time.perf_counter() - start) + "\n")
        _log(f"wrote {args.out} ({name} done) at {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
