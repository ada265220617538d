"""The analysis result: JSON report and terminal table."""
from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from rich.console import Console
from rich.table import Table

from eptq_onnx.analysis.measure import PointCost, TensorError, worst
from eptq_onnx.graph.model_io import write_bytes_atomic
from eptq_onnx.report import _jsonable

SCHEMA = "eptq-onnx-analysis/1"
SHOWN_POINTS = 10
TABLE_WIDTH = 180  # columns of the table when stderr is no terminal (a log file)


@dataclass
class AnalysisResult:
    """Every quantization point ranked by its cost (worst first), every tensor's float-vs-quantized
    SQNR in topological order, and what the analysis cost. SQNRs are in dB against the float model
    on the sensitivity samples; a point's output SQNR is that of the worst model output."""

    input: str
    config: Dict[str, Any]
    samples: int
    outputs: List[str]
    quantized_sqnr_db: Dict[str, float]  # every point quantized, per output
    points: List[PointCost]  # ranked, worst first
    tensors: List[TensorError]  # topological order
    cost: Dict[str, Any]
    not_measured: List[str] = field(default_factory=list)  # weights without a quantizer in the torch twin
    warnings: List[str] = field(default_factory=list)
    timings_s: Dict[str, float] = field(default_factory=dict)
    excluded: List[Dict[str, str]] = field(default_factory=list)  # nodes --exclude kept float

    @property
    def quantized_worst_db(self) -> float:
        return worst(self.quantized_sqnr_db)

    def to_dict(self) -> Dict[str, Any]:
        data = {"schema": SCHEMA, **asdict(self), "quantized_worst_sqnr_db": self.quantized_worst_db}
        return _jsonable(data)

    def write_json(self, path: str | Path) -> None:
        write_bytes_atomic(path, (json.dumps(self.to_dict(), indent=2) + "\n").encode())


def _short(name: str, width: int) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1):]


def _db(value: float) -> str:
    return f"{value:.1f}" if value == value and abs(value) != float("inf") else str(value)


def print_table(result: AnalysisResult, console: Optional[Console] = None, shown: int = SHOWN_POINTS) -> None:
    """The worst points and one line of what the analysis cost."""
    console = console or Console(stderr=True, width=None if sys.stderr.isatty() else TABLE_WIDTH)
    weights = sum(1 for p in result.points if p.kind == "weight")
    console.print(f"[bold]eptq-onnx-analyze[/bold] {result.input}: {weights} weights, "
                  f"{len(result.points) - weights} activation points, {result.samples} samples; quantized model's "
                  f"output SQNR {_db(result.quantized_worst_db)} dB (worst output)")
    table = Table(title=f"costliest quantization points (all {len(result.points)} in the JSON report)")
    for col in ("rank", "point", "kind", "op", "bits", "alone dB", "float dB", "gain dB", "share", "--exclude"):
        table.add_column(col, overflow="fold")
    for p in result.points[:shown]:
        table.add_row(str(p.rank), _short(p.point, 48), p.kind, p.op_type, str(p.bits), _db(p.alone_sqnr_db),
                      _db(p.float_sqnr_db), f"{p.gain_db:+.1f}", f"{p.noise_share:.2f}",
                      _short(p.exclude, 48) if p.exclude else "(model input)")
    console.print(table)
    worst_tensors = sorted(result.tensors, key=lambda t: t.sqnr_db)[:5]
    if worst_tensors:
        shown_t = ", ".join(f"{t.tensor} ({t.op_type}) {_db(t.sqnr_db)} dB" for t in worst_tensors)
        console.print(f"least accurate tensors along the graph: {shown_t}")
    c = result.cost
    ratio = c.get("evaluation_over_float_forward")
    console.print(f"cost: {c['evaluations']} evaluations of {c['samples']} samples in {c['eval_seconds']:.1f} s "
                  f"({c['seconds_per_evaluation']:.3f} s each" + (f", {ratio:.2f}x one float forward pass" if ratio else "")
                  + f"); tensors {c['tensor_pass_seconds']:.1f} s; whole analysis {c['seconds']:.1f} s")
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/yellow] {warning}")
