"""Checkpoints of the EPTQ optimization: save the loop's whole state, resume it bit for bit.

A checkpoint holds the student's parameters and buffers (rounding variables, biases, step
multipliers), the optimizer state, the minibatch sampler's RNG state, the step reached, the
chosen step count, the loss scale and the loss curve so far. Resuming from it under the same
model, calibration data and settings gives the same result as a run that was never stopped.
A fingerprint of what the run depends on guards against resuming a different run.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch

from eptq_onnx.config import OptimizeOptions
from eptq_onnx.errors import UsageError

FILE_NAME = "eptq_checkpoint.pt"
# settings that do not change the computation (where it runs, how long it may take)
_NEUTRAL = ("device", "time_budget_min", "max_iters", "checkpoint_dir", "checkpoint_every_s")


@dataclass
class LoopState:
    """Where the optimization loop stands, besides the tensors."""

    step: int
    iters: int
    loss_scale: float
    step_seconds: float
    why: str
    seconds: float = 0.0
    curve: List[Tuple[int, float, float]] = field(default_factory=list)
    replanned: bool = False  # the time-budgeted step count was re-planned from the loop's step times
    batch_size: int = 0  # the minibatch size the loop runs with (memory.fit_batch may lower the one asked)


def fingerprint(student: torch.nn.Module, loss_weights: Dict[str, float], options: OptimizeOptions,
                data: Dict[str, torch.Tensor]) -> str:
    """A digest of the student's initial state, the loss weights, the settings and the data."""
    digest = hashlib.sha256()
    settings = {k: v for k, v in asdict(options).items() if k not in _NEUTRAL}
    digest.update(json.dumps({"settings": settings, "weights": loss_weights}, sort_keys=True, default=str).encode())
    for name, tensor in sorted({**student.state_dict(), **{f"data:{k}": v for k, v in data.items()}}.items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class Checkpoint:
    """The checkpoint file of one folder: ``load`` what a stopped run left, ``save`` atomically."""

    def __init__(self, folder: Path, digest: str) -> None:
        self.folder = Path(folder)
        self.path = self.folder / FILE_NAME
        self.digest = digest
        if self.folder.exists() and not self.folder.is_dir():
            raise UsageError(f"--checkpoint {folder} is a file: give a folder")
        self.folder.mkdir(parents=True, exist_ok=True)
        if not os.access(self.folder, os.W_OK):
            raise UsageError(f"--checkpoint folder {folder} is not writable: choose another folder")

    def load(self) -> Optional[Dict[str, Any]]:
        """The saved state, or None when the folder holds none; an error when it is another run's."""
        if not self.path.exists():
            return None
        try:
            saved = torch.load(self.path, map_location="cpu", weights_only=False)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user-facing problem
            raise UsageError(f"checkpoint {self.path} cannot be read ({type(exc).__name__}): delete it to start over") from exc
        if saved.get("fingerprint") != self.digest:
            raise UsageError(
                f"checkpoint {self.path} belongs to another model, calibration set or settings: "
                "delete it or choose another --checkpoint folder"
            )
        return saved

    def save(self, loop: LoopState, student: torch.nn.Module, optimizer: Any,
             rng_state: Dict[str, Any]) -> None:
        """Write the state to a temporary file in the folder, then rename it over the checkpoint."""
        state = {
            "fingerprint": self.digest,
            "loop": asdict(loop),
            "student": {k: v.detach().cpu().clone() for k, v in student.state_dict().items()},
            "optimizer": optimizer.state_dict(),
            "rng": rng_state,
            "torch_rng": torch.get_rng_state(),
        }
        handle, temporary = tempfile.mkstemp(prefix=".eptq_checkpoint.", suffix=".tmp", dir=self.folder)
        os.close(handle)
        try:
            torch.save(state, temporary)
            os.replace(temporary, self.path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise


def restore(saved: Dict[str, Any], student: torch.nn.Module, optimizer: Any) -> Tuple[LoopState, Dict[str, Any]]:
    """Put the saved tensors back (in place) and return the loop state and the sampler's RNG state."""
    student.load_state_dict(saved["student"])
    optimizer.load_state_dict(saved["optimizer"])
    torch.set_rng_state(saved["torch_rng"])
    loop = saved["loop"]
    loop["curve"] = [tuple(point) for point in loop["curve"]]
    return LoopState(**loop), saved["rng"]


class StopRequest:
    """Set when Ctrl-C or SIGTERM arrived while ``deferred_stops`` was active."""

    def __init__(self) -> None:
        self.signal: Optional[int] = None

    def __bool__(self) -> bool:
        return self.signal is not None


@contextmanager
def deferred_stops() -> Iterator[StopRequest]:
    """Hold Ctrl-C and SIGTERM back while the loop finishes its step (so a checkpoint never holds a
    half-applied update); the loop stops at ``request`` and, when the block ends, the signal is
    delivered again to the handler that was in place before (the CLI's: exit 130 / 143).
    Outside the main thread nothing is deferred, and a signal the process ignores (SIGINT in a job
    started in the background by a shell without job control) stays ignored."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    previous = {sig: old for sig, old in previous.items() if old is not signal.SIG_IGN}

    def handler(signum: int, frame: object) -> None:
        request.signal = signum

    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield request
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
    if request.signal is not None:
        signal.raise_signal(request.signal)
