"""The fuzzing property, shared by tests/test_fuzz.py (bounded) and tools/fuzz.py (long runs).

A random graph quantized at random settings ends in one of two ways: a written model that
onnxruntime runs and whose torch twin (hard rounding) computes the same outputs, or an
``EptqError`` with a one-line message and no output file. Anything else (a traceback, a
non-finite output, a twin that disagrees) fails, and so does a ValidationError: the graphs are
valid by construction, so a written model that fails validation is a bug of ours.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from eptq_onnx import QuantConfig, quantize
from eptq_onnx.config import CalibOptions, OptimizeOptions
from eptq_onnx.errors import EptqError, ValidationError
from eptq_onnx.twin.build import build_twin, to_tensors
from eptq_onnx.export.validate import INT2_FUSION_OFF
from models import random_graphs, zoo
from models.calib_files import write_calib

# Network-wide, torch and onnxruntime differ only by rounding-tie flips (see tests/test_twin.py).
TWIN_RELATIVE_TOLERANCE = 2e-2


def settings():
    """A hypothesis strategy of QuantConfig: bits 2..8, either act width, storage, a few EPTQ steps or none."""
    from hypothesis import strategies as st

    @st.composite
    def configs(draw) -> QuantConfig:
        iters = draw(st.sampled_from([0, 0, 2]))
        act_bits = draw(st.sampled_from([8, 16]))
        return QuantConfig(
            weight_bits=draw(st.integers(2, 8)),
            act_bits=act_bits,
            target=draw(st.sampled_from(["generic"] if act_bits == 16 else ["ort-cpu", "generic"])),
            act_symmetric=draw(st.booleans()),
            calib_method=draw(st.sampled_from(["mse", "minmax", "percentile"])),
            weight_init=draw(st.sampled_from(["output-mse", "mse", "minmax"])),
            weight_storage=draw(st.sampled_from(["native", "int8"])),
            quantize_outputs=draw(st.booleans()),
            quantize_bias=draw(st.booleans()),
            calib=CalibOptions(batch_size=4),
            validation_samples=4,
            optimize=OptimizeOptions(iters=iters, hessian_samples=2, hessian_draws=2, batch_size=4,
                                     seed=draw(st.integers(0, 3))),
        )

    return configs()


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-6))


def quantize_and_check(spec: random_graphs.GraphSpec, config: QuantConfig, folder: Path) -> str:
    """Run the property on one example; returns "ok" or "error <type>: <message>" (catalogued)."""
    model = random_graphs.build(spec)
    calib = write_calib(model, folder / "calib", n=8, seed=spec.seed % 1000)
    out = folder / "q.onnx"
    try:
        result = quantize(model, calib, config, output=out, progress=False)
    except ValidationError:
        raise  # the input is valid by construction: a model that fails validation is our bug
    except EptqError as exc:
        message = str(exc)
        assert message and "\n" not in message, f"not a one-line message: {message!r}"
        assert not out.exists(), "an error left an output file"
        return f"error {type(exc).__name__}: {message}"
    options = ort.SessionOptions()
    for key, value in (INT2_FUSION_OFF if result.report.validation.get("qdq_fusion_disabled") else {}).items():
        options.add_session_config_entry(key, value)
    feeds = zoo.sample_inputs(model, 2, seed=7)
    session = ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"])
    assert all(np.isfinite(o).all() for o in session.run(None, feeds)), "onnxruntime output is not finite"
    # the twin computes the QDQ graph as written; optimized sessions requantize with integer kernels
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    ort_out = ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"]).run(None, feeds)
    state = result.state
    assert state is not None
    twin = build_twin(state.float_model, state.plan, state.weights, state.acts,
                      quantize_outputs=config.quantize_outputs, quantize_bias=config.quantize_bias)
    with torch.no_grad():
        twin_out, _ = twin.student.run(to_tensors(feeds), [])
    for name, mine, theirs in zip(twin.student.outputs, twin_out, ort_out):
        err = _relative(mine.numpy(), theirs)
        assert err < TWIN_RELATIVE_TOLERANCE, f"twin output {name} differs from onnxruntime by {err:.2e} (relative)"
    return "ok"
