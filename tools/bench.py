"""Benchmark eptq_onnx (EPTQ, Label-Free Hessian, vs onnxruntime quantize_static); write docs/BENCHMARKS.md.

Usage: ``.venv/bin/python tools/bench.py [--sections zoo,eptq,lfh,step] [--eptq-iters N] [--models a,b]
[--out docs/BENCHMARKS.md] [--calib-samples N] [--eptq-calib-samples N]``

Sections (default: all):

- ``eptq``: on the two models trained on real labels (demo CNN, digits ViT), at W4A8 and W3A8:
  round-to-nearest min-max, the MSE-initialized model, EPTQ with uniform and with Label-Free Hessian
  loss weights (``--eptq-iters`` steps), and onnxruntime MinMax. Each method runs in its own
  process, so that its peak resident memory (RSS high-water) can be measured.
- ``lfh``: cost of the Label-Free Hessian against one forward+backward pass of the model.
- ``step``: cost of one EPTQ optimization step against the bare model at the same batch.
- ``zoo``: for every ``--models`` model and weight width (W8A8, W4A8) the same calibration samples go
  to eptq_onnx (MSE and min-max step init, no optimization) and to
  ``onnxruntime.quantization.quantize_static`` (QDQ, per-channel, MinMax / Entropy / Percentile).

Each quantized model is scored against the float model (output SQNR on held-out inputs; top-1
accuracy and agreement on the labelled test sets), timed, sized, and (zoo section) its onnxruntime
CPU latency measured at batch 1 on one thread. A failing method becomes a "failed: ..." row; it
never stops the run.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import io
import logging
import math
import multiprocessing
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import onnx
import onnxruntime as ort
import torch
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
from eptq_onnx.eptq import kernels as training_kernels  # noqa: E402
from eptq_onnx.config import OptimizeOptions  # noqa: E402
from eptq_onnx.plan.u8s8_probe import u8s8_saturates  # noqa: E402
from eptq_onnx.calib.data import CalibrationSet  # noqa: E402
from eptq_onnx.calib.specs import input_specs  # noqa: E402
from eptq_onnx.init.quantizers import sqnr_db  # noqa: E402
from eptq_onnx.twin.convert import to_torch  # noqa: E402
from models import zoo  # noqa: E402
from models.demo import evaluate as demo_eval  # noqa: E402
from models.calib_files import write_calib  # noqa: E402
from tools.loss_terms import TermsResult, loss_terms, terms_markdown  # noqa: E402

DEFAULT_CALIB_SAMPLES = 64
DEFAULT_BITS = (8, 4)
EVAL_SAMPLES = 256  # held-out random inputs per zoo model
EVAL_SEED = 7_777_777  # calibration files use seeds 0..N-1 (models.calib_files.write_calib)
LATENCY_RUNS = 100
LATENCY_WARMUP = 10
ORT_W4_OPSET = 21  # first ONNX opset whose QuantizeLinear/DequantizeLinear accept INT4
DEMO_DIR = ROOT / "models" / "demo"
VIT_DIR = ROOT / "models" / "digits_vit"
SECTIONS = ("zoo", "eptq", "seeds", "terms", "lfh", "step")
EXTRA_SEEDS = (1, 2)  # seeds section (every EPTQ model and width): seed 0 is the EPTQ section's run
# loss weightings of the EPTQ and seeds sections: key -> (row label, OptimizeOptions weighting, hessian_trace)
WEIGHTINGS = {
    "uniform": ("EPTQ-uniform", "uniform", "channel"),
    "lfh-element": ("EPTQ-LFH-element", "lfh", "element"),  # the paper's trace
    "lfh": ("EPTQ-LFH", "lfh", "channel"),  # the default
}
DEFAULT_EPTQ_ITERS = 2000
DEFAULT_EPTQ_CALIB_SAMPLES = 256  # every bundled calibration sample of the demo and the digits ViT
EPTQ_MODELS = ("demo", "digits_vit")
EPTQ_BITS = (4, 3)
COST_MODELS = ("demo", "digits_vit", "residual_cnn", "transformer_block", "mlp_mixer_block", "vit_tiny_block")
COST_WEIGHT_BITS = 4
TERMS_BITS = 4
TERMS_READING = """## Where the weightings differ: the loss terms at the MSE init (W{bits}A8)

