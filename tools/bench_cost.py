"""Cost benchmark: wall time and peak RSS of ``--iters 0`` against onnxruntime's quantize_static MinMax.

    python tools/bench_cost.py [--model ppocrv5_det] [--size 736] [--samples 64] [--write docs/BENCHMARKS_COST.md]
    python tools/bench_cost.py --zoo db_text_detector --size 320 --samples 256 --only ours

Generates ``--samples`` calibration images of ``--size`` x ``--size`` for a corpus DB text detector
(tools/corpuslib's page and scene generator, the model's own normalization; cached in ``--work``),
then quantizes the model in child processes, one after the other, on the same files: ours with
``--weight-bits 8 --act-bits 8 --iters 0`` and quantize_static MinMax (tools/corpuslib/ort_quant.py,
QDQ, per-channel int8 weights). Each child's wall time and peak resident set (its own VmHWM) are
measured as the corpus measures them (tools/corpuslib/runner.run_child), and its CPU time (user + system, all
threads: on a shared machine the fairer ratio). Targets (issue 17, 2e):
ours within 2x of quantize_static's wall time, and a peak RSS within 3 GB plus 3x the model's size.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tools.corpuslib import models as corpus  # noqa: E402
from tools.corpuslib import runner  # noqa: E402

TIME_RATIO = 2.0  # ours / quantize_static wall time, at most
RSS_BASE_MB = 3 * 1024  # peak RSS at most this plus RSS_MODEL_FACTOR x the model's size
RSS_MODEL_FACTOR = 3


def calibration_folder(work: Path, size: int, samples: int, seed: int) -> Path:
    """The folder of ``samples`` detector inputs at ``size`` (written once, then reused)."""
    folder = work / f"calib_{size}_{samples}_{seed}"
    if not (folder / ".complete").exists():
        runner.write_feeds(folder, corpus.db_det_feeds(np.random.default_rng(seed), samples, size))
        (folder / ".complete").write_text("")
    return folder


def ours_command(model: Path, calib: Path, out: Path) -> list:
    """The child module and arguments of our ``--iters 0`` W8A8 run."""
    return ["eptq_onnx.cli", str(model), str(out), "--calib", str(calib), "--weight-bits", "8", "--act-bits", "8",
            "--iters", "0", "--report", str(out.with_suffix(".report.json")), "--force", "-q"]


def measure(args: list, work: Path, timeout_s: float, rss_limit_mb: float) -> dict:
    """Exit code, wall and CPU seconds, peak RSS MB and last error line of one child run."""
    work.mkdir(parents=True, exist_ok=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    rc, wall, peak_mb, stderr = runner.run_child(args, work, timeout_s, rss_limit_mb)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"rc": rc, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "peak_rss_mb": round(peak_mb),
            "error": "" if rc == 0 else stderr[-400:], "command": "python -m " + shlex.join(args)}


def _commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                               text=True).stdout.strip()
        return head + ("+uncommitted changes" if dirty else "")
    except OSError:
        return "unknown"


def render(results: dict, setup: dict) -> str:
    """The markdown page of one benchmark run."""
    ours, ort = results["ours"], results["ort_minmax"]
    bound = RSS_BASE_MB + RSS_MODEL_FACTOR * setup["model_mb"]
    ratio = ours["wall_s"] / ort["wall_s"] if ort["wall_s"] else float("nan")
    cpu_ratio = ours["cpu_s"] / ort["cpu_s"] if ort["cpu_s"] else float("nan")
    unfinished = ours["rc"] != 0
    lines = [
        "# Cost: --iters 0 against quantize_static MinMax",
        "",
        f"Produced by `{setup['command']}` at commit {setup['commit']} on {setup['date']}.",
        "",
        f"- model: {setup['model_name']} (`{setup['model_rel']}`, {setup['model_mb']:.1f} MB)",
        f"- calibration: {setup['samples']} images of 3x{setup['size']}x{setup['size']} float32, the same files for both",
        f"- machine: {setup['machine']}; onnxruntime {setup['ort']}",
        "- wall time and peak RSS (VmHWM) are those of each quantizing child process, run one after the other on a "
        "machine that may be shared: compare the ratio, not absolute times",
        "",
        "| quantizer | exit | wall s | CPU s | peak RSS MB |",
        "| --- | --- | --- | --- | --- |",
        f"| ours W8A8 --iters 0 | {ours['rc']} | {ours['wall_s']:.1f} | {ours['cpu_s']:.1f} | {ours['peak_rss_mb']} |",
        f"| quantize_static MinMax | {ort['rc']} | {ort['wall_s']:.1f} | {ort['cpu_s']:.1f} | {ort['peak_rss_mb']} |",
        "",
        f"- wall time ratio ours / quantize_static: **{'at least ' if unfinished else ''}{ratio:.2f}** (target <= "
        f"{TIME_RATIO:g}: {'met' if ratio <= TIME_RATIO and not unfinished else 'NOT met'}); CPU time ratio "
        f"{'at least ' if unfinished else ''}{cpu_ratio:.2f}",
        f"- peak RSS{' until it was killed' if unfinished else ''}: **{ours['peak_rss_mb']} MB** (target <= "
        f"{RSS_BASE_MB} MB + {RSS_MODEL_FACTOR} x model = {bound:.0f} MB: {'met' if ours['peak_rss_mb'] <= bound else 'NOT met'})",
    ]
    if setup.get("timings"):
        lines.append("- our stage timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in setup["timings"].items()))
    for key, res in results.items():
        if res["error"]:
            lines.append(f"- {key} failed: `{' '.join(res['error'].split())[-300:]}`")
    lines += ["", "Commands (child processes):", ""]
    lines += [f"- `{res['command']}`" for res in results.values()]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="ppocrv5_det", help="a corpus DB detector entry (tools/corpuslib/models.py)")
    ap.add_argument("--zoo", help="a zoo model taking the detector's input instead (e.g. db_text_detector)")
    ap.add_argument("--cache", type=Path, default=runner.DEFAULT_CACHE)
    ap.add_argument("--size", type=int, default=736)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=Path("/tmp/eptq-bench-cost"))
    ap.add_argument("--only", choices=("ours", "ort_minmax"),
                    help="run one quantizer (the page takes the other's last measurement in --work)")
    ap.add_argument("--timeout", type=float, default=1800.0)
    ap.add_argument("--rss-limit-mb", type=float, default=16000.0)
    ap.add_argument("--write", type=Path, help="write the markdown page here")
    args = ap.parse_args()

    if args.zoo:  # a zoo model with the detector's input "x" [N,3,H,W] (models/zoo_families.py)
        from models import zoo

        model_path, model_name, model_rel = args.work / f"{args.zoo}.onnx", args.zoo, "models/zoo_families.py"
        args.work.mkdir(parents=True, exist_ok=True)
        onnx.save(zoo.ZOO[args.zoo](), model_path)
    else:
        entry = corpus.BY_NAME[args.model]
        model_path, model_name, model_rel = runner.context(entry, args.cache).model, entry.name, entry.member
    calib = calibration_folder(args.work, args.size, args.samples, args.seed)
    jobs = {"ours": ours_command(model_path, calib, args.work / "ours" / "model.onnx"),
            "ort_minmax": ["tools.corpuslib.ort_quant", str(model_path), str(args.work / "ort_minmax" / "model.onnx"),
                           str(calib), "MinMax"]}
    results = {}
    for key, cmd in jobs.items():
        saved = args.work / key / "result.json"
        if args.only and key != args.only:  # the other quantizer's last measurement, if any
            if saved.exists():
                results[key] = json.loads(saved.read_text())
            continue
        results[key] = measure(cmd, args.work / key, args.timeout, args.rss_limit_mb)
        saved.write_text(json.dumps(results[key]))
        print(key, json.dumps({k: v for k, v in results[key].items() if k != "command"}), flush=True)
    report = args.work / "ours" / "model.report.json"
    timings = json.loads(report.read_text()).get("timings_s", {}) if "ours" in results and report.exists() else {}
    if timings:
        print("stages", json.dumps(timings))
    if args.write and set(results) == set(jobs):
        import onnxruntime

        setup = {
            "command": "python tools/bench_cost.py " + shlex.join(sys.argv[1:]), "commit": _commit(),
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "model_name": model_name,
            "model_rel": model_rel, "model_mb": model_path.stat().st_size / 2**20, "samples": args.samples,
            "size": args.size, "ort": onnxruntime.__version__, "timings": timings,
            "machine": f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), Python {platform.python_version()}",
        }
        args.write.write_text(render(results, setup))


if __name__ == "__main__":
    main()
