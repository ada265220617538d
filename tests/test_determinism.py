"""Same model, data, options and seed: a byte-identical output model, across processes."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from eptq_onnx import QuantConfig, quantize
from eptq_onnx.config import OptimizeOptions
from models import zoo

ROOT = Path(__file__).resolve().parents[1]


def _quantize(model: Path, calib: Path, out: Path, hash_seed: str, *options: str) -> bytes:
    """One CLI run in a fresh process (its own hash seed, so set/dict-order dependence shows)."""
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    argv = [sys.executable, "-m", "eptq_onnx.cli", str(model), str(out), "--calib", str(calib), "-q", *options]
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return out.read_bytes()


EPTQ_5 = ("--iters", "5", "--hessian-samples", "2", "--hessian-draws", "2", "--opt-batch-size", "4")


@pytest.mark.parametrize(
    ("builder", "options"),
    [(zoo.residual_cnn, ("--iters", "0")), (zoo.mlp, EPTQ_5)],
    ids=["residual-cnn-init-only", "mlp-eptq-5-steps"],
)
def test_same_seed_gives_byte_identical_model(tmp_path: Path, calib_for, builder, options: tuple[str, ...]) -> None:
    model = builder()
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    calib = calib_for(model, 8)
    first = _quantize(path, calib, tmp_path / "a.onnx", "1", *options)
    second = _quantize(path, calib, tmp_path / "b.onnx", "2", *options)
    assert first == second


def test_another_seed_changes_the_optimized_model(calib_for) -> None:
    """The seed does reach the optimization (else the test above proves little)."""
    model = zoo.mlp()
    calib = calib_for(model, 16)
    models = [
        quantize(model, calib, QuantConfig(optimize=OptimizeOptions(iters=20, hessian_samples=2, hessian_draws=2, batch_size=4,
                                                                    seed=seed, discard_if_worse=False)),
                 progress=False).model.SerializeToString()
        for seed in (0, 1)
    ]
    assert models[0] != models[1]
