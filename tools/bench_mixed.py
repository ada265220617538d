"""Benchmark mixed precision (accuracy vs weight memory, paper Figure 6); write docs/BENCHMARKS_MIXED.md.

Usage: ``.venv/bin/python tools/bench_mixed.py [--models demo,digits_vit] [--eptq-iters N] [--budgets 3,4,6]
[--out docs/BENCHMARKS_MIXED.md]``

On the models trained on real labels (demo CNN, digits ViT), at 8-bit activations, each with no
optimization (``--iters 0``) and with a short EPTQ run (``--eptq-iters`` steps) after the search:

- uniform weights at 3, 4, 6 and 8 bits;
- mixed precision over {2, 4, 8} (ILP on LFH-weighted sensitivities) at average budgets equal to
  uniform 3, 4 and 6 bits (``--budgets``), and over {2, 3, 4, 6, 8}, where uniform is a feasible point;
- the same budgets allocated by Label-Free Hessian rank alone (``--bit-search lfh-rank``), by the ILP
  on the plain output distance, and by the ILP with ``--pairwise`` interaction terms.

Sensitivities do not depend on the budget: each model's are measured once per metric (and pair list)
and reused, restricted to each row's widths, by every later search (``SensitivityCache``). At
``--iters 0`` every row's allocation also gets the LFH distance the ILP predicts for it (additive
model) and the one measured with the whole allocation in place, on the same 32 calibration samples.

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
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "tools"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402

import bench  # noqa: E402  (tools/bench.py: models, scoring, machine description)
from bench import BENCHMARKS, LOADS, Score, Scorer, _command, _cpu_model, _git_state, _log, _quiet, load_line  # noqa: E402

from eptq_onnx import QuantConfig, quantize  # noqa: E402

from eptq_onnx.mixed import stage as mixed_precision
from eptq_onnx.config import MixedPrecisionOptions, OptimizeOptions  # noqa: E402
from eptq_onnx.mixed.sensitivity import Pair, SearchInputs, SensitivityResult, measure_sensitivity, weight_sizes  # noqa: E402
from eptq_onnx.export.validate import INT2_FUSION_OFF  # noqa: E402

DEFAULT_MODELS = ("demo", "digits_vit")
DEFAULT_BUDGETS = (3.0, 4.0, 6.0)
UNIFORM_BITS = (3, 4, 6, 8)
DEFAULT_EPTQ_ITERS = 500
DEFAULT_EPTQ_BUDGETS = (3.0, 4.0)
DEFAULT_EPTQ_MODELS = ("demo", "digits_vit")
OPTIONS = (2, 4, 8)  # the default bit options
ALL_WIDTHS = (2, 3, 4, 6, 8)  # with the uniform widths of the budgets, so that uniform is a feasible point


class Int2Scorer(Scorer):
    """bench.Scorer with onnxruntime's QDQ fusion off (its fuser rejects INT2 weights; docs/targets.md)."""

    def _outputs(self, path: Path) -> List[np.ndarray]:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        for key, value in INT2_FUSION_OFF.items():
            opts.add_session_config_entry(key, value)
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        return session.run(self.names, self.data.feeds)

    def correct(self, path: Path) -> Optional[np.ndarray]:
        """Which test images the model classifies right (None without labels)."""
        if self.data.labels is None:
            return None
        return self._outputs(path)[0].argmax(axis=1) == self.data.labels


