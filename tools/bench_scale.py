"""Scale benchmark: peak memory of calibrating a ResNet-50-sized model on 1024 samples of 3x224x224.

    python tools/bench_scale.py [--samples 1024] [--write docs/BENCHMARKS_SCALE.md]

Builds torchvision's ResNet-50 (random weights, models/zoo.py), writes ``--samples`` random
3x224x224 float32 samples as .npy files in a temporary folder, and runs the CLI with
``--iters 0`` (calibration, weight init, QDQ write, validation; no EPTQ) in a child process whose
peak resident set (VmHWM) is measured at its exit. Calibration streams the folder batch by batch,
so the peak must not grow with the number of samples (target: under 4 GB).
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

from models import zoo  # noqa: E402

# The child runs the CLI and prints its own VmHWM on exit (tools/bench.py's _max_rss_mb).
CHILD = (
    "import atexit, sys; sys.path.insert(0, {root!r}); sys.path.insert(0, {tools!r});"
    "from bench import _max_rss_mb;"
    "atexit.register(lambda: print(f'PEAK_RSS_MB {{_max_rss_mb():.0f}}', file=sys.stderr));"
    "from eptq_onnx.cli import main; main()"
)
TARGET_MB = 4096


def write_samples(folder: Path, n: int, seed: int = 0) -> int:
    """``n`` random 3x224x224 float32 samples, one .npy each; returns the bytes written."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        np.save(folder / f"{i:05d}.npy", rng.standard_normal((3, 224, 224), dtype=np.float32))
    return n * 3 * 224 * 224 * 4


def run_cli(model: Path, calib: Path, out: Path, report: Path, extra: list[str]) -> tuple[float, float, str]:
    """(peak RSS MB, wall seconds, stderr) of one CLI run in a child process."""
    argv = [sys.executable, "-c", CHILD.format(root=str(ROOT), tools=str(ROOT / "tools")),
            str(model), str(out), "--calib", str(calib), "--iters", "0", "-q", "--force", "--report", str(report), *extra]
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"the CLI failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    peak = next(float(line.split()[1]) for line in done.stderr.splitlines() if line.startswith("PEAK_RSS_MB"))
    return peak, seconds, done.stderr


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--weight-bits", type=int, default=8)
    parser.add_argument("--write", type=Path, default=None, help="write the results as markdown here")
    args = parser.parse_args()
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
        args.write.write_text(
            f"# Scale: calibration memory\n\nProduced by `{command}`.\n\n"
            "Calibration, weight initialization and validation read the calibration folder batch by batch; "
            "this run measures the peak resident set of the whole CLI run (child process, VmHWM at exit).\n\n"
            f"| | |\n|---|---|\n{text}\n"
        )
    return 0 if peak < TARGET_MB else 1


if __name__ == "__main__":
    sys.exit(main())
