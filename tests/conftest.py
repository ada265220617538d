"""Shared fixtures: the repo root on sys.path (for models/), calibration folders from zoo models."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models import zoo  # noqa: E402


def write_calib(model: onnx.ModelProto, folder: Path, n: int = 24, seed: int = 0) -> Path:
    """A calibration folder for ``model``: one .npz per sample, keyed by input name."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        feeds = zoo.sample_inputs(model, 1, seed * 100_003 + i)
        np.savez(folder / f"{i:04d}.npz", **{k: v[0] for k, v in feeds.items()})
    return folder


@pytest.fixture
def calib_for(tmp_path: Path) -> Callable[..., Path]:
    """Make a calibration folder for a model: ``calib_for(model, n=24)``."""

    def make(model: onnx.ModelProto, n: int = 24, name: str = "calib") -> Path:
        return write_calib(model, tmp_path / name, n)

    return make