Per loss tensor of EPTQ (Eq. 6) on {calib} calibration samples, from `tools/loss_terms.py`: its size, its
SQNR at the MSE init, its Label-Free Hessian trace and weight (log-normalized, rescaled to mean 1, the
least sensitive tensor gets 0 as in the paper) under the paper's elementwise trace and the default
channel-correlated one, and its share of the initial loss under each and under uniform weights. The
paper's trace is the output's sensitivity to *independent* per-element errors; quantization errors are
correlated across the positions of a channel (the same rounded weights act everywhere). Behind an
averaging op over N positions (GlobalAveragePool, mean over tokens) the elementwise trace is N times
smaller than after it (1/N in the averaging table), but correlated errors do not average away: the
averaging table compares the error power that survives the op (measured) with both traces' ratios.
Where the measured ratio is far above 1/N the paper's LFH gives the tensors before the averaging (often
the least accurate ones, deep in the network) little weight while their errors reach the output
largely undiminished: the blind spot through which uniform weighting came out ahead of it. The channel
trace sums the gradient over the positions first (ratio 1: errors equal at every position), so it
errs on the other side where errors are only partly correlated; how the weightings compare is in the
(d) lines of the acceptance checks and in the seed tables above.
"""
STEP_RUNS = 20  # bare-model timings (median), after one warm-up
COST_STEPS = 50  # optimization steps of a cost run (the mean step time is what it reports)
COST_REPEATS = 3  # cost runs per model; each time is the minimum over them (one-shot timings, shared CPUs)
STEP_TARGET = 1.5  # EPTQ step / bare model step

@dataclass(frozen=True)
class Outcome:
    """What a method's own report says: optimization steps run, and the model outputs' SQNR against the
    float teacher on calibration samples before and after the optimization (minimum over outputs)."""

    iters: Optional[int] = None
    sqnr_before_db: Optional[float] = None
    sqnr_after_db: Optional[float] = None
    kept_init: bool = False  # the optimized state was worse than the init and was discarded


# float model, calib folder, samples, weight bits, output -> what the method reports (None: nothing)
Quantizer = Callable[[Path, Path, int, int, Path], Optional[Outcome]]


class NotApplicable(Exception):
    """A method that does not exist at this setting (the row says "n/a: <message>", not "failed")."""


# --------------------------------------------------------------------------- methods


@dataclass(frozen=True)
class Method:
    """One quantization method: a label for the table and a function writing the quantized model."""

    label: str
    run: Quantizer


@dataclass(frozen=True)
class Ours:
    """eptq_onnx.quantize at A8 with the given weight and activation step inits and EPTQ settings
    (a picklable callable, so that it can run in a child process)."""

    weight_init: str
    calib_method: str
    iters: int = 0
    weighting: str = "lfh"
    target: str = "ort-cpu"
    seed: int = 0
    hessian_trace: str = "channel"

    def __call__(self, model: Path, calib: Path, samples: int, bits: int, output: Path) -> Optional[Outcome]:
        config = QuantConfig(
            weight_bits=bits,
            act_bits=8,
            target=self.target,
            weight_init=self.weight_init,  # type: ignore[arg-type]
            calib_method=self.calib_method,  # type: ignore[arg-type]
            calib=CalibOptions(num_samples=samples),
            optimize=OptimizeOptions(iters=self.iters, weighting=self.weighting, seed=self.seed,  # type: ignore[arg-type]
                                     hessian_trace=self.hessian_trace),  # type: ignore[arg-type]
        )
        result = quantize(model, calib, config, output=output, force=True, progress=False)
        optimization = result.report.optimization or {}
        outputs = [o.name for o in result.model.graph.output]

        def worst(key: str) -> Optional[float]:
            values = [v for k, v in (optimization.get(key) or {}).items() if k in outputs]
            return min(values) if values else None

        return Outcome(int(optimization.get("iters", 0)), worst("sqnr_before_db"), worst("sqnr_after_db"),
                       bool(optimization.get("kept_init")))


def ours(label: str, weight_init: str, calib_method: str) -> Method:
    """eptq_onnx.quantize at A8 with the given weight and activation step inits, no optimization."""
    return Method(f"ours {label}", Ours(weight_init, calib_method))


class _SetReader(CalibrationDataReader):
    """onnxruntime calibration reader over the batches of an eptq_onnx CalibrationSet (same files, same order)."""

    def __init__(self, calib: CalibrationSet) -> None:
        self._calib = calib
        self._batches: Iterator[Dict[str, np.ndarray]] = calib.batches()

    def get_next(self) -> Optional[Dict[str, np.ndarray]]:
        return next(self._batches, None)

    def rewind(self) -> None:
        self._batches = self._calib.batches()


ORT_WEIGHT_TYPES = {8: QuantType.QInt8, 4: QuantType.QInt4}


@dataclass(frozen=True)
class OrtStatic:
    """onnxruntime quantize_static: QDQ, per-channel QInt8/QInt4 weights, QUInt8 activations.

    The float model goes through quant_pre_process first (as onnxruntime's docs recommend); for
    INT4 weights it is converted to opset 21 beforehand so that Q/DQ stay standard ONNX ops.
    Other weight widths raise NotApplicable.
    """

    calibrate_method: CalibrationMethod

    def __call__(self, model: Path, calib: Path, samples: int, bits: int, output: Path) -> Optional[Outcome]:
        if bits not in ORT_WEIGHT_TYPES:
            raise NotApplicable(f"onnxruntime has no {bits}-bit type")
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
                weight_type=ORT_WEIGHT_TYPES[bits],
                calibrate_method=self.calibrate_method,
                # 7-bit 8-bit weights (onnxruntime's remedy for its U8S8 kernels' int16 saturation on
                # x86 without VNNI) where this machine needs them, as our ort-cpu default decides
                reduce_range=bits == 8 and u8s8_saturates(),
            )
        prepared.unlink()
        return None


def ort_static(calibrate_method: CalibrationMethod) -> Method:
    """onnxruntime quantize_static with the given calibration method (see OrtStatic)."""
    return Method(f"ORT {calibrate_method.name}", OrtStatic(calibrate_method))


METHODS: Tuple[Method, ...] = (
    ours("mse", "output-mse", "mse"),  # the default
    ours("weight-mse", "mse", "mse"),
    ours("minmax", "minmax", "minmax"),
    ort_static(CalibrationMethod.MinMax),
    ort_static(CalibrationMethod.Entropy),
    ort_static(CalibrationMethod.Percentile),
)


def _weighted(iters: int, key: str, seed: int = 0) -> Ours:
    _, weighting, trace = WEIGHTINGS[key]
    return Ours("output-mse", "mse", iters, weighting, seed=seed, hessian_trace=trace)


def eptq_methods(iters: int) -> Tuple[Method, ...]:
    """The EPTQ section's methods: RTN, the MSE init, EPTQ under each weighting, ORT MinMax."""
    return (
        Method("RTN", Ours("minmax", "minmax")),
        Method("MSE init", Ours("output-mse", "mse")),
        *(Method(label, _weighted(iters, key)) for key, (label, _, _) in WEIGHTINGS.items()),
        ort_static(CalibrationMethod.MinMax),
    )


def seed_methods(iters: int) -> Tuple[Method, ...]:
    """EPTQ under each weighting and the extra seeds (minibatch order, nothing else)."""
    return tuple(Method(f"{label} seed {seed}", _weighted(iters, key, seed))
                 for key, (label, _, _) in WEIGHTINGS.items() for seed in EXTRA_SEEDS)


def seed_scores(eptq: Optional[ModelResult], seeds: Optional[ModelResult], bits: int) -> Dict[str, List[Tuple[int, Score]]]:
    """Per weighting, (seed, score) of every run of one model at ``bits``: seed 0 from the EPTQ section."""
    found: Dict[str, List[Tuple[int, Score]]] = {w: [] for w in WEIGHTINGS}
    for w, (label, _, _) in WEIGHTINGS.items():
        rows = [(0, eptq.find(label, bits) if eptq else None)]
        rows += [(seed, seeds.find(f"{label} seed {seed}", bits) if seeds else None) for seed in EXTRA_SEEDS]
        found[w] = [(seed, row.score) for seed, row in rows if row is not None and row.score is not None]
    return found


def _seed_table(scores: Dict[str, List[Tuple[int, Score]]]) -> List[str]:
    seeds = (0, *EXTRA_SEEDS)
    head = ["weighting", *(f"seed {s}: SQNR dB / top-1 %" for s in seeds), "mean SQNR (dB)", "min-max (dB)", "mean top-1 (%)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for w, runs in scores.items():
        by_seed = dict(runs)
        cells = [WEIGHTINGS[w][0]] + [f"{by_seed[s].sqnr_db:.2f} / {_percent(by_seed[s].top1)}" if s in by_seed else "—" for s in seeds]
        sqnrs = [sc.sqnr_db for _, sc in runs]
        top1 = [sc.top1 for _, sc in runs if sc.top1 is not None]
        cells += [_fmt(float(np.mean(sqnrs)) if sqnrs else None, ".2f"),
                  f"{min(sqnrs):.2f}-{max(sqnrs):.2f}" if sqnrs else "—",
                  _percent(float(np.mean(top1)) if top1 else None)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def seed_acceptance(name: str, bits: int, scores: Dict[str, List[Tuple[int, Score]]]) -> List[Tuple[bool, str]]:
    """(d, over seeds) EPTQ-LFH's mean output SQNR and top-1 over the seeds not below EPTQ-uniform's."""
    lfh, uni = scores.get("lfh", []), scores.get("uniform", [])
    label = f"(d, {1 + len(EXTRA_SEEDS)} seeds) {name} W{bits}A8 EPTQ-LFH not worse than EPTQ-uniform on the mean"
    if len(lfh) != 1 + len(EXTRA_SEEDS) or len(uni) != len(lfh):
        return [(False, f"{label}: runs missing ({len(lfh)} LFH, {len(uni)} uniform)")]
    mean = lambda runs, key: float(np.mean([key(sc) for _, sc in runs]))  # noqa: E731
    sqnr_l, sqnr_u = mean(lfh, lambda sc: sc.sqnr_db), mean(uni, lambda sc: sc.sqnr_db)
    top_l, top_u = mean(lfh, lambda sc: sc.top1 or 0.0), mean(uni, lambda sc: sc.top1 or 0.0)
    by_seed = dict(uni)
    pairs = [(sc, by_seed[seed]) for seed, sc in sorted(lfh, key=lambda run: run[0]) if seed in by_seed]
    sqnr_d = " / ".join(f"{a.sqnr_db - b.sqnr_db:+.2f}" for a, b in pairs)
    top_d = " / ".join(f"{100 * ((a.top1 or 0.0) - (b.top1 or 0.0)):+.1f}" for a, b in pairs)
    return [(sqnr_l >= sqnr_u and top_l >= top_u,
             f"{label}: SQNR {sqnr_l:.2f} vs {sqnr_u:.2f} dB, top-1 {100 * top_l:.2f} vs {100 * top_u:.2f} %; "
             f"per seed, LFH minus uniform (same minibatches): SQNR {sqnr_d} dB, top-1 {top_d} points")]


SEEDS_READING = """## Seed spread: EPTQ under {n} seeds ({iters} steps)

The seed sets the minibatch order only (same data, same init, and under one seed the same minibatches
for both weightings, so the acceptance lines compare them seed by seed); seed 0 is the EPTQ section's run.
The min-max column is how far one run's outcome moves with it: a comparison between weightings
from single runs (the EPTQ section) is only meaningful beyond that spread; the mean over the
seeds is the comparison to read."""


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


def _labelled(folder: Path, model_file: str) -> Callable[[Path, int], Tuple[Path, Path, EvalSet]]:
    """A bundled trained model: its file, its calibration folder, its labelled test set (test.npz)."""

    def prepare(workdir: Path, samples: int) -> Tuple[Path, Path, EvalSet]:
        images, labels = demo_eval.load_test_set(folder / "test.npz")
        return folder / model_file, folder / "calib", EvalSet({"image": images}, {"image": images[:1]}, labels)

    return prepare


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
        Benchmark("demo", "trained digits ResNet (models/demo), 500 test images", _labelled(DEMO_DIR, "digits_resnet.onnx")),
        Benchmark(
            "digits_vit",
            "trained tiny ViT on 8x8 digits (models/digits_vit: 16 patches of 2x2, 2 pre-norm blocks, 4 heads, "
            "dim 32), 500 test images",
            _labelled(VIT_DIR, "digits_vit.onnx"),
        ),
        Benchmark("residual_cnn", "zoo: residual CNN, unfolded BatchNorm, depthwise block", _zoo(zoo.residual_cnn)),
        Benchmark("transformer_block", "zoo: pre-norm transformer block, opset 17", _zoo(zoo.transformer_block)),
        Benchmark("mlp_mixer_block", "zoo: MLP-Mixer block, opset 17", _zoo(zoo.mlp_mixer_block)),
        Benchmark("vit_tiny_block", "zoo: transformer block at ViT-Tiny width (65 tokens, dim 192), opset 17", _zoo(zoo.vit_tiny_block)),
        Benchmark("nhwc_tf_style", "zoo: tf2onnx-like NHWC graph", _zoo(zoo.nhwc_tf_style)),
        Benchmark("multi_input", "zoo: image + feature inputs, two outputs", _zoo(zoo.multi_input)),
        Benchmark("mlp", "zoo: 3-layer MLP (smoke test only)", _zoo(zoo.mlp)),
    )
}
DEFAULT_MODELS = ("demo", "digits_vit", "residual_cnn", "transformer_block", "mlp_mixer_block", "nhwc_tf_style", "multi_input")


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
    correct: Optional[np.ndarray] = field(default=None, repr=False)  # per test image: top-1 right


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
        correct = predicted == self.data.labels
        return Score(sqnr, float(correct.mean()), float((predicted == reference).mean()), correct)


def paired_difference(a: Score, b: Score) -> str:
    """Images only ``a`` gets right, only ``b`` gets right, and the exact McNemar test's two-sided p-value."""
    if a.correct is None or b.correct is None:
        return ""
    only_a, only_b = int((a.correct & ~b.correct).sum()), int((~a.correct & b.correct).sum())
    n = only_a + only_b
    p = min(1.0, 2 * sum(math.comb(n, k) for k in range(min(only_a, only_b) + 1)) / 2**n) if n else 1.0
    return f"; paired: {only_a} images right only with the first, {only_b} only with the second (exact McNemar p = {p:.2f})"


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
    outcome: Optional[Outcome] = None  # what the method reported (optimization steps, calibration SQNR)
    peak_rss_mb: Optional[float] = None  # RSS high-water of the process that quantized (isolated runs)
    start_rss_mb: Optional[float] = None  # ... and its RSS high-water just before quantizing (imports done)
    not_applicable: Optional[str] = None  # why the method does not exist at this setting


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


def _quiet() -> None:
    """Silence the chatty logs of onnxruntime.quantization and onnx2torch's deprecation warnings."""
    logging.getLogger().setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning, module="onnx2torch")
    warnings.filterwarnings("ignore", message="Using a non-tuple sequence for multidimensional indexing")


