"""--device cuda end to end: LFH, EPTQ optimization and mixed-precision sensitivities on the GPU,
validation on CPU onnxruntime. Runs only where torch sees a CUDA device (skipped with the reason
otherwise): this project's CI machines have none, so a GPU session runs it by hand."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from eptq_onnx import QuantConfig, quantize
from eptq_onnx.config import MixedPrecisionOptions, OptimizeOptions
from eptq_onnx.graph.runtime import make_session

DEMO = Path(__file__).resolve().parents[1] / "models" / "demo"

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible to torch on this machine")


def _demo_sqnr(model) -> float:  # type: ignore[no-untyped-def]
    """Output SQNR (dB) of ``model`` against the float demo model on its test images."""
    x = np.load(DEMO / "test.npz")["image"][:200].astype(np.float32)
    ref = make_session(onnx.load(DEMO / "digits_resnet.onnx")).run(None, {"image": x})[0]
    out = make_session(model).run(None, {"image": x})[0]
    return float(10 * np.log10(np.sum(ref**2) / max(np.sum((ref - out) ** 2), 1e-30)))


def test_eptq_on_cuda_writes_a_validated_model_better_than_its_init() -> None:
    base = QuantConfig(weight_bits=4, optimize=OptimizeOptions(iters=0))
    init = quantize(DEMO / "digits_resnet.onnx", DEMO / "calib", base, progress=False)
    cuda = QuantConfig(weight_bits=4, optimize=OptimizeOptions(iters=300, device="cuda"))
    result = quantize(DEMO / "digits_resnet.onnx", DEMO / "calib", cuda, progress=False)
    assert result.report.optimization["iters"] == 300
    assert _demo_sqnr(result.model) > _demo_sqnr(init.model) + 1.0


def test_mixed_precision_on_cuda_meets_its_budget() -> None:
    config = QuantConfig(mixed=MixedPrecisionOptions(avg_weight_bits=4.0),
                         optimize=OptimizeOptions(iters=20, device="cuda"))
    result = quantize(DEMO / "digits_resnet.onnx", DEMO / "calib", config, progress=False)
    bits = [t.bits for t in result.report.tensors if t.kind == "weight"]
    assert bits and set(bits) <= {2, 4, 8}
