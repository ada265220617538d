"""The mixed-precision stage of the pipeline (paper Algorithm 1, step 4): budget -> sensitivities
-> ILP (or the LFH-rank baseline) -> every weight at its chosen width, from the MSE-initialized
candidates, ready for the EPTQ optimization.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Tuple

from eptq_onnx.mixed.bit_allocation import TIME_LIMIT_BEST, TIME_LIMIT_NONE, Allocation, check_budget, rank_allocation, resolve_budget, solve_ilp
from eptq_onnx.config import MixedPrecisionOptions
from eptq_onnx.plan.qpoints import QuantPlan
from eptq_onnx.report import Report
from eptq_onnx.mixed.sensitivity import SearchInputs, SensitivityResult, measure_sensitivity, neighbour_pairs, weight_sizes
from eptq_onnx.init.weights import WeightQuant


def choose_bits(
    inputs: SearchInputs, report: Report, progress: bool = True, log: Callable[[str], None] = print
) -> Tuple[Dict[str, WeightQuant], SensitivityResult]:
    """Every weight at the width the search chose (its MSE-initialized quantizer at that width), and
    the measured sensitivities (whose LFH the EPTQ stage reuses).

    Fills ``report.mixed_precision``. Raises UsageError for an infeasible budget (before any
    sensitivity is measured) and ModelError when the model has no torch twin.
    """
    options, plan, candidates = inputs.config.mixed, inputs.plan, inputs.candidates
    assert options is not None
    sizes = weight_sizes(inputs.model, plan)
    budget = resolve_budget(sizes, options.weight_memory, options.avg_weight_bits)
    check_budget(sizes, dict.fromkeys(sizes, min(options.bit_options)), max(options.bit_options), budget)
    pairs = neighbour_pairs(inputs.model, plan) if options.pairwise and options.search == "ilp" else None
    sens = measure_sensitivity(inputs, metric=options.metric, samples=options.samples, pairs=pairs,
                               evaluate=options.search == "ilp", progress=progress)
    widest = max(options.bit_options)
    for name in sens.untracked:
        report.warn(f"FALLBACK: weight {name} has no quantizer in the torch twin; kept at {widest} bits")
    if options.search == "ilp":
        table = {n: sens.table.get(n, {widest: 0.0}) for n in sizes}
        allocation = solve_ilp(table, sizes, budget, sens.pairs, options.time_limit_s)
    else:
        importance = {n: sens.lfh.get(sens.layer_tensor.get(n, ""), 0.0) for n in sizes}
        allocation = rank_allocation(importance, sizes, options.bit_options, budget)
    measured = sens.joint(allocation.bits) if sens.joint is not None and options.search == "ilp" else None
    sens.joint = None  # releases the twin and the cached teacher tensors before the next stage
    if allocation.status in (TIME_LIMIT_BEST, TIME_LIMIT_NONE):
        report.warn(f"FALLBACK: bit-width ILP stopped at its {options.time_limit_s:g} s limit (--ilp-time-limit): {allocation.status}")
    report.mixed_precision = _summary(options, plan, sizes, sens, allocation)
    report.mixed_precision["sensitivity"].update(
        predicted_distance=sens.predicted(allocation.bits) if sens.table else None, measured_distance=measured)
    log(f"mixed precision: {allocation.memory_bytes:.0f} of {budget:.0f} bytes of weight memory "
        f"({report.mixed_precision['average_bits']:.2f} bits per weight), search {allocation.status}")
    return {n: candidates[allocation.bits[n]][n] for n in sizes}, sens


def _summary(options: MixedPrecisionOptions, plan: QuantPlan, sizes: Mapping[str, int], sens: SensitivityResult,
             allocation: Allocation) -> Dict[str, Any]:
    ops = {p.weight: p.op_type for p in plan.weights}
    elements = sum(sizes.values())
    layers = [
        {
            "weight": n,
            "op": ops[n],
            "elements": sizes[n],
            "bits": allocation.bits[n],
            "lfh": sens.lfh.get(sens.layer_tensor.get(n, "")),
            "lfh_tensor": sens.layer_tensor.get(n),
            "sensitivity": {str(b): v for b, v in sens.table.get(n, {}).items()},
        }
        for n in sizes
    ]
    return {
        "search": options.search,
        "bit_options": list(options.bit_options),
        "status": allocation.status,
        "budget_bytes": allocation.budget_bytes,
        "memory_bytes": allocation.memory_bytes,
        "float_weight_bytes": elements * 4,
        "average_bits": 8.0 * allocation.memory_bytes / max(1, elements),
        "objective": allocation.objective,
        "solver_seconds": round(allocation.solver_seconds, 3),
        "time_limit_s": options.time_limit_s,
        "greedy_upgrades": [{"weight": n, "from": a, "to": b} for n, a, b in allocation.upgrades],
        "sensitivity": {
            "metric": sens.metric,
            "samples": sens.samples,
            "evaluations": sens.evaluations,
            "seconds": round(sens.seconds, 3),
            "eval_seconds": round(sens.eval_seconds, 3),
            "base_distance": sens.base,
            "pairs": [{"layers": list(k), "interaction": {f"{a},{b}": v for (a, b), v in t.items()}} for k, t in sens.pairs.items()],
        },
        "layers": layers,
    }
