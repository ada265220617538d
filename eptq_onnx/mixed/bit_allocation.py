"""Bit-width allocation under a weight-memory budget (paper Appendix D, SPEC step 5).

An ILP (PuLP, its bundled CBC): one binary x[l, b] per weight quantizer l and candidate width b,
exactly one b per l, minimize sum s(l, b) x[l, b] (plus, with pair terms, sum I(l, b, l', b')
y[l, b, l', b'] with y = x[l, b] AND x[l', b'] linearized by y >= x + x' - 1, y <= x, y <= x'),
subject to sum size(W_l) * b * x[l, b] <= budget (in bits). Then a greedy pass spends leftover
budget on the upgrades with the largest gain. Also the baseline that ranks layers by their
Label-Free Hessian alone.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import pulp

from eptq_onnx.errors import UsageError

Pair = Tuple[str, str]
# (l, l') -> {(b, b'): interaction}; absent combinations interact by 0
PairTerms = Mapping[Pair, Mapping[Tuple[int, int], float]]


TIME_LIMIT_BEST = "time limit: best solution found"
TIME_LIMIT_NONE = "time limit: no solution found, greedy from every weight at the smallest width"


@dataclass
class Allocation:
    """The chosen width of every weight and what the search reports about it."""

    bits: Dict[str, int]
    memory_bytes: float
    budget_bytes: float
    objective: float
    status: str  # "optimal", TIME_LIMIT_BEST, TIME_LIMIT_NONE or "lfh-rank"
    solver_seconds: float = 0.0
    upgrades: List[Tuple[str, int, int]] = field(default_factory=list)  # greedy pass: (weight, from, to)


def memory_bytes(bits: Mapping[str, int], sizes: Mapping[str, int]) -> float:
    """Weight memory of an allocation: sum of elements x bits / 8."""
    return sum(sizes[name] * b for name, b in bits.items()) / 8.0


def objective(bits: Mapping[str, int], table: Mapping[str, Mapping[int, float]], pairs: Optional[PairTerms] = None) -> float:
    """Summed sensitivity of an allocation, plus the pair interaction terms that apply."""
    total = sum(table[name][b] for name, b in bits.items())
    for (a, c), terms in (pairs or {}).items():
        total += terms.get((bits[a], bits[c]), 0.0)
    return total


def check_budget(sizes: Mapping[str, int], smallest: Mapping[str, int], largest: int, budget_bytes: float) -> None:
    """Refuse a budget below the allocation with every weight at its smallest width (one line, exit 2)."""
    low = memory_bytes(smallest, sizes)
    if budget_bytes < low:
        high = memory_bytes(dict.fromkeys(sizes, largest), sizes)
        raise UsageError(
            f"weight memory budget {budget_bytes:.0f} bytes is infeasible: the smallest achievable is "
            f"{low:.0f} bytes ({8 * low / max(1, sum(sizes.values())):.2f} bits per weight; every weight at "
            f"{largest} bits: {high:.0f} bytes); raise --weight-memory / --avg-weight-bits"
        )


def _variable(problem: pulp.LpProblem, name: str, **kwargs) -> pulp.LpVariable:
    """A variable of ``problem`` (PuLP >= 3.3 attaches it to the problem; older PuLP has only LpVariable)."""
    add = getattr(problem, "add_variable", None)
    return add(name, **kwargs) if add is not None else pulp.LpVariable(name, **kwargs)


def solve_ilp(
    table: Mapping[str, Mapping[int, float]],
    sizes: Mapping[str, int],
    budget_bytes: float,
    pairs: Optional[PairTerms] = None,
    time_limit_s: float = 60.0,
) -> Allocation:
    """Minimize the summed sensitivity under the budget (CBC); then the greedy top-up.

    ``table[l][b]``: sensitivity of weight l at width b; ``sizes[l]``: its element count.
    Raises UsageError when the budget is below the all-smallest allocation.
    """
    names = list(table)
    check_budget(sizes, {n: min(table[n]) for n in names}, max(max(row) for row in table.values()), budget_bytes)
    problem = pulp.LpProblem("bit_allocation", pulp.LpMinimize)
    x = {(n, b): _variable(problem, f"x_{i}_{b}", cat="Binary") for i, n in enumerate(names) for b in table[n]}
    # costs scaled to at most 1: CBC's absolute tolerances (~1e-7) would otherwise take distances of 1e-5
    # apart for equal and stop at a worse allocation than uniform
    scale = 1.0 / max((abs(v) for row in table.values() for v in row.values() if v), default=1.0)
    cost = [scale * table[n][b] * x[n, b] for (n, b) in x]
    for k, ((a, c), terms) in enumerate((pairs or {}).items()):
        for (ba, bc), value in terms.items():
            if value == 0.0:
                continue
            y = _variable(problem, f"y_{k}_{ba}_{bc}", lowBound=0, upBound=1)  # integral whenever x is
            problem += y >= x[a, ba] + x[c, bc] - 1
            problem += y <= x[a, ba]
            problem += y <= x[c, bc]
            cost.append(scale * value * y)
    problem += pulp.lpSum(cost)
    for n in names:
        problem += pulp.lpSum(x[n, b] for b in table[n]) == 1
    problem += pulp.lpSum(sizes[n] * b * x[n, b] for (n, b) in x) <= math.floor(budget_bytes * 8.0 + 1e-6)
    start = time.perf_counter()
    with warnings.catch_warnings():  # PuLP 3.3 announces PULP_CBC_CMD's removal in 4.0; it is the bundled CBC
        warnings.simplefilter("ignore", DeprecationWarning)
        problem.solve(pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit_s))
    seconds = time.perf_counter() - start
    if problem.sol_status in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
        status = "optimal" if problem.sol_status == pulp.LpSolutionOptimal else TIME_LIMIT_BEST
        bits = {n: max(table[n], key=lambda b: pulp.value(x[n, b]) or 0.0) for n in names}
    elif problem.status == pulp.LpStatusNotSolved:  # the time limit came before any solution
        status = TIME_LIMIT_NONE
        bits = {n: min(table[n]) for n in names}
    else:
        raise UsageError(f"the bit-width ILP has no solution (CBC status {pulp.LpStatus[problem.status]}): raise the budget")
    if memory_bytes(bits, sizes) > budget_bytes:  # solver tolerance: never hand back an over-budget answer
        raise RuntimeError(f"CBC returned {memory_bytes(bits, sizes):.0f} bytes over the {budget_bytes:.0f}-byte budget")
    upgrades = greedy_top_up(bits, table, sizes, budget_bytes, pairs)
    return Allocation(bits, memory_bytes(bits, sizes), budget_bytes, objective(bits, table, pairs), status, seconds, upgrades)


def greedy_top_up(
    bits: Dict[str, int],
    table: Mapping[str, Mapping[int, float]],
    sizes: Mapping[str, int],
    budget_bytes: float,
    pairs: Optional[PairTerms] = None,
) -> List[Tuple[str, int, int]]:
    """Spend leftover budget: repeatedly apply the affordable upgrade with the largest gain.

    Gain = decrease of the objective (pair terms included); only upgrades with a positive gain.
    Changes ``bits`` in place and returns the upgrades made as (weight, from, to).
    """
    touching: Dict[str, List[Tuple[Pair, Mapping[Tuple[int, int], float]]]] = {n: [] for n in bits}
    for pair, terms in (pairs or {}).items():
        touching[pair[0]].append((pair, terms))
        touching[pair[1]].append((pair, terms))

    def cost(name: str, width: int) -> float:
        """The objective terms that depend on ``name``'s width."""
        total = table[name][width]
        for (a, c), terms in touching[name]:
            total += terms.get((width, bits[c]) if a == name else (bits[a], width), 0.0)
        return total

    made: List[Tuple[str, int, int]] = []
    while True:
        left = budget_bytes - memory_bytes(bits, sizes)
        best: Optional[Tuple[float, str, int]] = None
        for name, b in bits.items():
            for wider in (w for w in table[name] if w > b and sizes[name] * (w - b) / 8.0 <= left):
                gain = cost(name, b) - cost(name, wider)
                if gain > 1e-12 and (best is None or gain > best[0]):
                    best = (gain, name, wider)
        if best is None:
            return made
        _, name, wider = best
        made.append((name, bits[name], wider))
        bits[name] = wider