@dataclass(frozen=True)
class Setting:
    """One row: uniform bits, or a mixed-precision search at an average-bits budget."""

    label: str
    uniform_bits: Optional[int] = None
    budget: Optional[float] = None
    search: str = "ilp"
    metric: str = "lfh"
    pairwise: bool = False
    options: Tuple[int, ...] = OPTIONS

    def config(self, iters: int) -> QuantConfig:
        optimize = OptimizeOptions(iters=iters)
        if self.uniform_bits is not None:
            return QuantConfig(weight_bits=self.uniform_bits, optimize=optimize)
        mixed = MixedPrecisionOptions(avg_weight_bits=self.budget, search=self.search,  # type: ignore[arg-type]
                                      metric=self.metric, pairwise=self.pairwise, bit_options=self.options)  # type: ignore[arg-type]
        return QuantConfig(optimize=optimize, mixed=mixed)

    @property
    def is_ilp_lfh(self) -> bool:
        """The issue's mixed precision: the ILP on LFH-weighted sensitivities (without pair terms)."""
        return self.budget is not None and self.search == "ilp" and self.metric == "lfh" and not self.pairwise


def _widths(options: Sequence[int]) -> str:
    return "{" + ",".join(map(str, options)) + "}"


def mixed_rows(budget: float, eptq: bool = False) -> List[Setting]:
    """The mixed-precision rows at one budget. The ILP over every width comes first: its measurement
    serves the narrower searches (SensitivityCache)."""
    rows = [Setting(f"MP ILP LFH {_widths(ALL_WIDTHS)} @{budget:g}", budget=budget, options=ALL_WIDTHS),
            Setting(f"MP ILP LFH {_widths(OPTIONS)} @{budget:g}", budget=budget),
            Setting(f"MP LFH-rank {_widths(OPTIONS)} @{budget:g}", budget=budget, search="lfh-rank")]
    if not eptq:
        rows += [Setting(f"MP ILP output {_widths(OPTIONS)} @{budget:g}", budget=budget, metric="output"),
                 Setting(f"MP ILP LFH pairwise {_widths(OPTIONS)} @{budget:g}", budget=budget, pairwise=True)]
    return rows


def settings(budgets: Sequence[float], eptq_budgets: Optional[Sequence[float]] = None) -> List[Setting]:
    """The rows at --iters 0; with ``eptq_budgets`` the rows of the EPTQ runs: uniform, the two ILPs and
    LFH rank at those budgets only (EPTQ rows cost a minute or more each on a shared 2-core machine)."""
    if eptq_budgets is not None:
        return [row for b in eptq_budgets for row in (Setting(f"uniform W{b:g}", uniform_bits=int(b)), *mixed_rows(b, eptq=True))]
    rows = [Setting(f"uniform W{b}", uniform_bits=b) for b in UNIFORM_BITS]
    return rows + [row for b in budgets for row in mixed_rows(b)]


@dataclass
class Measurement:
    """One real sensitivity measurement of a bench model, and how many rows reused it."""

    metric: str
    widths: Tuple[int, ...]
    pairs: int
    samples: int  # as requested
    result: SensitivityResult
    reused: int = 0


class SensitivityCache:
    """``measure_sensitivity`` for the searches on one model: the first search of a metric (and pair
    list) measures, later ones (other budgets, fewer widths with the same widest) get that measurement
    restricted to their widths. Valid because every row of a model has the same float model, plan,
    activation parameters, calibration subset and MSE-initialized candidates."""

    def __init__(self) -> None:
        self.measurements: List[Measurement] = []

    def __call__(self, inputs: SearchInputs, *, metric: str = "lfh", samples: int = 32, pairs: Optional[Sequence[Pair]] = None,
                 evaluate: bool = True, progress: bool = True) -> SensitivityResult:
        widths = set(inputs.candidates)
        for m in self.measurements:
            if not evaluate and m.result.lfh:  # LFH rank needs the LFH only
                m.reused += 1
                return replace(m.result, table={}, pairs={}, evaluations=0, eval_seconds=0.0, seconds=0.0, joint=None)
            if (evaluate and m.metric == metric and m.pairs == len(pairs or []) and widths <= set(m.widths)
                    and max(widths) == max(m.widths) and m.samples == samples):
                m.reused += 1
                return replace(m.result.restricted(widths), seconds=0.0)
        result = measure_sensitivity(inputs, metric=metric, samples=samples, pairs=pairs, evaluate=evaluate, progress=progress)
        self.measurements.append(Measurement(metric if evaluate else "LFH only", tuple(sorted(widths)), len(pairs or []),
                                             samples, result))
        return replace(result)

    def lfh_distance(self, bits: Dict[str, int]) -> Tuple[Optional[float], Optional[float]]:
        """(predicted, measured) LFH-weighted distance of an allocation, from the widest LFH measurement
        without pair terms that covers its widths; (None, None) when there is none."""
        for m in self.measurements:
            r = m.result
            if m.metric == "lfh" and not m.pairs and r.joint is not None and set(bits.values()) <= set(m.widths):
                return r.predicted(bits), r.joint(bits)
        return None, None


