"""The run's report: machine-readable JSON and a terminal summary."""
from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from rich.console import Console
from rich.table import Table

from eptq_onnx.graph.model_io import write_bytes_atomic

SHOWN_TENSORS = 8  # worst tensors listed in the terminal (all of them are in the JSON)


@dataclass
class TensorEntry:
    """One quantized tensor."""

    name: str
    op: str
    kind: str  # "weight" | "activation"
    bits: int
    scale: Any  # float (activation) or list of floats (per-channel weight)
    zero_point: Any
    sqnr_db: Optional[float]
    detail: str = ""  # storage type (weights) or why this is a point (activations)


@dataclass
class Report:
    input: str
    output: Optional[str]
    config: Dict[str, Any]
    opset: int = 0
    folded_batch_norms: List[str] = field(default_factory=list)
    tensors: List[TensorEntry] = field(default_factory=list)
    float_ops: List[Dict[str, str]] = field(default_factory=list)
    # decomposed normalizations quantized as their fused op ({kind, input, output, nodes})
    norm_blocks: List[Dict[str, Any]] = field(default_factory=list)
    singular_float: List[str] = field(default_factory=list)  # activations kept float before a singular op
    warnings: List[str] = field(default_factory=list)
    validation: Dict[str, Any] = field(default_factory=dict)
    timings_s: Dict[str, float] = field(default_factory=dict)  # completed stages
    stages: List[Dict[str, Any]] = field(default_factory=list)  # every stage that ran: name, seconds, status
    error: Optional[Dict[str, Any]] = None  # what stopped the run (code, category, stage, message); None on success
    sizes_bytes: Dict[str, int] = field(default_factory=dict)
    calibration_samples: int = 0
    hessian: Dict[str, Any] = field(default_factory=dict)
    optimization: Dict[str, Any] = field(default_factory=dict)
    mixed_precision: Dict[str, Any] = field(default_factory=dict)
    latency: Dict[str, Any] = field(default_factory=dict)

    def warn(self, message: str) -> None:
        """Add a warning (once: stages that share a result may each report it)."""
        if message not in self.warnings:
            self.warnings.append(message)

    def to_dict(self) -> Dict[str, Any]:
        return _jsonable(asdict(self))

    def write_json(self, path: str | Path) -> None:
        write_bytes_atomic(path, (json.dumps(self.to_dict(), indent=2) + "\n").encode())


def _jsonable(value: Any) -> Any:
    """Replace non-finite floats by strings (JSON has no inf/nan) and dataclasses by dicts."""
    if is_dataclass(value) and not isinstance(value, type):
        return _jsonable(asdict(value))
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return "inf" if value > 0 else ("-inf" if value < 0 else "nan")
    return value


def _db(value: Optional[float]) -> str:
    if value is None:
        return "-"
    return "inf" if value == math.inf else f"{value:.1f}"


def _print_lfh(hessian: Dict[str, Any], console: Console, shown: int = 5) -> None:
    """The most and least sensitive tensors by Label-Free Hessian."""
    ranked = sorted(hessian["normalized"].items(), key=lambda kv: kv[1], reverse=True)
    table = Table(title=f"Label-Free Hessian: most and least sensitive of {len(ranked)} tensors")
    for col in ("tensor", "trace", "normalized"):
        table.add_column(col)
    rows = ranked if len(ranked) <= 2 * shown else ranked[:shown] + ranked[-shown:]
    for name, weight in rows:
        table.add_row(name, f"{hessian['traces'][name]:.3g}", f"{weight:.2f}")
    console.print(table)
    console.print(f"LFH: {hessian['samples']} samples, up to {hessian['draws']} draws, {hessian['seconds']:.1f} s")


def _print_mixed(mixed: Dict[str, Any], console: Console) -> None:
    """Bits per layer and the weight memory achieved against the budget."""
    table = Table(title=f"mixed precision: bits per weight ({mixed['search']}, options {mixed['bit_options']})")
    for col in ("weight", "op", "elements", "bits", "LFH"):
        table.add_column(col)
    for layer in mixed["layers"]:
        lfh = layer["lfh"]
        table.add_row(layer["weight"], layer["op"], str(layer["elements"]), str(layer["bits"]), "-" if lfh is None else f"{lfh:.2f}")
    console.print(table)
    sens = mixed["sensitivity"]
    console.print(
        f"weight memory {mixed['memory_bytes']:.0f} B of budget {mixed['budget_bytes']:.0f} B "
        f"({mixed['average_bits']:.2f} bits per weight; float32 {mixed['float_weight_bytes']} B); "
        f"search {mixed['status']} in {mixed['solver_seconds']:.2f} s; sensitivity: {sens['evaluations']} "
        f"evaluations on {sens['samples']} samples ({sens['metric']}), {sens['seconds']:.1f} s"
        + (f"; greedy top-up: {len(mixed['greedy_upgrades'])} upgrades" if mixed["greedy_upgrades"] else "")
        + (f"; distance of the pick: predicted {sens['predicted_distance']:.4g}, measured {sens['measured_distance']:.4g}"
           if sens.get("measured_distance") is not None else "")
    )


