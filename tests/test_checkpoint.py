"""--checkpoint: an interrupted optimization resumes to the same model as an uninterrupted run."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from eptq_onnx import QuantConfig, quantize
from eptq_onnx.eptq.checkpoint import FILE_NAME, deferred_stops
from eptq_onnx.config import OptimizeOptions
from eptq_onnx.errors import UsageError
from eptq_onnx.eptq.objective import Objective
from models import zoo


def _config(checkpoint: Path | None, seed: int = 0) -> QuantConfig:
    options = OptimizeOptions(iters=16, weighting="uniform", batch_size=8, seed=seed, discard_if_worse=False,
                              checkpoint_dir=None if checkpoint is None else str(checkpoint), checkpoint_every_s=0.0)
    return QuantConfig(weight_bits=4, optimize=options)


def _count_steps(monkeypatch: pytest.MonkeyPatch, signal_at: int = 0, signum: int = signal.SIGINT) -> dict:
    """Count loss evaluations (timing passes + steps); deliver ``signum`` during call ``signal_at``."""
    original = Objective.losses
    calls = {"n": 0}

    def losses(self, batch, beta):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == signal_at:
            os.kill(os.getpid(), signum)
        return original(self, batch, beta)

    monkeypatch.setattr(Objective, "losses", losses)
    return calls


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _interrupted_run(model, calib, folder: Path, monkeypatch: pytest.MonkeyPatch, signum: int) -> None:  # type: ignore[no-untyped-def]
    with monkeypatch.context() as patch:
        _count_steps(patch, signal_at=2 + 2 + 7, signum=signum)  # 2 memory probes, 2 timing passes, then step 7 of 16
        with pytest.raises(KeyboardInterrupt):
            quantize(model, calib, _config(folder), progress=False)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path: Path, calib_for, monkeypatch, signum: int) -> None:
    model = zoo.residual_cnn()
    calib = calib_for(model, 16)
    reference = quantize(model, calib, _config(None), progress=False).model.SerializeToString()

    folder = tmp_path / "ckpt"
    # as the CLI does: SIGTERM unwinds (the loop delivers it again after saving the last whole step)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        _interrupted_run(model, calib, folder, monkeypatch, signum)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert (folder / FILE_NAME).exists()
    assert not [p for p in folder.iterdir() if p.name != FILE_NAME]  # no temporary file left

    calls = _count_steps(monkeypatch)
    resumed = quantize(model, calib, _config(folder), progress=False)
    assert resumed.model.SerializeToString() == reference
    assert resumed.report.optimization["iters"] == 16
    assert calls["n"] == 16 - 7  # the signal came during step 7; it completed, the rest ran now
    # the finished checkpoint resumes at its end: no step runs again, same model
    calls["n"] = 0
    again = quantize(model, calib, _config(folder), progress=False)
    assert again.model.SerializeToString() == reference and calls["n"] == 0


def test_checkpoint_of_other_settings_is_refused(tmp_path: Path, calib_for) -> None:
    model = zoo.mlp()
    calib = calib_for(model, 16)
    quantize(model, calib, _config(tmp_path), progress=False)
    with pytest.raises(UsageError, match="belongs to another model, calibration set or settings"):
        quantize(model, calib, _config(tmp_path, seed=1), progress=False)


def test_unreadable_checkpoint_is_a_clear_error(tmp_path: Path, calib_for) -> None:
    model = zoo.mlp()
    (tmp_path / FILE_NAME).write_bytes(b"not a checkpoint")
    with pytest.raises(UsageError, match="cannot be read"):
        quantize(model, calib_for(model, 16), _config(tmp_path), progress=False)


def test_an_ignored_signal_stays_ignored_while_stops_are_deferred() -> None:
    """SIGINT ignored (a background job's): the loop is not stopped by it, nothing is raised after."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with deferred_stops() as stop:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGINT)
            assert not stop
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
