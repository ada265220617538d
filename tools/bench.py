"""Benchmark eptq_onnx against onnxruntime's static QDQ quantizer, and write docs/BENCHMARKS.md.

Usage: ``.venv/bin/python tools/bench.py [--models a,b] [--out docs/BENCHMARKS.md] [--calib-samples N]``

For every benchmark model and weight width (W8A8, W4A8) the same calibration samples go to
eptq_onnx (MSE and min-max step init) and to ``onnxruntime.quantization.quantize_static``
(QDQ, per-channel, MinMax / Entropy / Percentile). Each result is scored against the float model
(output SQNR on held-out inputs; top-1 accuracy and agreement on the demo test set), timed, sized,
and its onnxruntime CPU latency measured at batch 1 on one thread. A failing method becomes a
"failed: ..." row; it never stops the run.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import logging
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_static,
)

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import eptq_onnx  # noqa: E402
from eptq_onnx import CalibOptions, QuantConfig, quantize  # noqa: E402
from eptq_onnx.config import OptimizeOptions  # noqa: E402
from eptq_onnx.calib_data import CalibrationSet, input_specs  # noqa: E402
from eptq_onnx.quantizers import sqnr_db  # noqa: E402
from models import zoo  # noqa: E402
from models.demo import evaluate as demo_eval  # noqa: E402
from tests.helpers import write_calib  # noqa: E402

DEFAULT_CALIB_SAMPLES = 64
DEFAULT_BITS = (8, 4)
EVAL_SAMPLES = 256  # held-out random inputs per zoo model
EVAL_SEED = 7_777_777  # calibration files use seeds 0..N-1 (tests.helpers.write_calib)
LATENCY_RUNS = 100
LATENCY_WARMUP = 10
ORT_W4_OPSET = 21  # first ONNX opset whose QuantizeLinear/DequantizeLinear accept INT4
DEMO_DIR = ROOT / "models" / "demo"

Quantizer = Callable[[Path, Path, int, int, Path], None]  # float model, calib folder, samples, weight bits, output


# --------------------------------------------------------------------------- methods


@dataclass(frozen=True)
class Method:
    """One quantization method: a label for the table and a function writing the quantized model."""

    label: str
    run: Quantizer


def ours(label: str, weight_init: str, calib_method: str) -> Method:
    """eptq_onnx.quantize at A8 with the given weight and activation step inits."""

    def run(model: Path, calib: Path, samples: int, bits: int, output: Path) -> None:
        config = QuantConfig(
            weight_bits=bits,
            act_bits=8,
            weight_init=weight_init,  # type: ignore[arg-type]
            calib_method=calib_method,  # type: ignore[arg-type]
            calib=CalibOptions(num_samples=samples),
            optimize=OptimizeOptions(iters=0),
        )
        quantize(model, calib, config, output=output, force=True, progress=False)

    return Method(f"ours {label}", run)


class _SetReader(CalibrationDataReader):
    """onnxruntime calibration reader over the batches of an eptq_onnx CalibrationSet (same files, same order)."""

    def __init__(self, calib: CalibrationSet) -> None:
        self._calib = calib
        self._batches: Iterator[Dict[str, np.ndarray]] = calib.batches()

    def get_next(self) -> Optional[Dict[str, np.ndarray]]:
        return next(self._batches, None)

    def rewind(self) -> None:
        self._batches = self._calib.batches()


def ort_static(calibrate_method: CalibrationMethod) -> Method:
    """onnxruntime quantize_static: QDQ, per-channel QInt8/QInt4 weights, QUInt8 activations.

    The float model goes through quant_pre_process first (as onnxruntime's docs recommend); for
    INT4 weights it is converted to opset 21 beforehand so that Q/DQ stay standard ONNX ops.
    """

    def run(model: Path, calib: Path, samples: int, bits: int, output: Path) -> None:
        proto = onnx.load(model)
        specs = input_specs(proto)
        if bits == 4:
            proto = onnx.version_converter.convert_version(proto, ORT_W4_OPSET)
        prepared = output.with_name(output.stem + ".pre.onnx")
        quant_pre_process(proto, prepared)
        reader = _SetReader(CalibrationSet(calib, specs, CalibOptions(num_samples=samples)))
        with contextlib.redirect_stdout(io.StringIO()):  # histogram calibrators print() their progress
            quantize_static(
                prepared,
                output,
                reader,
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type={8: QuantType.QInt8, 4: QuantType.QInt4}[bits],
                calibrate_method=calibrate_method,
            )
        prepared.unlink()

    return Method(f"ORT {calibrate_method.name}", run)


METHODS: Tuple[Method, ...] = (
    ours("mse", "output-mse", "mse"),  # the default
    ours("weight-mse", "mse", "mse"),
    ours("minmax", "minmax", "minmax"),
    ort_static(CalibrationMethod.MinMax),
    ort_static(CalibrationMethod.Entropy),
    ort_static(CalibrationMethod.Percentile),
)


# --------------------------------------------------------------------------- models and scoring


@dataclass
class EvalSet:
    """Held-out inputs (one batch), the batch-1 latency feed, and labels where the model has them."""

    feeds: Dict[str, np.ndarray]
    latency_feed: Dict[str, np.ndarray]
    labels: Optional[np.ndarray] = None


@dataclass(frozen=True)
class Benchmark:
    """A benchmark model: ``prepare(workdir, n)`` -> (float model path, calibration folder, eval set)."""

    name: str
    description: str
    prepare: Callable[[Path, int], Tuple[Path, Path, EvalSet]]


def _demo(workdir: Path, samples: int) -> Tuple[Path, Path, EvalSet]:
    images, labels = demo_eval.load_test_set()
    return DEMO_DIR / "digits_resnet.onnx", DEMO_DIR / "calib", EvalSet({"image": images}, {"image": images[:1]}, labels)


def _zoo(builder: Callable[[], onnx.ModelProto]) -> Callable[[Path, int], Tuple[Path, Path, EvalSet]]:
    def prepare(workdir: Path, samples: int) -> Tuple[Path, Path, EvalSet]:
        model = builder()
        path = workdir / "float.onnx"
        onnx.save(model, path)
        calib = write_calib(model, workdir / "calib", samples)
        feeds = zoo.sample_inputs(model, EVAL_SAMPLES, seed=EVAL_SEED)
        return path, calib, EvalSet(feeds, zoo.sample_inputs(model, 1, seed=EVAL_SEED + 1))

    return prepare


BENCHMARKS: Dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark("demo", "trained digits ResNet (models/demo), 500 test images", _demo),
        Benchmark("residual_cnn", "zoo: residual CNN, unfolded BatchNorm, depthwise block", _zoo(zoo.residual_cnn)),
        Benchmark("transformer_block", "zoo: pre-norm transformer block, opset 17", _zoo(zoo.transformer_block)),
        Benchmark("mlp_mixer_block", "zoo: MLP-Mixer block, opset 17", _zoo(zoo.mlp_mixer_block)),
        Benchmark("nhwc_tf_style", "zoo: tf2onnx-like NHWC graph", _zoo(zoo.nhwc_tf_style)),
        Benchmark("multi_input", "zoo: image + feature inputs, two outputs", _zoo(zoo.multi_input)),
        Benchmark("mlp", "zoo: 3-layer MLP (smoke test only)", _zoo(zoo.mlp)),
    )
}
DEFAULT_MODELS = ("demo", "residual_cnn", "transformer_block", "mlp_mixer_block", "nhwc_tf_style", "multi_input")


def _session(path: Path, threads: int = 0) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def latency_ms(path: Path, feed: Dict[str, np.ndarray]) -> float:
    """Median onnxruntime CPU latency (ms) over LATENCY_RUNS runs, one intra-op thread."""
    session = _session(path, threads=1)
    times = []
    for i in range(LATENCY_WARMUP + LATENCY_RUNS):
        start = time.perf_counter()
        session.run(None, feed)
        if i >= LATENCY_WARMUP:
            times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


@dataclass
class Score:
    """Minimum output SQNR (dB) vs float; top-1 accuracy and agreement with float where labels exist."""

    sqnr_db: float
    top1: Optional[float] = None
    agree: Optional[float] = None


class Scorer:
    """Scores models against the float model's outputs on an EvalSet."""

    def __init__(self, float_path: Path, data: EvalSet) -> None:
        self.data = data
        self.names = [o.name for o in _session(float_path).get_outputs()]
        self.reference = self._outputs(float_path)

    def _outputs(self, path: Path) -> List[np.ndarray]:
        return _session(path).run(self.names, self.data.feeds)

    def score(self, path: Path) -> Score:
        outputs = self._outputs(path)
        sqnr = min(sqnr_db(ref, out) for ref, out in zip(self.reference, outputs))
        if self.data.labels is None:
            return Score(sqnr)
        predicted, reference = outputs[0].argmax(axis=1), self.reference[0].argmax(axis=1)
        return Score(sqnr, float((predicted == self.data.labels).mean()), float((predicted == reference).mean()))


# --------------------------------------------------------------------------- running


@dataclass
class Row:
    """One line of a model's table: float (bits None) or one method at one weight width."""

    method: str
    bits: Optional[int]
    score: Optional[Score] = None
    time_s: Optional[float] = None
    size_kb: Optional[float] = None
    latency_ms: Optional[float] = None
    error: Optional[str] = None


@dataclass
class ModelResult:
    """Every row of one benchmark model."""

    benchmark: Benchmark
    rows: List[Row] = field(default_factory=list)

    def find(self, method: str, bits: Optional[int]) -> Optional[Row]:
        return next((r for r in self.rows if r.method == method and r.bits == bits), None)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:160]


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _measure(method: Method, bits: int, float_path: Path, calib: Path, samples: int, scorer: Scorer, out: Path) -> Row:
    row = Row(method.label, bits)
    stage = "quantize"
    try:
        start = time.perf_counter()
        method.run(float_path, calib, samples, bits, out)
        row.time_s = time.perf_counter() - start
        row.size_kb = out.stat().st_size / 1024
        stage = "score"
        row.score = scorer.score(out)
        stage = "latency"
        row.latency_ms = latency_ms(out, scorer.data.latency_feed)
    except Exception as exc:  # noqa: BLE001 - any failure becomes a table row
        row.error = f"{stage}: {_one_line(exc)}"
    return row


