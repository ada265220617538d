"""Ctrl-C and SIGTERM in any long stage: a clean exit (130 / 143), one message, nothing written."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner

from eptq_onnx import pipeline

from eptq_onnx.eptq import stage as eptq
from eptq_onnx.init import stage as init_stage
from eptq_onnx.cli import main
from models import zoo

ROOT = Path(__file__).resolve().parents[1]
FAST_EPTQ = ["--hessian-samples", "2", "--hessian-draws", "2", "--opt-batch-size", "4"]
# module, function: the entry of each long stage (as the module that calls it looks it up)
STAGES = {
    "weight init": (init_stage, "init_weights"),
    "calibration": (pipeline, "calibrate_activations"),
    "LFH": (eptq, "compute_lfh"),
    "optimization": (eptq, "optimize"),
    "validation": (pipeline, "validate"),
    "save": (pipeline, "save_model"),
}


@pytest.fixture
def files(tmp_path: Path, calib_for) -> tuple[Path, Path, Path]:
    model = zoo.mlp()
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    return path, calib_for(model, 8), out_dir


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("stage", sorted(STAGES))
def test_signal_in_each_stage_exits_cleanly(stage: str, signum: int, files, monkeypatch: pytest.MonkeyPatch) -> None:
    """The signal arrives as the stage starts (in this process): the run unwinds from there."""
    model, calib, out_dir = files
    module, name = STAGES[stage]
    real = getattr(module, name)
    entered = []

    def signalled(*args, **kwargs):
        entered.append(stage)
        os.kill(os.getpid(), signum)
        time.sleep(5)  # interrupted by the signal's exception
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, signalled)
    previous = signal.getsignal(signal.SIGTERM)
    result = CliRunner().invoke(main, [str(model), str(out_dir / "q.onnx"), "--calib", str(calib), "-q",
                                       "--iters", "3", "--report", str(out_dir / "r.json"), *FAST_EPTQ])
    assert entered == [stage]
    expected = (143, "terminated (SIGTERM): nothing was written") if signum == signal.SIGTERM else (130, "interrupted: nothing was written")
    assert (result.exit_code, result.output.strip()) == expected
    # no model; the report (written on every exit after the model was read) says what ended the run
    assert [p.name for p in out_dir.iterdir()] == ["r.json"]
    error = json.loads((out_dir / "r.json").read_text())["error"]
    assert error is not None and error["code"] == expected[0] and error["category"] == "Interrupted"
    assert signal.getsignal(signal.SIGTERM) is previous  # the CLI's handler is gone after the run


DRIVER = textwrap.dedent(
    """
    import sys
    from eptq_onnx.eptq import stage as eptq
    from eptq_onnx.cli import main

    def announce(module, name, stage):
        real = getattr(module, name)
        def wrapper(*args, **kwargs):
            print("STAGE", stage, file=sys.stderr, flush=True)
            return real(*args, **kwargs)
        setattr(module, name, wrapper)

    announce(eptq, "optimize", "optimization")
    main()
    """
)


def _signal_when(stage: str, argv: list[str], signum: int, delay: float) -> tuple[int, str]:
    """Run the CLI in a child process; signal it ``delay`` s after it enters ``stage``."""
    child = subprocess.Popen([sys.executable, "-c", DRIVER, *argv], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    assert child.stderr is not None
    lines = []
    for line in child.stderr:
        lines.append(line)
        if line.strip() == f"STAGE {stage}":
            time.sleep(delay)
            child.send_signal(signum)
            break
    _, rest = child.communicate(timeout=120)
    return child.wait(), "".join(lines) + rest


def test_sigterm_mid_optimization_in_a_child_process(files) -> None:
    """A real SIGTERM, from outside, a second into a long optimization."""
    model, calib, out_dir = files
    argv = [str(model), str(out_dir / "q.onnx"), "--calib", str(calib), "-q", "--iters", "1000000", *FAST_EPTQ]
    code, stderr = _signal_when("optimization", argv, signal.SIGTERM, delay=1.0)
    assert code == 143, stderr
    assert stderr.strip().splitlines()[-1] == "terminated (SIGTERM): nothing was written"
    assert list(out_dir.iterdir()) == []