def _print_fidelity(v: Dict[str, Any], console: Console) -> None:
    """What onnxruntime computes with its default optimizations vs the float model, then the diagnostics."""
    table = Table(title=f"fidelity: onnxruntime (default optimizations) vs float, {v.get('samples', 0)} validation samples")
    for col in ("output", "SQNR dB", "top-1 agree", "max abs err", "unoptimized SQNR dB", "ORT opt on/off agree dB"):
        table.add_column(col)
    top1 = v.get("top1_agreement", {})
    for name, sqnr in v.get("output_sqnr_db", {}).items():
        table.add_row(
            name, _db(sqnr), f"{top1[name]:.3f}" if name in top1 else "-", f"{v['output_max_abs_error'][name]:.4g}",
            _db(v.get("unoptimized_output_sqnr_db", {}).get(name)), _db(v["optimized_agreement_db"][name]),
        )
    console.print(table)


def statistics_line(report: Report) -> str:
    """e.g. "norm blocks kept float: 4 LayerNorm (decomposed), 1 RMSNorm (decomposed); 2 activations
    kept float before a singular op (Reciprocal, Sqrt, Log, a Div denominator)"; "" when there are none."""
    parts = []
    if report.norm_blocks:
        kinds = Counter(b["kind"] for b in report.norm_blocks)
        parts.append("norm blocks kept float: " + ", ".join(f"{n} {k} (decomposed)" for k, n in kinds.items()))
    if report.singular_float:
        parts.append(f"{len(report.singular_float)} activation(s) kept float before a singular op "
                     "(Reciprocal, Sqrt, Log, a Div denominator, Pow < 0)")
    return "; ".join(parts)


def print_summary(report: Report, console: Optional[Console] = None) -> None:
    """A compact human summary: outputs, validation, worst tensors, float ops, warnings."""
    console = console or Console(stderr=True)
    v = report.validation
    weights = [t for t in report.tensors if t.kind == "weight"]
    acts = [t for t in report.tensors if t.kind == "activation"]
    console.print(
        f"[bold]eptq-onnx[/bold] {report.input} -> {report.output or '(not written)'}: "
        f"{len(weights)} weights, {len(acts)} activation points, "
        f"{len(report.folded_batch_norms)} BatchNorms folded, opset {report.opset}"
    )
    _print_fidelity(v, console)
    worst = sorted((t for t in report.tensors if t.sqnr_db is not None), key=lambda t: t.sqnr_db)[:SHOWN_TENSORS]
    table = Table(title=f"least accurate tensors (all {len(report.tensors)} in the JSON report)")
    for col in ("tensor", "op", "kind", "bits", "SQNR dB"):
        table.add_column(col)
    for t in worst:
        table.add_row(t.name, t.op, t.kind, str(t.bits), _db(t.sqnr_db))
    console.print(table)
    if "linear_ops" in v:
        console.print(
            f"onnxruntime fused {v['fused_linear_ops']} of {v['linear_ops']} Conv/MatMul/Gemm into integer ops"
            + (" (QDQ fusion disabled for INT2)" if v.get("qdq_fusion_disabled") else "")
        )
    if report.latency:
        lat = report.latency
        console.print(f"onnxruntime CPU latency ({lat['threads']} thread(s), one sample, median of {lat['runs']}): "
                      f"float {lat['float_ms']:.2f} ms, quantized {lat['quantized_ms']:.2f} ms ({lat['ratio']:.2f}x)")
    if report.hessian:
        _print_lfh(report.hessian, console)
    if report.mixed_precision:
        _print_mixed(report.mixed_precision, console)
    if report.optimization:
        o = report.optimization
        console.print(f"EPTQ: {o['iters']} steps in {o['seconds']:.0f} s ({o['why']}; {o.get('kernels', '')})")
    sizes = report.sizes_bytes
    if sizes.get("output"):
        console.print(f"size: {sizes['input'] / 1e6:.2f} MB -> {sizes['output'] / 1e6:.2f} MB")
    line = statistics_line(report)
    if line:
        console.print(line)
    for op in report.float_ops:
        console.print(f"[yellow]stays float:[/yellow] {op['node']} ({op['op_type']}): {op['why']}")
    for message in report.warnings:
        console.print(f"[bold yellow]warning:[/bold yellow] {message}")