def bench_model(
    benchmark: Benchmark,
    workdir: Path,
    calib_samples: int = DEFAULT_CALIB_SAMPLES,
    methods: Sequence[Method] = METHODS,
    bits: Sequence[int] = DEFAULT_BITS,
) -> ModelResult:
    """Measure the float model and every method at every weight width on one benchmark model."""
    result = ModelResult(benchmark)
    float_path, calib, data = benchmark.prepare(workdir, calib_samples)
    scorer = Scorer(float_path, data)
    float_kb = float_path.stat().st_size / 1024
    result.rows.append(
        Row("float", None, score=scorer.score(float_path), size_kb=float_kb, latency_ms=latency_ms(float_path, data.latency_feed))
    )
    for b in bits:
        for method in methods:
            out = workdir / f"{method.label.replace(' ', '_')}_w{b}.onnx"
            row = _measure(method, b, float_path, calib, calib_samples, scorer, out)
            _log(f"  {benchmark.name} W{b}A8 {method.label}: " + (row.error or f"{row.score.sqnr_db:.2f} dB, {row.time_s:.1f} s"))
            result.rows.append(row)
    return result


# --------------------------------------------------------------------------- report


def _fmt(value: Optional[float], spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _percent(value: Optional[float]) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def _table(result: ModelResult) -> List[str]:
    labelled = result.benchmark.name == "demo"
    head = ["method", "bits", "SQNR (dB)", "Δ vs ORT MinMax (dB)"]
    head += ["top-1 (%)", "agree (%)"] if labelled else []
    head += ["quant time (s)", "size (KB)", "latency (ms)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in result.rows:
        cells = [row.method, "float" if row.bits is None else f"W{row.bits}A8"]
        if row.error is not None:
            cells += [f"failed: {row.error}"] + [""] * (len(head) - 3)
        else:
            assert row.score is not None
            baseline = result.find("ORT MinMax", row.bits)
            delta = None if row.bits is None or baseline is None or baseline.score is None else row.score.sqnr_db - baseline.score.sqnr_db
            cells += ["ref" if row.bits is None else f"{row.score.sqnr_db:.2f}", "—" if delta is None else f"{delta:+.2f}"]
            if labelled:
                cells += [_percent(row.score.top1), _percent(row.score.agree)]
            cells += [_fmt(row.time_s, ".2f"), _fmt(row.size_kb, ".1f"), _fmt(row.latency_ms, ".3f")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def acceptance(results: Sequence[ModelResult]) -> List[Tuple[bool, str]]:
    """The project's acceptance checks, as (passed, line): (a) demo W8A8 ours (mse) within 0.5 point
    of float top-1; (b) on every model, ours (mse) output SQNR >= ORT MinMax's at each width."""
    checks: List[Tuple[bool, str]] = []
    for result in results:
        name, float_row = result.benchmark.name, result.find("float", None)
        ours_w8 = result.find("ours mse", 8)
        if float_row and float_row.score and float_row.score.top1 is not None and ours_w8:
            label = f"(a) {name} W8A8 ours mse top-1 drop vs float"
            if ours_w8.score is None or ours_w8.score.top1 is None:
                checks.append((False, f"{label}: failed ({ours_w8.error})"))
            else:
                drop = 100 * (float_row.score.top1 - ours_w8.score.top1)
                checks.append((drop <= 0.5, f"{label}: {drop:+.1f} points (limit 0.5)"))
        for bits in DEFAULT_BITS:
            mine, theirs = result.find("ours mse", bits), result.find("ORT MinMax", bits)
            if mine is None or theirs is None:
                continue
            label = f"(b) {name} W{bits}A8 SQNR ours mse vs ORT MinMax"
            if mine.score is None or theirs.score is None:
                checks.append((mine.score is not None, f"{label}: ours {mine.error or 'ok'}, ORT {theirs.error or 'ok'}"))
            else:
                ok = mine.score.sqnr_db >= theirs.score.sqnr_db
                checks.append((ok, f"{label}: {mine.score.sqnr_db:.2f} vs {theirs.score.sqnr_db:.2f} dB"))
    return checks


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001
        return "not installed"


def _git_state() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + (" + uncommitted changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


READING = """\
## Reading the numbers

- **SQNR** is `10·log10(Σref² / Σ(ref−q)²)` of each model output against the float model, on held-out
  inputs (zoo models: {eval} standard-normal samples, seed {seed}, never used for calibration; demo: the
  500 test images); with several outputs the table shows the minimum. Higher is better; +6 dB ≈ one more
  bit. **Δ vs ORT MinMax** is that SQNR minus onnxruntime MinMax's at the same width.
- **top-1 / agree** (demo only): accuracy on the labelled test set, and how often the argmax matches the
  float model's.
- **quant time** is wall time from float file to quantized file. For *ours* it includes the built-in
  validation run (onnxruntime float vs QDQ, 64 samples); for *ORT* it includes `quant_pre_process`
  (onnxruntime's recommended shape inference + optimization step, which also folds BatchNorm) and, at W4,
  the `onnx.version_converter` upgrade to opset {opset}.
- **size** is the output `.onnx` file. Both tools store INT4 weights natively (opset 21), which halves the
  weight bytes only: scales, int32 biases and graph overhead stay, and dominate on the tiny zoo models.
- **latency** is the median of {runs} onnxruntime CPU runs at batch 1 (after {warm} warm-up runs), one
  intra-op thread, all graph optimizations on. On tiny models Q/DQ overhead can make a quantized model
  *slower* than float; INT4 weights are dequantized to float at run time by the CPU provider.
- Every method sees the same calibration samples: the first N files of the calibration folder, read by
  eptq_onnx's `CalibrationSet` and passed to onnxruntime through a `CalibrationDataReader`.
- onnxruntime settings: `QuantFormat.QDQ`, `per_channel=True`, activations `QUInt8` (asymmetric), weights
  `QInt8` / `QInt4` (symmetric), defaults otherwise (Entropy: 128 bins; Percentile: 99.999th, 2048 bins).
  *ours mse* is the default `QuantConfig`: weight steps minimizing each layer's output MSE on
  calibration inputs (`weight_init="output-mse"`), activation steps by histogram MSE; *ours weight-mse*
  minimizes the weights' own MSE instead; *ours minmax* is round-to-nearest with min/max ranges for both.
  Asymmetric 8-bit activations, per-channel symmetric weights in every case.
- Random-weight zoo models have no task metric; their SQNR is what the quantizer is judged on.
- ORT Entropy equals ORT MinMax almost everywhere: `quantize_static` cannot set the entropy calibrator's
  bins, and with its defaults (128 histogram bins, 128 quantized bins) the KL search has essentially one
  candidate threshold, the full range.
- multi_input, ORT rows: the `embedding` output also feeds a Relu. onnxruntime's quantizer gives the
  Relu's input the Relu's output range (zero point 0, range [0, max]), so the ORT model clips the negative
  half of `embedding`; its `logits` output is fine (about 36 dB at W8). Seen with onnxruntime 1.31.
"""


def render(results: Sequence[ModelResult], command: str, calib_samples: int, elapsed_s: float) -> str:
    """The markdown report."""
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Benchmarks: eptq_onnx vs onnxruntime quantize_static",
        "",
        "Generated by `tools/bench.py`; do not edit by hand. Command:",
        "",
        f"    {command}",
        "",
        f"- date: {now}; total run time {elapsed_s / 60:.1f} min",
        f"- machine: {_cpu_model()}, {os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} usable), "
        f"{platform.system()} {platform.release()}, Python {platform.python_version()}",
        f"- versions: eptq_onnx {eptq_onnx.__version__} (git {_git_state()}), onnxruntime {ort.__version__}, "
        f"onnx {onnx.__version__}, torch {_version('torch')}, numpy {np.__version__}",
        f"- calibration: {calib_samples} samples per model, identical for every method",
        "",
        "## Acceptance checks",
        "",
    ]
    lines += [f"- {'PASS' if ok else '**FAIL**'} {text}" for ok, text in acceptance(results)]
    for result in results:
        lines += ["", f"## {result.benchmark.name}", "", result.benchmark.description + ".", "", *_table(result)]
    lines += ["", READING.format(eval=EVAL_SAMPLES, seed=EVAL_SEED, opset=ORT_W4_OPSET, runs=LATENCY_RUNS, warm=LATENCY_WARMUP)]
    return "\n".join(lines)


def _command(argv: Sequence[str]) -> str:
    python = Path(sys.executable)
    try:
        python = python.relative_to(Path.cwd())
    except ValueError:
        pass
    return shlex.join([str(python), *argv])


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help=f"comma-separated, from {', '.join(BENCHMARKS)}")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "BENCHMARKS.md")
    parser.add_argument("--calib-samples", type=int, default=DEFAULT_CALIB_SAMPLES)
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}: choose from {', '.join(BENCHMARKS)}")
    if args.calib_samples < 1:
        parser.error("--calib-samples must be at least 1")
    logging.getLogger().setLevel(logging.ERROR)  # onnxruntime.quantization logs chatty warnings
    start = time.perf_counter()
    results = []
    for name in names:
        _log(f"{name} ...")
        with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
            results.append(bench_model(BENCHMARKS[name], Path(tmp), args.calib_samples))
    text = render(results, _command([sys.argv[0], *argv]), args.calib_samples, time.perf_counter() - start)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    _log(f"wrote {args.out} in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
