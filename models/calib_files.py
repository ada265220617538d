"""Calibration folders for the zoo's models, shared by tests and tools/ (bench, fuzz)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from models import zoo


def write_calib(model: onnx.ModelProto, folder: Path, n: int = 24, seed: int = 0) -> Path:
    """A calibration folder for ``model``: one .npz per sample, keyed by input name."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        feeds = zoo.sample_inputs(model, 1, seed * 100_003 + i)
        np.savez(folder / f"{i:04d}.npz", **{k: v[0] for k, v in feeds.items()})
    return folder