LOADS: List[float] = []  # 1-minute load average at every progress message of this run


def _log(message: str) -> None:
    LOADS.append(os.getloadavg()[0])
    print(message, file=sys.stderr, flush=True)


def _max_rss_mb() -> float:
    """This process's resident-set high-water mark in MB: VmHWM of /proc/self/status where there is one.

    Not getrusage's ru_maxrss: Linux carries the pre-exec high-water mark over an execve, so a child
    started by fork+exec (multiprocessing's spawn) would report at least its parent's RSS at the fork.
    """
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


@dataclass
class Run:
    """What running one method gave: its outcome, wall time, RSS high-water before and after."""

    outcome: Optional[Outcome]
    time_s: float
    start_rss_mb: Optional[float] = None
    peak_rss_mb: Optional[float] = None


def _run_here(method: Method, args: tuple) -> Run:
    start = time.perf_counter()
    outcome = method.run(*args)
    return Run(outcome, time.perf_counter() - start)


def _child(method: Method, args: tuple, conn: "multiprocessing.connection.Connection") -> None:
    """Child-process side of _run_isolated: run, then send the Run or the exception back."""
    _quiet()
    try:
        start_rss = _max_rss_mb()
        run = _run_here(method, args)
        run.start_rss_mb, run.peak_rss_mb = start_rss, _max_rss_mb()
        conn.send(run)
    except Exception as exc:  # noqa: BLE001 - re-raised in the parent
        try:
            conn.send(exc)
        except Exception:  # noqa: BLE001 - an exception that does not pickle
            conn.send(RuntimeError(_one_line(exc)))
    finally:
        conn.close()


