"""The run's report: machine-readable JSON and a terminal summary."""
from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import onnx
from rich.console import Console
from rich.table import Table

from eptq_onnx.eptq.hessian import LFHResult
from eptq_onnx.eptq.stage import HESSIAN_SHARE, PROBED, EptqOutcome
from eptq_onnx.fidelity.target import SIGNIFICANCE
from eptq_onnx.graph.model_io import write_bytes_atomic
from eptq_onnx.graph.tensor_store import tensor_array
from eptq_onnx.init.quantizers import ActParams, sqnr_db
from eptq_onnx.init.weights import WeightQuant
from eptq_onnx.plan.qpoints import QuantPlan

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
    folded_bias_adds: List[str] = field(default_factory=list)  # Adds of a per-channel constant, now layer biases
    fused_hardswish: int = 0  # HardSwish spelled x * clip(x + 3, 0, 6) / 6, written as one op (graph/fuse_activations.py)
    # depthwise Convs whose input was rescaled per channel (graph/equalize.py): conv, tensor, kind, min_scale
    equalized: List[Dict[str, Any]] = field(default_factory=list)
    tensors: List[TensorEntry] = field(default_factory=list)
    float_ops: List[Dict[str, str]] = field(default_factory=list)
    # decomposed normalizations quantized as their fused op ({kind, input, output, nodes})
    norm_blocks: List[Dict[str, Any]] = field(default_factory=list)
    singular_float: List[str] = field(default_factory=list)  # activations kept float before a singular op
    # 8-bit points widened to 16 bits (calib/wide_acts.WidePoint: tensor, layer, db_8, db_16, fused)
    wide_activations: List[Dict[str, Any]] = field(default_factory=list)
    wide_output_sqnr_db: Dict[str, Any] = field(default_factory=dict)  # the check that kept them: 8-bit vs 16-bit
    float_weights: List[Dict[str, Any]] = field(default_factory=list)  # 8-bit weights that lose a layer, left float
    float_weights_output_sqnr_db: Dict[str, Any] = field(default_factory=dict)  # the check that kept them float
    excluded: List[Dict[str, str]] = field(default_factory=list)  # nodes kept float by --exclude: node, op_type, pattern
    warnings: List[str] = field(default_factory=list)
    validation: Dict[str, Any] = field(default_factory=dict)
    timings_s: Dict[str, float] = field(default_factory=dict)  # completed stages
    stages: List[Dict[str, Any]] = field(default_factory=list)  # every stage that ran: name, seconds, status
    error: Optional[Dict[str, Any]] = None  # what stopped the run (code, category, stage, message); None on success
    sizes_bytes: Dict[str, int] = field(default_factory=dict)
    calibration_samples: int = 0
    bias_correction: Dict[str, Any] = field(default_factory=dict)  # init/bias_correction.BiasCorrection
    hessian: Dict[str, Any] = field(default_factory=dict)
    optimization: Dict[str, Any] = field(default_factory=dict)
    mixed_precision: Dict[str, Any] = field(default_factory=dict)
    latency: Dict[str, Any] = field(default_factory=dict)
    fidelity: Dict[str, Any] = field(default_factory=dict)  # fidelity/target.FidelityOutcome (--min-sqnr)
    # ort-cpu's 8-bit U8S8 weights: reduce_range (7-bit codes or full int8), weight_bits, why (plan/u8s8_probe.py)
    u8s8_range: Dict[str, Any] = field(default_factory=dict)
    overrides: List[Dict[str, Any]] = field(default_factory=list)  # --overrides: each entry and what it set

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


def _print_target(fidelity: Dict[str, Any], console: Console) -> None:
    """--min-sqnr: the held-out SQNR before and after, and the nodes left float with what each bought."""
    state = "reached" if fidelity["reached"] else "[bold yellow]NOT reached[/bold yellow]"
    console.print(f"fidelity target {fidelity['target_db']:g} dB {state}: held-out output SQNR "
                  f"{fidelity['start_db']:.1f} -> {fidelity['final_db']:.1f} dB ({fidelity['held_out_samples']} "
                  f"samples, {fidelity['tried']} of {fidelity['candidates']} candidate nodes tried)")
    if fidelity.get("written_db") is not None:
        console.print(f"  the written model in onnxruntime: {fidelity['written_db']:.1f} dB on the held-out samples")
    if fidelity.get("within_noise"):
        console.print(f"  {fidelity['within_noise']} candidate(s) stayed quantized: their gain was within the "
                      "held-out samples' noise")
    if fidelity.get("reverted"):
        names = ", ".join(node["node"] for node in fidelity["reverted"])
        console.print(f"  [bold yellow]reverted[/bold yellow]: the walk's {len(fidelity['reverted'])} node(s) ({names}) "
                      "did not raise the written model's SQNR beyond the noise and stay quantized")
    for node in fidelity["floated"]:
        console.print(f"  left float: {node['node']} ({node['op_type']}): +{node['gain_db']:.2f} dB "
                      f"(at least +{node['gain_low_db']:.2f} on {1 - SIGNIFICANCE:.0%} of resamples) -> {node['sqnr_db']:.1f} dB")


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
    if report.equalized:
        parts.append(f"{len(report.equalized)} depthwise Conv input(s) equalized per channel")
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
        f"{len(report.folded_batch_norms)} BatchNorms and {len(report.folded_bias_adds)} bias Adds folded, "
        + (f"{report.fused_hardswish} decomposed HardSwish fused, " if report.fused_hardswish else "")
        + f"opset {report.opset}"
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
                      f"float {lat['float_ms']:.2f} ms (the model {lat.get('float_model', 'prepared')}), "
                      f"quantized {lat['quantized_ms']:.2f} ms ({lat['ratio']:.2f}x)")
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
    if report.fidelity:
        _print_target(report.fidelity, console)
    if report.excluded:
        shown = ", ".join(f"{e['node']} ({e['op_type']})" for e in report.excluded[:SHOWN_TENSORS])
        more = f" and {len(report.excluded) - SHOWN_TENSORS} more" if len(report.excluded) > SHOWN_TENSORS else ""
        console.print(f"kept float by --exclude: {shown}{more}")
    for message in report.warnings:
        console.print(f"[bold yellow]warning:[/bold yellow] {message}")


