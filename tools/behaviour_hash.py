"""Hashes of what the pipeline writes for the bundled models at a fixed seed and step count.

A refactoring that is meant to preserve behaviour must leave every line of this script's output
unchanged (issue 18's hash-equality check):

    python tools/behaviour_hash.py            # prints one line per run: name, model hash, output hash
"""
from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from eptq_onnx import QuantConfig, quantize  # noqa: E402
from eptq_onnx.config import MixedPrecisionOptions, OptimizeOptions  # noqa: E402

MODELS = {
    "demo": ROOT / "models" / "demo" / "digits_resnet.onnx",
    "digits_vit": ROOT / "models" / "digits_vit" / "digits_vit.onnx",
}


def runs() -> dict:
    """The configurations hashed: plain init, a short EPTQ run, mixed precision; budgets so large
    that no time limit (the LFH's share of it) changes what is computed."""
    return {
        "w8a8_iters0": QuantConfig(weight_bits=8, optimize=OptimizeOptions(iters=0), measure_latency=False),
        "w4a8_eptq20": QuantConfig(weight_bits=4, optimize=OptimizeOptions(iters=20, time_budget_min=10_000), measure_latency=False),
        "mixed_iters0": QuantConfig(
            weight_bits=4, optimize=OptimizeOptions(iters=0, time_budget_min=10_000), measure_latency=False,
            mixed=MixedPrecisionOptions(avg_weight_bits=5.0),
        ),
    }


def model_hash(model: onnx.ModelProto) -> str:
    """SHA-256 of the graph (nodes, initializers, I/O) without the producer metadata."""
    graph = onnx.ModelProto()
    graph.CopyFrom(model)
    del graph.metadata_props[:]
    graph.producer_version = ""
    return hashlib.sha256(graph.graph.SerializeToString()).hexdigest()[:16]


def output_hash(model: onnx.ModelProto, test: Path) -> str:
    """SHA-256 of the written model's outputs on the bundled test inputs (onnxruntime, 1 thread)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    data = np.load(test)
    name = session.get_inputs()[0].name
    feed = data[data.files[0]][:32].astype(np.float32)
    outputs = session.run(None, {name: feed})
    return hashlib.sha256(b"".join(np.ascontiguousarray(o).tobytes() for o in outputs)).hexdigest()[:16]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default=",".join(runs()), help="comma-separated run names")
    args = parser.parse_args()
    chosen = args.runs.split(",")
    for model_name, path in MODELS.items():
        for run_name, config in runs().items():
            if run_name not in chosen:
                continue
            with tempfile.TemporaryDirectory() as tmp:
                result = quantize(path, path.parent / "calib", config, output=Path(tmp) / "q.onnx", progress=False)
            print(f"{model_name:11s} {run_name:13s} model {model_hash(result.model)} "
                  f"outputs {output_hash(result.model, path.parent / 'test.npz')}", flush=True)


if __name__ == "__main__":
    main()
