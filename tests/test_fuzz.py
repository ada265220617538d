"""Property-based fuzzing (bounded): random graphs x random settings -> a valid model or a catalogued error.

tools/fuzz.py runs the same property on many more examples.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
from hypothesis import HealthCheck, given, settings

from models import random_graphs, zoo
from models.fuzz_check import quantize_and_check
from models.fuzz_check import settings as quant_settings

EXAMPLES = 25


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(spec=random_graphs.graph_specs(), config=quant_settings())
def test_random_graph_quantizes_or_fails_cleanly(spec, config) -> None:
    with tempfile.TemporaryDirectory(prefix="eptq-fuzz-") as folder:
        quantize_and_check(spec, config, Path(folder))


@settings(max_examples=10, deadline=None, derandomize=True)
@given(spec=random_graphs.graph_specs())
def test_random_graphs_are_valid_float_models(spec) -> None:
    """The generator itself: checked models onnxruntime runs, with the declared output shape."""
    model = random_graphs.build(spec)
    feeds = zoo.sample_inputs(model, 2, seed=0)
    (y,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    declared = [d.dim_value or 2 for d in model.graph.output[0].type.tensor_type.shape.dim]
    assert list(y.shape) == declared and np.isfinite(y).all()