def _run_isolated(method: Method, args: tuple) -> Run:
    """Run a method in a fresh (spawned) Python process and measure its peak RSS there.

    The child imports torch, onnxruntime and eptq_onnx before it starts, so its RSS high-water mark
    before quantizing is the import baseline (see _max_rss_mb).
    """
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(method, args, sender), daemon=True)
    process.start()
    sender.close()
    try:
        answer = receiver.recv()
    except EOFError:
        answer = RuntimeError("the child process died without an answer")
    process.join()
    if isinstance(answer, BaseException):
        if process.exitcode:
            raise RuntimeError(f"{_one_line(answer)} (child exit code {process.exitcode})") from answer
        raise answer
    return answer


def _measure(
    method: Method, bits: int, float_path: Path, calib: Path, samples: int, scorer: Scorer, out: Path,
    *, isolate: bool = False, latency: bool = True,
) -> Row:
    """Quantize (in a child process with ``isolate``), then score, size and (with ``latency``) time the result."""
    row = Row(method.label, bits)
    stage = "quantize"
    try:
        run = (_run_isolated if isolate else _run_here)(method, (float_path, calib, samples, bits, out))
        row.outcome, row.time_s, row.start_rss_mb, row.peak_rss_mb = run.outcome, run.time_s, run.start_rss_mb, run.peak_rss_mb
        row.size_kb = out.stat().st_size / 1024
        stage = "score"
        row.score = scorer.score(out)
        if latency:
            stage = "latency"
            row.latency_ms = latency_ms(out, scorer.data.latency_feed)
    except NotApplicable as exc:
        row.not_applicable = str(exc)
    except Exception as exc:  # noqa: BLE001 - any failure becomes a table row
        row.error = f"{stage}: {_one_line(exc)}"
    return row


def _describe(row: Row) -> str:
    if row.not_applicable is not None:
        return f"n/a: {row.not_applicable}"
    if row.error is not None or row.score is None:
        return f"failed: {row.error}"
    text = f"{row.score.sqnr_db:.2f} dB"
    text += "" if row.score.top1 is None else f", top-1 {100 * row.score.top1:.1f}%"
    text += f", {row.time_s:.1f} s"
    text += "" if row.peak_rss_mb is None else f", peak RSS {row.peak_rss_mb:.0f} MB"
    out = row.outcome
    if out is not None and out.sqnr_before_db is not None and out.sqnr_after_db is not None:
        text += f", calib SQNR {out.sqnr_before_db:.2f} -> {out.sqnr_after_db:.2f} dB"
    return text


def bench_model(
    benchmark: Benchmark,
    workdir: Path,
    calib_samples: int = DEFAULT_CALIB_SAMPLES,
    methods: Sequence[Method] = METHODS,
    bits: Sequence[int] = DEFAULT_BITS,
    *,
    isolate: bool = False,
    latency: bool = True,
) -> ModelResult:
    """Measure the float model and every method at every weight width on one benchmark model.

    ``isolate`` runs each method in its own process (peak RSS measured); ``latency`` times each
    quantized model with onnxruntime at batch 1.
    """
    result = ModelResult(benchmark)
    float_path, calib, data = benchmark.prepare(workdir, calib_samples)
    scorer = Scorer(float_path, data)
    float_kb = float_path.stat().st_size / 1024
    result.rows.append(
        Row("float", None, score=scorer.score(float_path), size_kb=float_kb,
            latency_ms=latency_ms(float_path, data.latency_feed) if latency else None)
    )
    for b in bits:
        for method in methods:
            out = workdir / f"{method.label.replace(' ', '_')}_w{b}.onnx"
            row = _measure(method, b, float_path, calib, calib_samples, scorer, out, isolate=isolate, latency=latency)
            _log(f"  {benchmark.name} W{b}A8 {method.label}: {_describe(row)}")
            result.rows.append(row)
    return result


@dataclass
class Cost:
    """The LFH and optimization-step costs measured on one model (a quantize run with one EPTQ step)."""

    name: str
    lfh_s: Optional[float] = None
    samples: Optional[int] = None
    draws: Optional[int] = None
    fb_s: Optional[float] = None  # one forward+backward at batch 1 (report.hessian)
    step_s: Optional[float] = None  # one EPTQ step at the optimization batch (report.optimization)
    bare_s: Optional[float] = None  # bare model at that batch: teacher forward (no grad) + forward and backward
    python_step_s: Optional[float] = None  # one EPTQ step with the Python training kernels (no fused C++ ones)
    kernels: str = ""  # which training kernels the measured run used (report.optimization)
    batch: Optional[int] = None
    error: Optional[str] = None


def _bare_step_seconds(model: onnx.ModelProto, feeds: Dict[str, np.ndarray]) -> float:
    """Median time of what an EPTQ step needs at least: the float model's forward without grad
    (the teacher) plus its forward and backward (gradients of every parameter), via to_torch."""
    module = to_torch(model)
    inputs = [torch.from_numpy(feeds[i.name]) for i in model.graph.input if i.name in feeds]
    params = list(module.parameters())
    for p in params:
        p.requires_grad_(p.is_floating_point())

    def step() -> None:
        with torch.no_grad():
            module(*inputs)
        outputs = module(*inputs)
        outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
        sum(o.float().sum() for o in outputs if o.is_floating_point()).backward()
        for p in params:
            p.grad = None

    times = []
    for i in range(1 + STEP_RUNS):
        start = time.perf_counter()
        step()
        if i:
            times.append(time.perf_counter() - start)
    return float(np.median(times))