# --------------------------------------------------------------------------- what the stages record


UNDECIDED_WARN = 0.001  # of all rounding variables: more left undecided at the end is warned about


def record_plan(report: Report, plan: QuantPlan) -> None:
    """The plan's float ops (each warned about), matched normalization blocks, singular tensors and the
    nodes kept float by ``--exclude``."""
    report.float_ops = [{"node": n, "op_type": t, "why": w} for n, t, w in plan.float_ops]
    report.norm_blocks = [{"kind": b.kind, "input": b.input, "output": b.output, "nodes": list(b.nodes)}
                          for b in plan.norm_blocks]
    report.singular_float = list(plan.singular_float)
    report.excluded = [{"node": n, "op_type": t, "pattern": p} for n, t, p in plan.excluded]
    for node, op_type, why in plan.float_ops:
        report.warn(f"{op_type} node {node} stays float ({why})")


def record_eptq(report: Report, outcome: EptqOutcome) -> None:
    """The optimization's figures, and warnings for undecided rounding, slower kernels and the LFH."""
    opt = outcome.optimization
    report.optimization = {
        "iters": opt.iters,
        "seconds": round(opt.seconds, 3),
        "step_seconds": round(opt.step_seconds, 5),
        "batch_size": opt.batch_size,
        "why": opt.why,
        "kernels": opt.kernels,
        "undecided_rounding": opt.undecided,
        "loss_weights": outcome.loss_weights,
        "curve": opt.curve,
        "sqnr_before_db": outcome.sqnr_before,
        "sqnr_after_db": outcome.sqnr_after,
        "kept_init": outcome.kept_init,
        "check_samples": outcome.check_samples,
        "check_held_out": outcome.check_held_out,
    }
    undecided = sum(opt.undecided.values())
    if undecided > UNDECIDED_WARN * max(1, opt.rounding_variables):
        report.warn(f"{undecided} of {opt.rounding_variables} rounding variables were still undecided (0.01 < h < 0.99) "
                    f"when the optimization stopped (most in {max(opt.undecided, key=opt.undecided.get)}); the hard rounding "
                    "written to the file then departs from what was trained: give it more steps (--iters, --time-budget)")
    if opt.kernels_failed:
        report.warn(f"FALLBACK: EPTQ trained with the slower {opt.kernels}")
    if outcome.hessian is not None:
        report.hessian = {"probed": PROBED, **outcome.hessian.to_dict(),
                          "forward_backward_seconds": round(outcome.hessian_step_seconds, 5)}
        warn_lfh(report, outcome.hessian)
    if outcome.kept_init:
        report.warn(f"FALLBACK: EPTQ result discarded, the output is the MSE-initialized model (as --iters 0 writes it): "
                    f"{outcome.kept_init}; "
                    "give the optimization more steps (--iters, --time-budget)")


def warn_lfh(report: Report, hessian: LFHResult) -> None:
    """Say when the LFH's time share cut its draws, and which tensors the channel-correlated LFH had to
    treat elementwise (their layout unknown)."""
    if hessian.time_limited:
        report.warn(f"LFH: its share of the time budget ({HESSIAN_SHARE:.0%} of --time-budget) allowed "
                    f"{hessian.samples} sample(s) and {hessian.total_draws} Hutchinson draws in all (at most "
                    f"{hessian.draws} per sample); the loss weights are noisier estimates: a larger --time-budget gives "
                    "more draws")
    unknown = hessian.unknown_axes
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        report.warn(f"LFH (--hessian-trace channel): the position axes of {len(unknown)} tensor(s) are unknown (no "
                    f"layout rule for the op that makes them); they take the paper's elementwise trace: {shown}")


def tensor_entries(
    model: onnx.ModelProto,
    plan: QuantPlan,
    weights: Dict[str, WeightQuant],
    acts: Dict[int, ActParams],
    storage: Dict[str, str],
    act_sqnr: Dict[str, float],
) -> List[TensorEntry]:
    """One entry per quantized weight (its SQNR against the float weight) and activation group root."""
    initializers = {t.name: t for t in model.graph.initializer}
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    ops = {p.weight: p.op_type for p in plan.weights}
    entries = []
    for name, wq in weights.items():
        w = tensor_array(initializers[name]).astype(np.float32, copy=False)
        entries.append(
            TensorEntry(name, ops[name], "weight", wq.bits, wq.scale.tolist(), 0, sqnr_db(w, wq.dequantized()), storage.get(name, ""))
        )
    for g in plan.groups:
        p = acts[g.id]
        for root in g.roots:
            entries.append(
                TensorEntry(root, producers.get(root, "input"), "activation", p.bits, p.scale, p.zero_point, act_sqnr.get(root), g.reason)
            )
    return entries