@contextmanager
def cached_sensitivities(cache: SensitivityCache) -> Iterator[SensitivityCache]:
    """The pipeline's mixed-precision stage measures through ``cache`` while the block runs."""
    original = mixed_precision.measure_sensitivity
    mixed_precision.measure_sensitivity = cache  # type: ignore[assignment]
    try:
        yield cache
    finally:
        mixed_precision.measure_sensitivity = original  # type: ignore[assignment]


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
    eptq: str = "-"  # what the EPTQ stage did: steps run, or that its result was discarded for the init
    sensitivity: Dict = field(default_factory=dict)
    bits: Dict[str, int] = field(default_factory=dict)  # weight -> chosen width
    predicted: Optional[float] = None  # LFH distance under the ILP's additive model (iters 0)
    measured: Optional[float] = None  # LFH distance measured with the whole allocation in place (iters 0)
    correct: Optional[np.ndarray] = None  # per test image: classified right
    error: Optional[str] = None


def run_one(setting: Setting, iters: int, model: Path, calib: Path, scorer: Int2Scorer, out: Path) -> Result:
    result = Result(setting, iters)
    try:
        start = time.perf_counter()
        run = quantize(model, calib, setting.config(iters), output=out, force=True, progress=False)
        result.seconds = time.perf_counter() - start
        report = run.report
        weights = [t for t in report.tensors if t.kind == "weight"]
        counts = Counter(t.bits for t in weights)
        result.bits = {t.name: t.bits for t in weights}
        result.histogram = " ".join(f"{counts[b]}x{b}" for b in sorted(counts))
        mixed = report.mixed_precision
        if mixed:  # the widths the allocation chose (a stored width can be narrower: targets.integer_kernel_bits)
            result.bits = {layer["weight"]: layer["bits"] for layer in mixed["layers"]}
            result.memory_bytes, result.avg_bits = mixed["memory_bytes"], mixed["average_bits"]
            result.search_seconds = report.timings_s.get("mixed precision")
            result.sensitivity = mixed["sensitivity"]
        else:
            assert run.state is not None and setting.uniform_bits is not None
            elements = sum(weight_sizes(run.state.float_model, run.state.plan).values())
            result.memory_bytes, result.avg_bits = elements * setting.uniform_bits / 8, float(setting.uniform_bits)
        opt = report.optimization
        if opt:
            result.eptq = f"{opt['iters']} steps" + (", discarded: worse than the init, init kept" if opt["kept_init"] else "")
        result.size_kb = out.stat().st_size / 1024
        result.score = scorer.score(out)
        result.correct = scorer.correct(out)
    except Exception as exc:  # noqa: BLE001 - a failed row is reported, the run goes on
        result.error = bench._one_line(exc)
    return result


def _top1(score: Optional[Score]) -> str:
    return "-" if score is None or score.top1 is None else f"{100 * score.top1:.1f}%"


def _num(value: Optional[float], spec: str = ".4g") -> str:
    return "-" if value is None else format(value, spec)


