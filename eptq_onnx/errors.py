"""Error types of eptq-onnx, each with the process exit code the CLI uses.

Every error carries one line that names the problem and what to do about it.
"""
from __future__ import annotations


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
    """The written model failed validation (exit 5)."""

    exit_code = 5
