"""What each quantization point contributes to EPTQ's loss at the MSE init, under LFH and uniform weights.

Explains why the paper's Label-Free Hessian weighting can lose to uniform weighting, and what the
channel-correlated trace (``--hessian-trace channel``, the default) changes: the paper's trace is
the sensitivity to *independent* per-element errors, while quantization errors are correlated
across the positions of a channel. Behind an averaging op (GlobalAveragePool, ReduceMean) over N
positions the elementwise trace is N times smaller than at its output, but correlated errors do
not average away, so the paper's LFH underweights the tensors before it; the channel trace sums
the gradient over the positions before squaring and follows the error that survives.

Usage: ``.venv/bin/python tools/loss_terms.py MODEL.onnx CALIB_DIR [--bits 4] [--samples 64]``
prints the markdown tables that tools/bench.py's ``terms`` section puts into docs/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from eptq_onnx import CalibOptions, QuantConfig, quantize  # noqa: E402
from eptq_onnx.calib.data import CalibrationSet  # noqa: E402
from eptq_onnx.calib.specs import input_specs  # noqa: E402
from eptq_onnx.config import OptimizeOptions  # noqa: E402
from eptq_onnx.eptq.stage import compute_lfh, loss_tensors, mean_one  # noqa: E402
from eptq_onnx.twin.build import build_twin, to_tensors  # noqa: E402

AVERAGING_OPS = ("GlobalAveragePool", "ReduceMean")
TRACES = ("element", "channel")  # --hessian-trace: the paper's, ours


@dataclass
class Term:
    """One loss tensor at the MSE init."""

    name: str
    elements: int  # per sample
    sqnr_db: float
    traces: Dict[str, float]  # per --hessian-trace (element, channel)
    weights: Dict[str, float]  # LFH weight per --hessian-trace, mean 1 over the tensors
    mse: float

    def share(self, total: float, trace: Optional[str]) -> float:
        """Percent of the initial loss under LFH with ``trace``, or under uniform weights (None)."""
        return 100.0 * (self.weights[trace] if trace else 1.0) * self.mse / total


@dataclass
class Averaging:
    """An averaging op between two loss tensors: how much error power survives it."""

    op: str
    tensor_in: str
    tensor_out: str
    positions: int
    measured: float  # error power at the output / at the input
    trace_ratio: Dict[str, float]  # LFH trace at the input / at the output, per --hessian-trace


@dataclass
class TermsResult:
    terms: List[Term]
    averaging: List[Averaging]

    def total(self, trace: Optional[str]) -> float:
        """The initial loss under LFH with ``trace``, or under uniform weights (None)."""
        return sum((t.weights[trace] if trace else 1.0) * t.mse for t in self.terms)


def loss_terms(model: Path, calib: Path, bits: int = 4, samples: int = 64) -> TermsResult:
    """Per-tensor loss terms of the MSE-initialized W{bits}A8 model on ``samples`` calibration samples."""
    config = QuantConfig(weight_bits=bits, calib=CalibOptions(num_samples=samples), optimize=OptimizeOptions(iters=0))
    state = quantize(model, calib, config, progress=False).state
    assert state is not None
    names = loss_tensors(state.float_model, state.plan)
    twin = build_twin(state.float_model, state.plan, state.weights, state.acts, taps=names)
    calib_set = CalibrationSet(calib, input_specs(state.float_model), CalibOptions(num_samples=samples))
    lfh = {trace: compute_lfh(state.float_model, twin, calib_set, names, replace(config, optimize=OptimizeOptions(
        iters=0, hessian_trace=trace)), progress=False)[0] for trace in TRACES}
    weights = {trace: mean_one(result.normalized) for trace, result in lfh.items()}
    feeds = to_tensors(next(calib_set.batches(batch_size=samples)))
    with torch.no_grad():
        _, teacher = twin.teacher.run(feeds, names)
        _, student = twin.student.run(feeds, names)
    mse = {n: float((teacher[n] - student[n]).double().pow(2).mean()) for n in names}
    terms = [
        Term(n, teacher[n][0].numel(), 10 * math.log10(float(teacher[n].double().pow(2).mean()) / max(mse[n], 1e-30)),
             {t: lfh[t].traces[n] for t in TRACES}, {t: weights[t][n] for t in TRACES}, mse[n])
        for n in names
    ]
    averaging = []
    for node in state.float_model.graph.node:
        if node.op_type in AVERAGING_OPS and node.input[0] in mse and node.output[0] in mse:
            src, dst = node.input[0], node.output[0]
            positions = teacher[src][0].numel() // max(1, teacher[dst][0].numel())
            averaging.append(Averaging(node.op_type, src, dst, positions, mse[dst] / max(mse[src], 1e-30),
                                       {t: lfh[t].traces[src] / max(lfh[t].traces[dst], 1e-30) for t in TRACES}))
    return TermsResult(terms, averaging)


def _short(name: str, width: int = 48) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1):]


def terms_markdown(result: TermsResult) -> List[str]:
    """The per-tensor table and the averaging check, as markdown lines."""
    totals = {trace: result.total(trace) for trace in (*TRACES, None)}
    lines = [
        "| tensor | elements | SQNR at init (dB) | LFH trace: element / channel | LFH weight: element / channel | "
        "share of the loss (%): LFH element / LFH channel / uniform |",
        "|---|---|---|---|---|---|",
    ]
    for t in result.terms:
        traces = " / ".join(f"{t.traces[k]:.3g}" for k in TRACES)
        weights = " / ".join(f"{t.weights[k]:.2f}" for k in TRACES)
        shares = " / ".join(f"{t.share(totals[k], k):.1f}" for k in (*TRACES, None))
        lines.append(f"| `{_short(t.name)}` | {t.elements} | {t.sqnr_db:.1f} | {traces} | {weights} | {shares} |")
    if result.averaging:
        lines += ["", "| averaging op | positions N | error power out / in (measured) | LFH trace in / out: element / "
                      "channel | independent errors would give |", "|---|---|---|---|---|"]
        for a in result.averaging:
            ratios = " / ".join(f"{a.trace_ratio[k]:.4f}" for k in TRACES)
            lines.append(f"| {a.op} `{_short(a.tensor_out, 32)}` | {a.positions} | {a.measured:.4f} | {ratios} | "
                         f"{1 / a.positions:.4f} |")
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("calib", type=Path)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--samples", type=int, default=64)
    args = parser.parse_args(argv)
    print("\n".join(terms_markdown(loss_terms(args.model, args.calib, args.bits, args.samples))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