def rank_allocation(
    importance: Mapping[str, float], sizes: Mapping[str, int], options: Sequence[int], budget_bytes: float
) -> Allocation:
    """The LFH-rank baseline: every weight starts at the smallest width; in decreasing importance,
    each gets the widest candidate the remaining budget affords."""
    low = min(options)
    check_budget(sizes, dict.fromkeys(sizes, low), max(options), budget_bytes)
    bits = dict.fromkeys(importance, low)
    for name in sorted(importance, key=lambda n: -importance[n]):
        left = budget_bytes - memory_bytes(bits, sizes)
        bits[name] = max(b for b in options if b == low or sizes[name] * (b - low) / 8.0 <= left)
    return Allocation(bits, memory_bytes(bits, sizes), budget_bytes, float("nan"), "lfh-rank")


def resolve_budget(sizes: Mapping[str, int], weight_memory: Optional[str], avg_bits: Optional[float]) -> float:
    """The budget in bytes from ``--weight-memory BYTES|NN%`` (NN% of the float32 weight bytes) or
    ``--avg-weight-bits B`` (B bits per weight element); exactly one must be given."""
    if (weight_memory is None) == (avg_bits is None):
        raise UsageError("mixed precision needs one budget: --weight-memory BYTES|NN% or --avg-weight-bits B")
    elements = sum(sizes.values())
    if avg_bits is not None:
        if avg_bits <= 0:
            raise UsageError(f"--avg-weight-bits {avg_bits:g} must be positive")
        return elements * avg_bits / 8.0
    assert weight_memory is not None
    text = weight_memory.strip()
    try:
        value = float(text[:-1]) * elements * 4 / 100.0 if text.endswith("%") else float(int(text))
    except ValueError:
        raise UsageError(f"--weight-memory {weight_memory!r}: give bytes (e.g. 120000) or a percentage of the "
                         f"float32 weight bytes (e.g. 12.5%)") from None
    if value <= 0:
        raise UsageError(f"--weight-memory {weight_memory!r} must be positive")
    return value
