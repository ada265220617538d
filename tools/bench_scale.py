"""Scale benchmark: peak memory of calibrating a ResNet-50-sized model on 1024 samples of 3x224x224,
and (``--big``) of quantizing a MatMul chain with 0.4 or 2.4 GB of weights in external data.

    python tools/bench_scale.py [--samples 1024] [--write docs/BENCHMARKS_SCALE.md]
    python tools/bench_scale.py --big {small,over-2gb} [--write docs/BENCHMARKS_SCALE.md]

Builds torchvision's ResNet-50 (random weights, models/zoo.py), writes ``--samples`` random
3x224x224 float32 samples as .npy files in a temporary folder, and runs the CLI with
``--iters 0`` (calibration, weight init, QDQ write, validation; no EPTQ) in a child process whose
peak resident set (VmHWM) is measured at its exit. Calibration streams the folder batch by batch,
so the peak must not grow with the number of samples (target: under 4 GB).

``--big`` writes models/zoo_large.py's chain (small: 6 layers 2048x8192, 0.4 GB; over-2gb: 9 layers
4096x16384, 2.4 GB) and two samples, and runs the CLI W8, ``--iters 0 --weight-init mse`` with
the peak resident set after each pipeline stage (VmRSS, VmHWM). The models' large tensors stay in
a tensor store on disk (eptq_onnx/graph/tensor_store.py); target: the peak above the RSS after loading
(the imports) at most 3x the weight bytes.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models import zoo, zoo_large  # noqa: E402

# The child runs the CLI and prints its own VmHWM on exit (tools/bench.py's _max_rss_mb).
CHILD = (
    "import atexit, sys; sys.path.insert(0, {root!r}); sys.path.insert(0, {tools!r});"
    "from bench import _max_rss_mb;"
    "atexit.register(lambda: print(f'PEAK_RSS_MB {{_max_rss_mb():.0f}}', file=sys.stderr));"
    "from eptq_onnx.cli import main; main()"
)
TARGET_MB = 4096
# The child also prints VmRSS/VmHWM after each pipeline stage (context.RunContext.stage).
STAGES = (
    "import contextlib; from eptq_onnx import context; from bench import _max_rss_mb; _stage = context.RunContext.stage\n"
    "def _rss_mb():\n"
    "    line = next(l for l in open('/proc/self/status') if l.startswith('VmRSS:'))\n"
    "    return int(line.split()[1]) / 1024\n"
    "@contextlib.contextmanager\n"
    "def _traced(self, name):\n"
    "    with _stage(self, name):\n"
    "        yield\n"
    "    print(f'STAGE_RSS_MB {name.replace(\" \", \"_\")} {_rss_mb():.0f} {_max_rss_mb():.0f}', file=sys.stderr)\n"
    "context.RunContext.stage = _traced\n"
)
BIG = {"small": (2048, 8192, 6), "over-2gb": (4096, 16384, 9)}  # width, hidden, layers
BIG_TARGET_RATIO = 3.0


def write_samples(folder: Path, n: int, seed: int = 0) -> int:
    """``n`` random 3x224x224 float32 samples, one .npy each; returns the bytes written."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        np.save(folder / f"{i:05d}.npy", rng.standard_normal((3, 224, 224), dtype=np.float32))
    return n * 3 * 224 * 224 * 4


def run_cli(model: Path, calib: Path, out: Path, report: Path, extra: list[str],
            stages: bool = False) -> tuple[float, float, str]:
    """(peak RSS MB, wall seconds, stderr) of one CLI run in a child process (``stages``: it also
    prints STAGE_RSS_MB lines)."""
    child = CHILD.format(root=str(ROOT), tools=str(ROOT / "tools"))
    if stages:
        head, tail = child.split("from eptq_onnx.cli import main; main()")
        child = head + "\n" + STAGES + "from eptq_onnx.cli import main; main()" + tail
    argv = [sys.executable, "-c", child,
            str(model), str(out), "--calib", str(calib), "--iters", "0", "-q", "--force", "--report", str(report), *extra]
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"the CLI failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    peak = next(float(line.split()[1]) for line in done.stderr.splitlines() if line.startswith("PEAK_RSS_MB"))
    return peak, seconds, done.stderr