def _mean_step(optimization: Dict) -> Optional[float]:
    """The loop's mean step time from a report's ``optimization`` entry."""
    return optimization["seconds"] / optimization["iters"] if optimization.get("iters") else None


def _min(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return b if a is None else a if b is None else min(a, b)


def measure_cost(benchmark: Benchmark, workdir: Path, calib_samples: int = DEFAULT_CALIB_SAMPLES, repeats: int = COST_REPEATS,
                 steps: int = COST_STEPS, weighting: str = "lfh", python_kernels: bool = True) -> Cost:
    """measure_cost_once ``repeats`` times; every time is the minimum over the repeats (the report's
    forward+backward and step times are one-shot measurements, easily inflated by other processes)."""
    best = measure_cost_once(benchmark, workdir, calib_samples, steps, weighting, python_kernels)
    for _ in range(repeats - 1):
        if best.error is not None:
            break
        cost = measure_cost_once(benchmark, workdir, calib_samples, steps, weighting, python_kernels)
        if cost.error is not None:
            return cost
        for name in ("lfh_s", "fb_s", "step_s", "bare_s", "python_step_s"):
            setattr(best, name, _min(getattr(best, name), getattr(cost, name)))
    return best


def measure_cost_once(benchmark: Benchmark, workdir: Path, calib_samples: int = DEFAULT_CALIB_SAMPLES,
                      steps: int = COST_STEPS, weighting: str = "lfh", python_kernels: bool = True) -> Cost:
    """Quantize with ``weighting`` loss weights and ``steps`` EPTQ steps; read the LFH cost (with
    ``lfh``) and the mean step time (the optimization loop's time over its steps, optimizer update
    included) from the report, and time the bare model at the batch the loop ran with; with
    ``python_kernels`` the same steps again without the fused C++ kernels."""
    cost = Cost(benchmark.name)
    try:
        float_path, calib, _ = benchmark.prepare(workdir, calib_samples)
        options = OptimizeOptions(iters=steps, weighting=weighting, discard_if_worse=False)
        config = QuantConfig(weight_bits=COST_WEIGHT_BITS, calib=CalibOptions(num_samples=calib_samples), optimize=options)
        result = quantize(float_path, calib, config, progress=False)
        hessian, optimization = result.report.hessian or {}, result.report.optimization or {}
        cost.lfh_s, cost.samples, cost.draws = hessian.get("seconds"), hessian.get("samples"), hessian.get("draws")
        cost.fb_s = hessian.get("forward_backward_seconds")
        cost.step_s = _mean_step(optimization)
        cost.kernels = optimization.get("kernels", "")
        if python_kernels:
            with training_kernels.python_kernels():  # the same steps without the fused kernels (uniform weights: no LFH to wait for)
                plain = replace(options, weighting="uniform")
                again = quantize(float_path, calib, replace(config, optimize=plain), progress=False).report.optimization or {}
            cost.python_step_s = _mean_step(again)
        assert result.state is not None
        model = result.state.float_model
        calib_set = CalibrationSet(calib, input_specs(model), CalibOptions(num_samples=calib_samples))
        feeds = next(calib_set.batches(batch_size=optimization.get("batch_size") or options.batch_size))
        cost.batch = len(next(iter(feeds.values())))
        cost.bare_s = _bare_step_seconds(model, feeds)
    except Exception as exc:  # noqa: BLE001 - a failure becomes a table row
        cost.error = _one_line(exc)
    return cost


# --------------------------------------------------------------------------- report


def _fmt(value: Optional[float], spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _percent(value: Optional[float]) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def _labelled_result(result: ModelResult) -> bool:
    float_row = result.find("float", None)
    return bool(float_row and float_row.score and float_row.score.top1 is not None)


def _table(result: ModelResult) -> List[str]:
    labelled = _labelled_result(result)
    head = ["method", "bits", "SQNR (dB)", "Δ vs ORT MinMax (dB)"]
    head += ["top-1 (%)", "agree (%)"] if labelled else []
    head += ["quant time (s)", "size (KB)", "latency (ms)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in result.rows:
        cells = [row.method, "float" if row.bits is None else f"W{row.bits}A8"]
        if row.error is not None or row.not_applicable is not None:
            cells += [_describe(row)] + [""] * (len(head) - 3)
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


def _eptq_table(result: ModelResult) -> List[str]:
    """One model of the EPTQ section: every method at every width, Δ SQNR against the MSE init."""
    head = ["method", "bits", "top-1 (%)", "agree (%)", "SQNR (dB)", "Δ SQNR vs MSE init (dB)", "wall time (s)",
            "peak RSS (MB)", "Δ RSS (MB)", "iterations", "calib SQNR before → after (dB)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in result.rows:
        cells = [row.method, "float" if row.bits is None else f"W{row.bits}A8"]
        if row.error is not None or row.not_applicable is not None or row.score is None:
            cells += [_describe(row)] + [""] * (len(head) - 3)
        else:
            base = result.find("MSE init", row.bits)
            delta = None if row.bits is None or base is None or base.score is None else row.score.sqnr_db - base.score.sqnr_db
            rss = None if row.peak_rss_mb is None or row.start_rss_mb is None else row.peak_rss_mb - row.start_rss_mb
            out = row.outcome or Outcome()
            calib = "—" if out.sqnr_before_db is None or out.sqnr_after_db is None else f"{out.sqnr_before_db:.2f} → {out.sqnr_after_db:.2f}"
            calib += " (worse: init kept)" if out.kept_init else ""
            cells += [
                _percent(row.score.top1), _percent(row.score.agree), "ref" if row.bits is None else f"{row.score.sqnr_db:.2f}",
                "—" if delta is None else f"{delta:+.2f}", _fmt(row.time_s, ".1f"), _fmt(row.peak_rss_mb, ".0f"),
                _fmt(rss, ".0f"), "—" if out.iters is None else str(out.iters), calib,
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def cost_tables(costs: Sequence[Cost], sections: Sequence[str]) -> List[str]:
    lines: List[str] = []
    if "lfh" in sections:
        lines += [
            "", "## Label-Free Hessian cost", "",
            "| model | LFH time (s) | samples | draws (most per sample) | forward+backward, batch 1 (ms) | LFH / forward+backward | ditto, per sample |",
            "|---|---|---|---|---|---|---|",
        ]
        for c in costs:
            if c.error is not None or c.lfh_s is None or not c.fb_s:
                lines.append(f"| {c.name} | failed: {c.error or 'no Hessian in the report'} | | | | | |")
                continue
            ratio = c.lfh_s / c.fb_s
            lines.append(f"| {c.name} | {c.lfh_s:.2f} | {c.samples} | {c.draws} | {1e3 * c.fb_s:.2f} | {ratio:.0f} | {ratio / max(1, c.samples or 1):.1f} |")
    if "step" in sections:
        lines += [
            "", "## Optimization step cost", "",
            f"| model | batch | EPTQ step (ms) | bare model: teacher forward + forward/backward (ms) | ratio (target ≤ {STEP_TARGET:g}) "
            "| step with the Python kernels (ms) | its ratio |",
            "|---|---|---|---|---|---|---|",
        ]
        for c in costs:
            if c.error is not None or c.step_s is None or not c.bare_s:
                lines.append(f"| {c.name} | failed: {c.error or 'no optimization in the report'} | | | | | |")
                continue
            plain = (f"{1e3 * c.python_step_s:.1f} | {c.python_step_s / c.bare_s:.2f}" if c.python_step_s else "- | -")
            lines.append(f"| {c.name} | {c.batch} | {1e3 * c.step_s:.1f} | {1e3 * c.bare_s:.1f} | {c.step_s / c.bare_s:.2f} | {plain} |")
        kernels = sorted({c.kernels for c in costs if c.kernels})
        lines += ["", f"Training kernels of the EPTQ step column: {'; '.join(kernels) or 'not reported'}."]
    return lines


def eptq_acceptance(results: Sequence[ModelResult]) -> List[Tuple[bool, str]]:
    """(c) EPTQ-LFH beats the MSE init (SQNR higher, top-1 not lower) at every width; (d) EPTQ-LFH is
    not worse than EPTQ-uniform (top-1 and SQNR not lower)."""
    checks: List[Tuple[bool, str]] = []
    for result in results:
        name = result.benchmark.name
        for bits in EPTQ_BITS:
            lfh = result.find("EPTQ-LFH", bits)
            for other, rule, strict in (("MSE init", "beats", True), ("EPTQ-uniform", "not worse than", False)):
                base = result.find(other, bits)
                if lfh is None or base is None:
                    continue
                tag = "(c)" if strict else "(d)"
                label = f"{tag} {name} W{bits}A8 EPTQ-LFH {rule} {other}"
                label += " (SQNR higher, top-1 not lower)" if strict else " (SQNR and top-1 not lower)"
                if lfh.score is None or base.score is None or lfh.score.top1 is None or base.score.top1 is None:
                    checks.append((False, f"{label}: EPTQ-LFH {_describe(lfh)}; {other} {_describe(base)}"))
                    continue
                sqnr_ok = lfh.score.sqnr_db > base.score.sqnr_db if strict else lfh.score.sqnr_db >= base.score.sqnr_db
                ok = sqnr_ok and lfh.score.top1 >= base.score.top1
                checks.append((ok, f"{label}: top-1 {_percent(lfh.score.top1)} vs {_percent(base.score.top1)} %, "
                                   f"SQNR {lfh.score.sqnr_db:.2f} vs {base.score.sqnr_db:.2f} dB"
                                   + paired_difference(lfh.score, base.score)))
    return checks


def step_acceptance(costs: Sequence[Cost]) -> List[Tuple[bool, str]]:
    """(e) one EPTQ step costs at most STEP_TARGET times the bare model (teacher forward + forward/backward)."""
    checks: List[Tuple[bool, str]] = []
    for c in costs:
        label = f"(e) {c.name} EPTQ step / bare model step"
        if c.error is not None or c.step_s is None or not c.bare_s:
            checks.append((False, f"{label}: failed ({c.error or 'not measured'})"))
        else:
            ratio = c.step_s / c.bare_s
            checks.append((ratio <= STEP_TARGET, f"{label} at batch {c.batch}: {ratio:.2f} (limit {STEP_TARGET:g})"))
    return checks


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001
        return "not installed"


def load_line(load: Sequence[float]) -> str:
    """The header line on the machine's load during a run (from the load averages _log collected)."""
    text = f"- 1-minute load average at start / highest / end: {load[0]:.1f} / {max(load):.1f} / {load[-1]:.1f}"
    if max(load) > (os.cpu_count() or 1):
        text += (" (above the CPU count: other processes competed for the CPUs during part of the run, and the "
                 "times measured then are inflated, EPTQ's several-fold)")
    return text


def _git_state() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + (" + uncommitted changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def _source_digest() -> str:
    """A digest of eptq_onnx's sources: isolated methods import them afresh in each child process, so a
    change during the run would mix versions between rows."""
    digest = hashlib.sha1()
    for path in sorted((ROOT / "eptq_onnx").glob("*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:12]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


EPTQ_ITERS_NOTE = (  # what the step count costs on a small CPU
    "- On a 2-core CPU one EPTQ step of the demo CNN at batch 32 takes about 0.06 s with the machine to itself\n"
    "  (2000 steps: about 2 minutes per run, 15 minutes for the whole benchmark), but up to 0.45 s while other\n"
    "  processes compete for the CPUs (torch's two threads then wait on each other): `--eptq-iters 500` is a\n"
    "  quicker variant. Fewer steps give clearly worse EPTQ results here (at 500 steps EPTQ-LFH stayed below\n"
    "  the MSE init on the demo model).\n"
)


EPTQ_READING = """\
## Reading the EPTQ numbers

- Methods (all eptq_onnx, A8 asymmetric per-tensor activations, per-channel symmetric weights):
  **RTN** round-to-nearest with min/max ranges (`weight_init="minmax"`, `calib_method="minmax"`, no
  optimization); **MSE init** the default step init (output-MSE weight steps, histogram-MSE activation
  steps), no optimization; **EPTQ-uniform** / **EPTQ-LFH-element** / **EPTQ-LFH** the MSE init followed
  by {iters} EPTQ steps (batch 32, the defaults of `OptimizeOptions` otherwise) with uniform loss weights,
  with the log-normalized Label-Free Hessian traces of the paper (`hessian_trace="element"`: errors
  independent per element), or with the channel-correlated LFH, the tool's default
  (`hessian_trace="channel"`: the Hutchinson gradient summed over each channel's positions before
  squaring), LFH on 16 samples with at most 50 draws; **ORT MinMax** onnxruntime
  `quantize_static` as in the zoo section (QInt4 weights at W4; no 3-bit type exists in onnxruntime).
  Calibration: the first {calib} samples of the model's bundled calibration folder, for every method.
- **top-1 / agree / SQNR**: on the 500 labelled test images, never used for calibration; agree is how
  often the argmax matches the float model's; SQNR of the logits against the float model's.
- **wall time**: float file to quantized file inside the worker process (for eptq_onnx: including the
  LFH, the optimization and the built-in validation run); the worker's start-up is not counted.
- **peak RSS**: each method runs in a fresh `spawn`ed Python process; this is that process's
  resident-set high-water mark (`VmHWM` of `/proc/self/status`) after quantizing, so it includes the
  interpreter and the imported libraries (torch, onnxruntime, onnx, eptq_onnx); **Δ RSS** subtracts the
  same mark taken just before quantizing, leaving what quantization itself added. Not `getrusage`'s
  `ru_maxrss` (self or children): Linux carries the high-water mark over `execve`, so a spawned child
  reports at least its parent's RSS at the fork. torch and onnxruntime allocate natively, so Python-level
  tracing (tracemalloc) would miss most of it.
- **iterations**: EPTQ optimization steps run ({iters} here; the paper uses 20K-80K on a GPU).
- **calib SQNR before → after**: from the EPTQ report (`optimization.sqnr_before_db` / `sqnr_after_db`):
  SQNR of the logits of the torch fake-quant student against the float teacher on the first 64
  calibration samples (seen by the optimization), before and after it. Set against the test-set SQNR it
  separates an optimization that does not lower its own loss from one that does not generalize.
  "worse: init kept" marks a run whose optimized outputs scored below the init there: the tool then
  writes the MSE-initialized model (with a FALLBACK warning), so the row's test figures are the init's.
{iters_note}"""

COST_READING = """\
## Reading the cost tables

- Both tables come from `quantize` runs at W{bits}A8 with `weighting="lfh"` and `iters={steps}` ({calib}
  calibration samples), {repeats} per model; every time shown is the minimum over the {repeats} runs.
  The report's `hessian` gives the LFH time (16 samples, one at a time, at most 50 Hutchinson draws each; draws stop early once no trace estimate moves by 0.1% after at least
  10) and the time of one forward+backward pass of the teacher at batch 1 (`forward_backward_seconds`,
  one measurement); **LFH / forward+backward** is their ratio, and *per sample* divides it by the samples.
  Ideally one sample costs one forward and one backward pass per draw.
- **EPTQ step** is the report's `optimization.seconds / iters` of a {steps}-step run: the mean time
  of a whole step of the loop (minibatch, student forward with fake quantization, teacher tensors from
  the cache or a teacher forward, Eq. 6 loss and regularizer, backward, optimizer update), at batch 32. **bare model** is the same float model (`result.state.float_model`)
  converted with `eptq_onnx.twin.convert.to_torch`, timed on the first 32 calibration samples: a forward
  pass without grad plus a forward and backward pass with gradients for every parameter, median of
  {runs} after one warm-up. The ratio is what the fake quantization, taps and loss add.
- **vit_tiny_block** is transformer_block at ViT-Tiny's width (65 tokens, dim 192, 3 heads, MLP 768):
  the same ops on 30-50x larger tensors. The small blocks' steps (a few ms bare) are dominated by
  per-op overhead and passes over memory, which the loop keeps down: each loss tensor's tap and the
  fake quantizer after it are one fused node (quantization and loss term in one pass forward, one
  backward, reading the teacher cache's rows in place); a quantizer after a Reshape/Transpose of an
  already quantized tensor is skipped while training (its values are on the grid); all rounding
  variables and biases are one flat tensor each (one optimizer update each, run in C++ with
  torch.optim's arithmetic), and one fused node computes every soft weight and the regularizer. What
  remains per step is a fused node per loss tensor, the regularizer's power and a module call per
  fake quantizer; at a realistic width the arithmetic dominates and the ratio falls.
"""

READING = """\
## Reading the numbers

- **SQNR** is `10·log10(Σref² / Σ(ref−q)²)` of each model output against the float model, on held-out
  inputs (zoo models: {eval} standard-normal samples, seed {seed}, never used for calibration; demo and
  digits_vit: the 500 test images); with several outputs the table shows the minimum. Higher is better; +6 dB ≈ one more
  bit. **Δ vs ORT MinMax** is that SQNR minus onnxruntime MinMax's at the same width.
- **top-1 / agree** (demo and digits_vit): accuracy on the labelled test set, and how often the argmax
  matches the float model's.
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


def render(
    results: Sequence[ModelResult],
    command: str,
    calib_samples: int,
    elapsed_s: float,
    *,
    sections: Sequence[str] = ("zoo",),
    eptq: Sequence[ModelResult] = (),
    terms: Optional[Dict[str, TermsResult]] = None,
    seeds: Optional[Dict[str, ModelResult]] = None,
    costs: Sequence[Cost] = (),
    eptq_iters: int = DEFAULT_EPTQ_ITERS,
    eptq_calib_samples: int = DEFAULT_EPTQ_CALIB_SAMPLES,
    load: Optional[Sequence[float]] = None,
    sources: Optional[Tuple[str, str]] = None,
) -> str:
    """The markdown report of the sections that ran."""
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Benchmarks: EPTQ, and eptq_onnx vs onnxruntime quantize_static",
        "",
        "Generated by `tools/bench.py`; do not edit by hand. Command:",
        "",
        f"    {command}",
        "",
        f"- date: {now}; total run time {elapsed_s / 60:.1f} min; sections: {', '.join(sections)}",
        f"- machine: {_cpu_model()}, {os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} usable), "
        f"{platform.system()} {platform.release()}, Python {platform.python_version()}",
        f"- versions: eptq_onnx {eptq_onnx.__version__} (git {_git_state()}), onnxruntime {ort.__version__}, "
        f"onnx {onnx.__version__}, torch {_version('torch')} ({torch.get_num_threads()} threads), numpy {np.__version__}",
    ]
    if load:
        lines.append(load_line(load))
    if sources is not None and sources[0] != sources[1]:
        lines.append(f"- **WARNING: eptq_onnx's sources changed during this run** (digest {sources[0]} at the start, "
                     f"{sources[1]} at the end): rows may come from different versions; run it again")
    if "zoo" in sections:
        lines.append(f"- calibration (zoo section, cost tables): {calib_samples} samples per model, identical for every method")
    if "eptq" in sections:
        lines.append(f"- EPTQ section: {eptq_iters} optimization steps, {eptq_calib_samples} calibration samples")
    lines += ["", "Other benchmark files, each from its own script (command and commit at their top): "
              "[mixed precision](BENCHMARKS_MIXED.md) (`tools/bench_mixed.py`), [zoo of architecture families, "
              "exporters, traps and targets](BENCHMARKS_ZOO.md) (`tools/bench_breadth.py`), [calibration memory at "
              "scale](BENCHMARKS_SCALE.md) (`tools/bench_scale.py`)."]
    by_name = {r.benchmark.name: r for r in eptq}
    spread = {(name, bits): seed_scores(by_name.get(name), (seeds or {}).get(name), bits)
              for name in (seeds or {}) for bits in EPTQ_BITS} if "seeds" in sections else {}
    checks = (acceptance(results) + eptq_acceptance(eptq)
              + [c for (name, bits), scores in spread.items() for c in seed_acceptance(name, bits, scores)]
              + (step_acceptance(costs) if "step" in sections else []))
    lines += ["", "## Acceptance checks", ""]
    lines += [f"- {'PASS' if ok else '**FAIL**'} {text}" for ok, text in checks]
    if "eptq" in sections:
        lines += ["", f"## EPTQ at W4A8 and W3A8 ({eptq_iters} steps)"]
        for result in eptq:
            lines += ["", f"### {result.benchmark.name}", "", result.benchmark.description + ".", "", *_eptq_table(result)]
    if spread:
        lines += ["", SEEDS_READING.format(n=1 + len(EXTRA_SEEDS), iters=eptq_iters)]
        for (name, bits), scores in spread.items():
            lines += ["", f"### {name} W{bits}A8", "", *_seed_table(scores)]
    if terms:
        lines += ["", TERMS_READING.format(bits=TERMS_BITS, calib=calib_samples).rstrip()]
        for name, result in terms.items():
            lines += ["", f"### {name}", "", *terms_markdown(result)]
    lines += cost_tables(costs, sections)
    if "zoo" in sections:
        lines += ["", "## eptq_onnx (no optimization) vs onnxruntime quantize_static, W8A8 and W4A8"]
        for result in results:
            lines += ["", f"### {result.benchmark.name}", "", result.benchmark.description + ".", "", *_table(result)]
    if "eptq" in sections:
        note = "" if eptq_iters == DEFAULT_EPTQ_ITERS else f"- This run chose `--eptq-iters {eptq_iters}` (default {DEFAULT_EPTQ_ITERS}).\n"
        lines += ["", EPTQ_READING.format(iters=eptq_iters, calib=eptq_calib_samples, iters_note=EPTQ_ITERS_NOTE + note).rstrip()]
    if "lfh" in sections or "step" in sections:
        lines += ["", COST_READING.format(bits=COST_WEIGHT_BITS, calib=calib_samples, runs=STEP_RUNS, repeats=COST_REPEATS, steps=COST_STEPS)]
    if "zoo" in sections:
        lines += ["", READING.format(eval=EVAL_SAMPLES, seed=EVAL_SEED, opset=ORT_W4_OPSET, runs=LATENCY_RUNS, warm=LATENCY_WARMUP)]
    return "\n".join(lines)


def _command(argv: Sequence[str]) -> str:
    python = Path(sys.executable)
    try:
        python = python.relative_to(Path.cwd())
    except ValueError:
        pass
    return shlex.join([str(python), *argv])


def _names(parser: argparse.ArgumentParser, text: str, allowed: Sequence[str], flag: str) -> List[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in allowed]
    if unknown:
        parser.error(f"{flag}: unknown {', '.join(unknown)}: choose from {', '.join(allowed)}")
    return names


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, from {', '.join(SECTIONS)} (default: all)")
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help=f"zoo section, comma-separated, from {', '.join(BENCHMARKS)}")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "BENCHMARKS.md")
    parser.add_argument("--calib-samples", type=int, default=DEFAULT_CALIB_SAMPLES, help="zoo section and cost tables")
    parser.add_argument("--eptq-iters", type=int, default=DEFAULT_EPTQ_ITERS, help="EPTQ section: optimization steps")
    parser.add_argument("--eptq-calib-samples", type=int, default=DEFAULT_EPTQ_CALIB_SAMPLES, help="EPTQ section")
    args = parser.parse_args(argv)
    sections = _names(parser, args.sections, SECTIONS, "--sections")
    names = _names(parser, args.models, list(BENCHMARKS), "--models")
    if args.calib_samples < 1 or args.eptq_calib_samples < 1:
        parser.error("--calib-samples and --eptq-calib-samples must be at least 1")
    if args.eptq_iters < 1:
        parser.error("--eptq-iters must be at least 1")
    _quiet()
    LOADS.clear()
    _log(f"tools/bench.py: sections {', '.join(sections)}")
    start, sources_start = time.perf_counter(), _source_digest()
    eptq: List[ModelResult] = []
    if "eptq" in sections:
        for name in EPTQ_MODELS:
            _log(f"EPTQ: {name} ...")
            with tempfile.TemporaryDirectory(prefix=f"bench-eptq-{name}-") as tmp:
                eptq.append(bench_model(BENCHMARKS[name], Path(tmp), args.eptq_calib_samples, eptq_methods(args.eptq_iters),
                                        EPTQ_BITS, isolate=True, latency=False))
    seeds: Dict[str, ModelResult] = {}
    if "seeds" in sections:
        for name in EPTQ_MODELS:
            _log(f"seeds: {name} ...")
            with tempfile.TemporaryDirectory(prefix=f"bench-seeds-{name}-") as tmp:
                seeds[name] = bench_model(BENCHMARKS[name], Path(tmp), args.eptq_calib_samples, seed_methods(args.eptq_iters),
                                          EPTQ_BITS, isolate=True, latency=False)
    terms: Dict[str, TermsResult] = {}
    if "terms" in sections:
        for name in EPTQ_MODELS:
            _log(f"loss terms: {name} ...")
            with tempfile.TemporaryDirectory(prefix=f"bench-terms-{name}-") as tmp:
                float_path, calib, _ = BENCHMARKS[name].prepare(Path(tmp), args.calib_samples)
                terms[name] = loss_terms(float_path, calib, TERMS_BITS, args.calib_samples)
    costs: List[Cost] = []
    if "lfh" in sections or "step" in sections:
        for name in COST_MODELS:
            _log(f"LFH and step cost: {name} ...")
            with tempfile.TemporaryDirectory(prefix=f"bench-cost-{name}-") as tmp:
                costs.append(measure_cost(BENCHMARKS[name], Path(tmp), args.calib_samples))
            c = costs[-1]
            _log(f"  {c.error or f'LFH {c.lfh_s} s, fwd+bwd {c.fb_s} s, step {c.step_s} s, bare {c.bare_s} s'}")
    results: List[ModelResult] = []
    if "zoo" in sections:
        for name in names:
            _log(f"{name} ...")
            with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
                results.append(bench_model(BENCHMARKS[name], Path(tmp), args.calib_samples))
    text = render(
        results, _command([sys.argv[0], *argv]), args.calib_samples, time.perf_counter() - start, sections=sections,
        eptq=eptq, terms=terms, seeds=seeds, costs=costs, eptq_iters=args.eptq_iters, eptq_calib_samples=args.eptq_calib_samples,
        load=[*LOADS, os.getloadavg()[0]], sources=(sources_start, _source_digest()),
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    _log(f"wrote {args.out} in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