def _row(r: Result) -> str:
    if r.error or r.score is None:
        return f"| {r.setting.label} | failed: {r.error} | | | | | | | | | |"
    search = "-" if r.search_seconds is None else f"{r.search_seconds:.2f}"
    return (f"| {r.setting.label} | {r.memory_bytes:.0f} ({r.avg_bits:.2f}) | {r.histogram} | {_top1(r.score)} | "
            f"{r.score.sqnr_db:.2f} | {_num(r.predicted)} | {_num(r.measured)} | {r.eptq} | {r.size_kb:.1f} | {search} | {r.seconds:.1f} |")


HEADER = ["| method | weight memory B (avg bits) | weights x bits | top-1 | output SQNR dB | LFH dist. predicted | "
          "LFH dist. measured | EPTQ | file KB | search s | total s |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]


def _uniform_for(results: Sequence[Result], r: Result) -> Optional[Result]:
    """The uniform row at ``r``'s budget and steps (equal weight memory)."""
    return next((u for u in results if u.setting.uniform_bits == r.setting.budget and u.iters == r.iters and u.score), None)


def _images(r: Result, uniform: Result) -> str:
    """How many test images only one of the two classifies right (the paired difference behind top-1)."""
    if r.correct is None or uniform.correct is None:
        return ""
    only_mp, only_uniform = int((r.correct & ~uniform.correct).sum()), int((uniform.correct & ~r.correct).sum())
    return f"; of {len(r.correct)} test images {only_mp} right only with MP, {only_uniform} only with uniform"


def _why(r: Result, uniform: Result) -> str:
    """Why the ILP's pick lost to uniform, from the predicted and measured LFH distances (iters 0)."""
    if r.predicted is None or r.measured is None or uniform.predicted is None or uniform.measured is None:
        return ""
    feasible = uniform.setting.uniform_bits in r.setting.options
    text = (f"; LFH distance predicted {r.predicted:.4g} (pick) vs {uniform.predicted:.4g} (uniform), measured "
            f"{r.measured:.4g} vs {uniform.measured:.4g}")
    if not feasible:
        return text + f": uniform W{uniform.setting.uniform_bits} is not in the search space {_widths(r.setting.options)}"
    if r.predicted <= uniform.predicted and r.measured > uniform.measured:
        return text + ": the additive model ranks the pick first, the measured distance ranks uniform first (proxy error)"
    if r.measured <= uniform.measured and r.score and uniform.score and r.score.sqnr_db < uniform.score.sqnr_db:
        return text + (": the additive model holds and the pick is closer in the LFH-weighted distance (all probed "
                       "tensors, calibration samples), but uniform is closer at the output on the test set "
                       f"({uniform.score.sqnr_db - r.score.sqnr_db:.2f} dB more SQNR): the LFH-weighted objective, not "
                       "the ILP, disagrees with the output here")
    if r.measured <= uniform.measured:
        return text + ": the pick is closer to the float model by both the LFH distance and the output SQNR, yet classifies fewer test images right"
    return text


def acceptance(results: Sequence[Result], name: str) -> List[str]:
    """Mixed precision (the ILP on LFH sensitivities, both option sets) at least as accurate (top-1) as
    uniform at equal memory (same budget, same steps)."""
    lines = []
    for r in results:
        uniform = _uniform_for(results, r) if r.setting.is_ilp_lfh and r.score is not None else None
        if uniform is None or uniform.score is None or r.score is None:
            continue
        ok = (r.score.top1 or 0) >= (uniform.score.top1 or 0)
        lines.append(f"- {'PASS' if ok else '**FAIL**'} {name}, {r.iters} steps, {r.avg_bits:.2f} vs {uniform.avg_bits:.2f} bits: "
                     f"MP {_widths(r.setting.options)} top-1 {_top1(r.score)} ({r.score.sqnr_db:.2f} dB, {r.histogram}) vs "
                     f"uniform W{uniform.setting.uniform_bits} {_top1(uniform.score)} ({uniform.score.sqnr_db:.2f} dB)"
                     + _images(r, uniform) + (f"; EPTQ: MP {r.eptq}, uniform {uniform.eptq}" if r.iters else "")
                     + ("" if ok else _why(r, uniform) if not r.iters else _why_after_eptq(results, r, uniform)))
    return lines


def _why_after_eptq(results: Sequence[Result], r: Result, uniform: Result) -> str:
    """Why the ILP's pick lost to uniform after EPTQ: the same two allocations without it, and what the
    optimization changed in each."""
    r0, u0 = (next((x for x in results if x.iters == 0 and x.setting == row.setting and x.score), None) for row in (r, uniform))
    if r0 is None or u0 is None or r0.score is None or u0.score is None or r.score is None or uniform.score is None:
        return ""
    text = (f"; without EPTQ the same widths scored MP {_top1(r0.score)} ({r0.score.sqnr_db:.2f} dB) vs uniform "
            f"{_top1(u0.score)} ({u0.score.sqnr_db:.2f} dB); the {r.iters} steps moved MP by "
            f"{r.score.sqnr_db - r0.score.sqnr_db:+.2f} dB and uniform by {uniform.score.sqnr_db - u0.score.sqnr_db:+.2f} dB")
    if (r0.score.top1 or 0) >= (u0.score.top1 or 0):
        text += ": the short optimization, not the allocation, reversed the order"
    return text


def pairwise_lines(results: Sequence[Result], name: str) -> List[str]:
    """Pairwise interaction terms against the independence assumption, same budget, widths and steps."""
    lines = []
    for r in results:
        if not r.setting.pairwise or r.score is None:
            continue
        plain = next((p for p in results if p.iters == r.iters and p.setting.budget == r.setting.budget and p.score
                      and p.setting.is_ilp_lfh and p.setting.options == r.setting.options), None)
        if plain is None or plain.score is None:
            continue
        lines.append(f"- {name}, {r.iters} steps, budget {r.setting.budget:g} bits: pairwise {r.avg_bits:.2f} bits, top-1 "
                     f"{_top1(r.score)} ({r.score.sqnr_db:.2f} dB, measured LFH distance {_num(r.measured)}, {r.histogram}) vs "
                     f"independent {plain.avg_bits:.2f} bits, {_top1(plain.score)} ({plain.score.sqnr_db:.2f} dB, "
                     f"{_num(plain.measured)}, {plain.histogram})")
    return lines


def bench_model(name: str, iters_list: Sequence[int], budgets: Sequence[float], eptq_budgets: Sequence[float], workdir: Path):
    benchmark = BENCHMARKS[name]
    model, calib, data = benchmark.prepare(workdir, 0)
    scorer = Int2Scorer(model, data)
    float_score = scorer.score(model)
    results: List[Result] = []
    with cached_sensitivities(SensitivityCache()) as cache:
        for iters in iters_list:
            for setting in settings(budgets, eptq_budgets if iters > 0 else None):
                r = run_one(setting, iters, model, calib, scorer, workdir / "out.onnx")
                _log(f"  {name} {iters} steps {setting.label}: "
                     + (r.error or f"{r.histogram}, top-1 {r.score.top1}, {r.score.sqnr_db:.2f} dB, {r.seconds:.1f} s"))  # type: ignore[union-attr]
                results.append(r)
        for r in results:
            if r.iters == 0 and r.bits:
                r.predicted, r.measured = cache.lfh_distance(r.bits)
    return benchmark, float_score, results, cache.measurements


def _cost_lines(measurements: Sequence[Measurement]) -> List[str]:
    lines = ["", "Sensitivity measurements (each once per model, reused by later rows; the whole stage includes the twin, "
             "the LFH and the teacher cache):", "",
             "| metric | widths | pairs | evaluations | samples | forward passes s | whole stage s | rows that reused it |",
             "|---|---|---|---|---|---|---|---|"]
    for m in measurements:
        r = m.result
        lines.append(f"| {m.metric} | {_widths(m.widths)} | {m.pairs} | {r.evaluations} | {r.samples} | {r.eval_seconds:.2f} | "
                     f"{r.seconds:.1f} | {m.reused} |")
    return lines


def render(models, command: str, elapsed: float, git: Optional[str] = None) -> str:
    """The markdown file; ``git``: the commit the run started from (the file itself changes during the run)."""
    lines = [
        "# Benchmarks: mixed precision (accuracy vs weight memory)",
        "",
        "Generated by `tools/bench_mixed.py`; do not edit by hand. Command:",
        "",
        f"    {command}",
        "",
        f"- total run time {elapsed / 60:.1f} min on {_cpu_model()}, {os.cpu_count()} CPUs; git {git or _git_state()}",
        *([load_line(LOADS)] if LOADS else []),
        "- times (`search s`, `total s`, the sensitivity cost) were measured on a machine shared with other jobs: "
        "compare them within this file only",
        "- activations 8 bits; sensitivity on 32 calibration samples; all bundled calibration samples (256) for "
        "calibration and EPTQ; `total s` is the whole quantize call, `search s` the mixed-precision stage (twin, LFH, "
        "sensitivities, ILP; a row whose sensitivities came from an earlier measurement spends only the ILP and the "
        "measurement of its pick there)",
        "- equal memory: a budget of B bits is B x (weight elements) / 8 bytes, the memory of uniform WB; every "
        "mixed-precision row stays at or under it (the avg bits column)",
        "- {2,4,8}: the issue's default options (native INT2/INT4/INT8); {2,3,4,6,8} adds the uniform widths, "
        "so that the ILP can pick uniform when the sensitivities say so",
        "- EPTQ: the steps are in each table's title, short runs for a 2-core machine (the paper runs 20K-80K on a "
        "GPU); the `EPTQ` column says when an optimized state was discarded because its output SQNR on the check "
        "samples fell below the MSE init's (the row is then the init, as the CLI writes it)",
        "- LFH dist.: the LFH-weighted distance to the float model on the sensitivity samples, `predicted` by the "
        "ILP's additive model (base + sum of the single-layer increments), `measured` with the whole allocation in place",
        "",
        "## Acceptance: mixed precision at least as accurate (top-1) as uniform at equal memory",
        "",
        "The paper's Figure 6 compares mixed precision with uniform 4 and 8 bits along weight memory; here each "
        "budget is the memory of a uniform width, and both are scored without and with EPTQ afterwards.",
        "",
    ]
    for benchmark, _, results, _ in models:
        lines += acceptance(results, benchmark.name)
    lines += ["", "## Pairwise interaction terms (--pairwise) vs the independence assumption (equal memory)", ""]
    for benchmark, _, results, _ in models:
        lines += pairwise_lines(results, benchmark.name)
    for benchmark, float_score, results, measurements in models:
        lines += ["", f"## {benchmark.name}", "", benchmark.description + ".",
                  f" Float: top-1 {100 * (float_score.top1 or 0):.1f}%."]
        for iters in sorted({r.iters for r in results}):
            lines += ["", f"### {'no optimization (--iters 0)' if iters == 0 else f'EPTQ, {iters} steps after the search'}",
                      "", *HEADER, *[_row(r) for r in results if r.iters == iters]]
        lines += _cost_lines(measurements)
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
    start, git = time.perf_counter(), _git_state()
    models = []
    for name in names:
        _log(f"{name} ...")
        with tempfile.TemporaryDirectory(prefix=f"bench-mixed-{name}-") as tmp:
            iters_list = [0] + ([args.eptq_iters] if args.eptq_iters > 0 and name in eptq_models else [])
            models.append(bench_model(name, iters_list, budgets, eptq_budgets, Path(tmp)))
        # written after every model, so that an interrupted run keeps what it measured
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(render(models, _command([sys.argv[0], *argv]), time.perf_counter() - start, git) + "\n")
        _log(f"wrote {args.out} ({name} done) at {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
