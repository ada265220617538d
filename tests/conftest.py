"""Shared fixtures: the repo root on sys.path (for models/), calibration folders from zoo models;
Ctrl-C raises KeyboardInterrupt in every test run."""
from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Callable

import onnx
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.calib_files import write_calib  # noqa: E402

# A shell without job control starts a background job with SIGINT ignored, and Python then keeps
# it ignored: the interrupt tests' SIGINT would do nothing. Their children (which inherit an
# ignored signal but not a handler) get Python's default KeyboardInterrupt too.
signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
def calib_for(tmp_path: Path) -> Callable[..., Path]:
    """Make a calibration folder for a model: ``calib_for(model, n=24)``."""

    def make(model: onnx.ModelProto, n: int = 24, name: str = "calib") -> Path:
        return write_calib(model, tmp_path / name, n)

    return make