def big(kind: str, write: Path | None) -> int:
    """The --big run: build the chain, quantize it in a child, report the peak per stage."""
    width, hidden, layers = BIG[kind]
    with tempfile.TemporaryDirectory(prefix="eptq-scale-big-") as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        model = zoo_large.matmul_chain(folder, width, hidden, layers)
        build_s = time.perf_counter() - start
        weight_mb = (folder / "big.onnx.data").stat().st_size / 2**20
        (folder / "calib").mkdir()
        for i in range(2):
            np.save(folder / "calib" / f"{i}.npy", np.random.default_rng(i).standard_normal(width).astype(np.float32))
        extra = ["--weight-bits", "8", "--weight-init", "mse", "--validation-samples", "2"]
        peak, seconds, stderr = run_cli(model, folder / "calib", folder / "out.onnx", folder / "r.json", extra, stages=True)
        report = json.loads((folder / "r.json").read_text())
        out_mb = sum(p.stat().st_size for p in folder.glob("out.onnx*")) / 2**20
    stage_rss = [line.split()[1:] for line in stderr.splitlines() if line.startswith("STAGE_RSS_MB")]
    ratio = peak / weight_mb
    # what the model adds: the peak above the RSS after loading (imports of torch/onnxruntime: ~0.8 GB)
    loaded_mb = float(stage_rss[0][1]) if stage_rss else 0.0
    added = (peak - loaded_mb) / weight_mb
    rows = {
        "model": f"MatMul -> Relu chain, {layers} layers {width}x{hidden} / {hidden}x{width}, "
                 f"{weight_mb:.0f} MiB float32 weights in external data (built in {build_s:.0f} s)",
        "settings": "W8A8, --iters 0, --weight-init mse, 2 calibration samples, --validation-samples 2",
        "peak RSS (VmHWM)": f"{peak:.0f} MiB = {ratio:.2f}x the weight bytes; {peak - loaded_mb:.0f} MiB = {added:.2f}x "
                            f"above the RSS after loading (target <= {BIG_TARGET_RATIO:.0f}x: "
                            f"{'met' if added <= BIG_TARGET_RATIO else 'NOT met'})",
        "RSS after each stage (MiB, now / peak so far)": ", ".join(f"{n.replace('_', ' ')} {r} / {h}" for n, r, h in stage_rss),
        "output": f"{out_mb:.0f} MiB (INT8 weights), output SQNR "
                  f"{min(report['validation']['output_sqnr_db'].values()):.1f} dB vs the float model",
        "wall time": f"{seconds:.0f} s",
        "stage timings (s)": ", ".join(f"{k} {v:.1f}" for k, v in report["timings_s"].items()),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, Python {platform.python_version()}",
    }
    text = "\n".join(f"| {k} | {v} |" for k, v in rows.items())
    print(text)
    if write:
        heading = f"## Large model: {kind} ({weight_mb * 2**20 / 1e9:.1f} GB of weights)"
        body = f"Produced by `python tools/bench_scale.py --big {kind} --write {write}`.\n\n| | |\n|---|---|\n{text}\n"
        write_section(write, heading, body)
    return 0 if added <= BIG_TARGET_RATIO else 1


def write_section(path: Path, heading: str, body: str) -> None:
    """Replace the ``heading`` section of the markdown file (up to the next '## ' heading), or append it."""
    text = path.read_text() if path.exists() else ""
    start = text.find(heading + "\n")
    if start < 0:
        text = text.rstrip("\n") + f"\n\n{heading}\n\n{body}"
    else:
        end = text.find("\n## ", start + len(heading))
        text = text[:start] + f"{heading}\n\n{body}" + (text[end:] if end >= 0 else "")
    path.write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--weight-bits", type=int, default=8)
    parser.add_argument("--big", choices=sorted(BIG), default=None,
                        help="quantize the large MatMul chain instead (see module doc)")
    parser.add_argument("--write", type=Path, default=None, help="write the results as markdown here")
    args = parser.parse_args()
    if args.big:
        return big(args.big, args.write)
    with tempfile.TemporaryDirectory(prefix="eptq-scale-") as tmp:
        folder = Path(tmp)
        model = zoo.resnet50()
        onnx.save(model, folder / "resnet50.onnx")
        params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
        data_bytes = write_samples(folder / "calib", args.samples)
        extra = ["--weight-bits", str(args.weight_bits), "--num-calib", str(args.samples)]
        peak, seconds, _ = run_cli(folder / "resnet50.onnx", folder / "calib", folder / "out.onnx", folder / "r.json", extra)
        report = json.loads((folder / "r.json").read_text())
    rows = {
        "model": f"ResNet-50 (torchvision, random weights), {params / 1e6:.1f} M parameters, {params * 4 / 1e6:.0f} MB float32",
        "calibration data": f"{args.samples} samples of 3x224x224 float32 (.npy, {data_bytes / 1e9:.2f} GB on disk)",
        "settings": f"W{args.weight_bits}A8, --iters 0 (no EPTQ), calibration batch 16",
        "peak RSS (VmHWM)": f"{peak:.0f} MB (target < {TARGET_MB} MB: {'met' if peak < TARGET_MB else 'NOT met'})",
        "wall time": f"{seconds:.0f} s",
        "stage timings (s)": ", ".join(f"{k} {v:.1f}" for k, v in report["timings_s"].items()),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, Python {platform.python_version()}",
    }
    text = "\n".join(f"| {k} | {v} |" for k, v in rows.items())
    print(text)
    if args.write:
        command = "python tools/bench_scale.py" + (f" --samples {args.samples}" if args.samples != 1024 else "") + \
            f" --write {args.write}"
        old = args.write.read_text() if args.write.exists() else ""
        others = old[old.find("\n## "):] if "\n## " in old else ""
        args.write.write_text(
            f"# Scale: calibration memory\n\nProduced by `{command}`.\n\n"
            "Calibration, weight initialization and validation read the calibration folder batch by batch; "
            "this run measures the peak resident set of the whole CLI run (child process, VmHWM at exit).\n\n"
            f"| | |\n|---|---|\n{text}\n" + others
        )
    return 0 if peak < TARGET_MB else 1


if __name__ == "__main__":
    sys.exit(main())
