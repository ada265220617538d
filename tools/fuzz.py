"""Long fuzzing run: random graphs x random settings through eptq_onnx.quantize (see models/fuzz_check.py).

    python tools/fuzz.py --examples 300 [--seed 1]

Every example must end in a model onnxruntime runs and the torch twin matches, or in a
catalogued EptqError (one line, nothing written). On a failure hypothesis shrinks it and prints
the smallest failing spec and settings; the exit code is then 1. Prints the outcome counts.
"""
from __future__ import annotations

import argparse
import collections
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hypothesis import HealthCheck, given, seed, settings  # noqa: E402

from models import random_graphs  # noqa: E402
from models.fuzz_check import quantize_and_check  # noqa: E402
from models.fuzz_check import settings as quant_settings  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    outcomes: collections.Counter[str] = collections.Counter()

    @seed(args.seed)
    @settings(max_examples=args.examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(spec=random_graphs.graph_specs(), config=quant_settings())
    def run(spec, config) -> None:
        with tempfile.TemporaryDirectory(prefix="eptq-fuzz-") as folder:
            outcome = quantize_and_check(spec, config, Path(folder))
        outcomes[outcome.split(":")[0] if outcome != "ok" else "ok"] += 1
        if outcome != "ok":
            print(f"{outcome}\n  from {spec} with {config}", flush=True)

    failed = False
    try:
        run()
    except Exception as exc:  # noqa: BLE001 - hypothesis has printed the falsifying example
        print(f"FAILED: {type(exc).__name__}: {exc}")
        for note in getattr(exc, "__notes__", []):
            print(note)
        failed = True
    total = sum(outcomes.values())
    print(f"{total} examples (including hypothesis' shrinking runs): " +
          ", ".join(f"{k} {v}" for k, v in outcomes.most_common()))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
