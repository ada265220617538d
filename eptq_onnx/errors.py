"""Error types of eptq-onnx, each with the process exit code the CLI uses.

Every error carries one line that names the problem and what to do about it.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional


class EptqError(Exception):
    """Base class: a failure we explain to the user in one line."""

    exit_code = 1


class UsageError(EptqError):
    """Bad options or paths (exit 2)."""

    exit_code = 2


class ModelError(EptqError):
    """The input model cannot be read or quantized (exit 3)."""

    exit_code = 3


class CalibrationError(EptqError):
    """The calibration data is missing, unreadable or does not fit the model (exit 4)."""

    exit_code = 4


class ValidationError(EptqError):
    """The written model failed validation (exit 5); ``validation`` holds what was measured before."""

    exit_code = 5

    def __init__(self, message: str, validation: Any = None) -> None:
        super().__init__(message)
        self.validation = validation


class TargetNotReached(EptqError):
    """``--strict``: the fidelity target (``--min-sqnr``) was not reached (exit 6)."""

    exit_code = 6


INTERRUPTED_EXIT_CODE = 130


def error_entry(exc: BaseException, stages: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The report's account of what stopped a run: exit code, category, failing stage, one-line message."""
    if isinstance(exc, EptqError):
        code, category = exc.exit_code, type(exc).__name__
    elif isinstance(exc, KeyboardInterrupt):  # Ctrl-C, or SIGTERM raised as one by the CLI
        code, category = getattr(exc, "exit_code", INTERRUPTED_EXIT_CODE), "Interrupted"
    else:
        code, category = 1, f"InternalError ({type(exc).__name__})"
    text = str(exc).strip()
    failed: Optional[str] = next((s["name"] for s in reversed(stages) if s["status"] == "failed"), None)
    return {"code": code, "category": category, "stage": failed, "message": text.splitlines()[0] if text else category}
