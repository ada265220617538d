"""Sensitivity of every weight quantizer to every candidate bit width (paper Appendix D).

s(l, b) is the knowledge-distillation distance between the float teacher and the fake-quantized
student when only weight l is at width b and every other weight at the widest candidate
(activations at their calibrated width): by default the LFH-weighted activation distance of
Eq. 6, sum_i w_i * mean((z_i - z~_i)^2) over the quantization points and the model outputs
(``metric='lfh'``), or the plain output distance (``metric='output'``). Step sizes of each
candidate are the MSE-initialized ones (``weights.init_weights`` at b).

Cost: the twin is built once; the teacher's tapped tensors for the calibration subset are
computed once and cached; each (l, b) swaps l's fixed round-to-nearest quantizer in the
student and runs one no-grad forward pass over the subset (batched). With ``pairs`` the joint
distance of neighbouring weighted layers is measured too, giving the interaction terms
I(l, b, l', b') = joint - s(l, b) - s(l', b') + base (base: every weight at the widest width).

The result also measures a whole allocation in place (``joint``: one more evaluation) against the
additive model the ILP assumes (``predicted``), keeps the LFH for the EPTQ stage (``hessian``), and
serves any subset of its widths with the same widest one (``restricted``).
"""
from __future__ import annotations

import time
from collections import defaultdict, deque
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, FrozenSet, Iterable, List, Mapping, Optional, Sequence, Set, Tuple

import numpy as np
import onnx
import torch
from tqdm import tqdm

from eptq_onnx.calib.data import CalibrationSet
from eptq_onnx.config import QuantConfig
from eptq_onnx.errors import ModelError
from eptq_onnx.eptq.stage import compute_lfh, loss_tensors, mean_one
from eptq_onnx.eptq.hessian import LFHResult
from eptq_onnx.plan.exclusions import removed_points
from eptq_onnx.plan.qpoints import QuantPlan
from eptq_onnx.graph.index import GraphIndex
from eptq_onnx.init.quantizers import ActParams
from eptq_onnx.twin.weighted import WeightedOp
from eptq_onnx.twin.build import Twin, build_twin, to_tensors
from eptq_onnx.twin.fake_quant import BiasFakeQuant, WeightFakeQuant
from eptq_onnx.init.weights import WeightQuant

Pair = Tuple[str, str]


@dataclass
class SensitivityResult:
    """Sensitivities, pair interaction terms, and what measuring them cost."""

    table: Dict[str, Dict[int, float]]  # weight -> {bits: distance}
    base: float  # distance with every weight at the widest candidate
    metric: str
    samples: int
    evaluations: int
    seconds: float  # the whole stage: twin, LFH, teacher cache, evaluations
    eval_seconds: float  # the forward passes of the evaluations alone
    pairs: Dict[Pair, Dict[Tuple[int, int], float]] = field(default_factory=dict)  # interaction terms
    lfh: Dict[str, float] = field(default_factory=dict)  # normalized LFH per probed tensor (when computed)
    layer_tensor: Dict[str, str] = field(default_factory=dict)  # weight -> the probed tensor after its op
    untracked: List[str] = field(default_factory=list)  # weights without a quantizer in the twin (not measured)
    # the LFH of the float model at eptq.loss_tensors and the forward/backward yardstick, for run_eptq to reuse
    hessian: Optional[Tuple[LFHResult, float]] = None
    # the measured distance of a whole allocation {weight: bits} (one more evaluation); None when not measured
    joint: Optional[Callable[[Mapping[str, int]], float]] = field(default=None, repr=False, compare=False)

    def predicted(self, bits: Mapping[str, int]) -> float:
        """The distance of an allocation under the additive model the ILP assumes:
        base + sum_l (s(l, b_l) - base) (+ the pair terms that apply)."""
        total = self.base + sum(self.table[n][b] - self.base for n, b in bits.items() if n in self.table)
        return total + sum(t.get((bits[a], bits[c]), 0.0) for (a, c), t in self.pairs.items())

    def restricted(self, widths: Iterable[int]) -> "SensitivityResult":
        """The same measurements for a subset of the measured widths with the same widest one (every
        other weight sat at the widest width while one was measured, so the values do not change)."""
        keep = set(widths)
        measured = {b for row in self.table.values() for b in row}
        if not keep <= measured or max(keep) != max(measured, default=max(keep)):
            raise ValueError(f"widths {sorted(keep)} are not a subset of the measured {sorted(measured)} with the same widest")
        table = {n: {b: v for b, v in row.items() if b in keep} for n, row in self.table.items()}
        pairs = {k: {bb: v for bb, v in t.items() if set(bb) <= keep} for k, t in self.pairs.items()}
        return replace(self, table=table, pairs=pairs)


def weight_sizes(model: onnx.ModelProto, plan: QuantPlan) -> Dict[str, int]:
    """Element count of every quantized weight (a weight shared by several ops counts once)."""
    dims = {t.name: t.dims for t in model.graph.initializer}
    return {p.weight: int(np.prod(dims[p.weight])) for p in plan.weights}


def _reach(index: GraphIndex, start: Iterable[str], stop: Set[str]) -> Tuple[List[str], List[str]]:
    """Tensors reachable from ``start`` in breadth-first order without passing through the
    nodes named in ``stop``, and the ``stop`` nodes met on the way."""
    seen: Set[str] = set()
    tensors: List[str] = []
    stopped: List[str] = []
    queue = deque(start)
    while queue:
        tensor = queue.popleft()
        if tensor in seen:
            continue
        seen.add(tensor)
        tensors.append(tensor)
        for node in index.consumers.get(tensor, []):
            if node.name in stop:
                if node.name not in stopped:
                    stopped.append(node.name)
            else:
                queue.extend(o for o in node.output if o)
    return tensors, stopped


def layer_tensors(model: onnx.ModelProto, plan: QuantPlan, probed: Sequence[str]) -> Dict[str, str]:
    """For every weight, the first probed tensor after its op (e.g. the point after Conv+ReLU)."""
    index = GraphIndex(model.graph)
    nodes = {n.name: n for n in model.graph.node}
    wanted = set(probed)
    result: Dict[str, str] = {}
    for p in plan.weights:
        if p.weight in result:
            continue
        tensors, _ = _reach(index, nodes[p.node].output, set())
        hit = next((t for t in tensors if t in wanted), None)
        if hit is not None:
            result[p.weight] = hit
    return result


def neighbour_pairs(model: onnx.ModelProto, plan: QuantPlan) -> List[Pair]:
    """Consecutive weighted layers along the graph: (l, l') where l' reads l's output through
    ops without weights only."""
    index = GraphIndex(model.graph)
    nodes = {n.name: n for n in model.graph.node}
    weight_of = {p.node: p.weight for p in plan.weights}
    pairs: List[Pair] = []
    for p in plan.weights:
        _, reached = _reach(index, nodes[p.node].output, set(weight_of))
        for node in reached:
            pair = (p.weight, weight_of[node])
            if pair[0] != pair[1] and pair not in pairs:
                pairs.append(pair)
    return pairs


class DistanceProbe:
    """The student's distance to the cached teacher on a calibration subset, with weight quantizers
    swapped in and out."""

    def __init__(self, twin: Twin, names: Sequence[str], loss_weights: Mapping[str, float],
                 feeds: Sequence[Dict[str, torch.Tensor]]) -> None:
        self.twin = twin
        self.names = [n for n in names if loss_weights.get(n, 0.0) > 0]
        self.loss_weights = loss_weights
        self.feeds = list(feeds)
        self.modules: Dict[str, List[WeightedOp]] = defaultdict(list)
        for m in twin.student.modules():
            if isinstance(m, WeightedOp) and m.weight_name in twin.weight_quant:
                self.modules[m.weight_name].append(m)
        with torch.no_grad():
            self.targets = [twin.teacher.run(f, self.names)[1] for f in self.feeds]
        # signal energy of every compared tensor in each feed, and over the subset (the numerator of its SQNR)
        self.feed_signal = {n: np.array([float(t[n].double().pow(2).sum()) for t in self.targets]) for n in self.names}
        self.signal = {n: float(v.sum()) for n, v in self.feed_signal.items()}
        self.evaluations = 0
        self.seconds = 0.0

    def _swap(self, name: str, fq: WeightFakeQuant) -> None:
        """Put ``fq`` on every op reading weight ``name``; an int32 bias follows its weight's step."""
        for m in self.modules[name]:
            m.weight_quant = fq
            if isinstance(m.bias_quant, BiasFakeQuant):
                m.bias_quant = BiasFakeQuant(m.bias_quant.act, fq)

    def errors(self, swaps: Mapping[str, WeightFakeQuant] | None = None,
               disabled: Iterable[torch.nn.Module] = ()) -> Dict[str, float]:
        """Sum of squared errors of every compared tensor over the subset, with the given weights'
        quantizers swapped and the fake quantizers in ``disabled`` switched off (restored after)."""
        return {n: float(e.sum()) for n, e in self.feed_errors(swaps, disabled).items()}

    def feed_errors(self, swaps: Mapping[str, WeightFakeQuant] | None = None,
                    disabled: Iterable[torch.nn.Module] = ()) -> Dict[str, np.ndarray]:
        """As :meth:`errors`, but the sum of squared errors of each feed apart (an array per tensor)."""
        start = time.perf_counter()
        swaps = swaps or {}
        off = [m for m in disabled if getattr(m, "enabled", False)]
        for name, fq in swaps.items():
            self._swap(name, fq)
        for m in off:
            m.enabled = False
        sse = {n: np.zeros(len(self.feeds)) for n in self.names}
        try:
            with torch.no_grad():
                for i, (feeds, target) in enumerate(zip(self.feeds, self.targets)):
                    _, student = self.twin.student.run(feeds, self.names)
                    for n in self.names:
                        sse[n][i] = float((target[n].double() - student[n].double()).pow(2).sum())
        finally:
            for name in swaps:
                self._swap(name, self.twin.weight_quant[name])
            for m in off:
                m.enabled = True
        self.evaluations += 1
        self.seconds += time.perf_counter() - start
        return sse

    def distance(self, swaps: Mapping[str, WeightFakeQuant]) -> float:
        """sum_i w_i * mean((z_i - z~_i)^2) with the given weights' quantizers swapped (restored after)."""
        sse = self.errors(swaps)
        count = {n: sum(t[n].numel() for t in self.targets) for n in self.names}
        return sum(self.loss_weights[n] * sse[n] / max(1, count[n]) for n in self.names)

    def sqnr_db(self, disabled: Iterable[torch.nn.Module] = ()) -> Dict[str, float]:
        """SQNR (dB) of every compared tensor against the teacher with the quantizers in ``disabled``
        off: inf where the student equals the teacher."""
        return {n: sqnr_db(self.signal[n], e) for n, e in self.errors(disabled=disabled).items()}


def sqnr_db(signal: float, noise: float) -> float:
    """10 log10(signal / noise); inf without noise, -inf without signal."""
    if noise == 0:
        return float("inf")
    return float("-inf") if signal == 0 else 10.0 * float(np.log10(signal / noise))


def worst(values: Mapping[str, float]) -> float:
    """The lowest SQNR over the outputs (inf when there is none)."""
    return min(values.values(), default=float("inf"))


def twin_points(twin: Twin, plan: QuantPlan) -> Dict[str, List[torch.nn.Module]]:
    """Every quantization point of the student and the fake quantizers that make it: a weight (keyed
    by its name) its quantizer and the int32 biases on its step (a float weight has a float bias, as
    the writer stores it); an activation group (keyed by its first root) its quantizer. Weights first,
    in plan order, then the groups."""
    points: Dict[str, List[torch.nn.Module]] = {p.weight: [] for p in plan.weights if p.weight in twin.weight_quant}
    for m in twin.student.modules():
        if isinstance(m, WeightedOp) and m.weight_name in points:
            modules = points[m.weight_name]
            if not modules:
                modules.append(twin.weight_quant[m.weight_name])
            if isinstance(m.bias_quant, BiasFakeQuant):
                modules.append(m.bias_quant)
    points = {n: modules for n, modules in points.items() if modules}
    for g in plan.groups:
        if g.id in twin.act_quant:
            points[g.roots[0]] = [twin.act_quant[g.id]]
    return points


def excluded_quantizers(model: onnx.ModelProto, plan: QuantPlan, points: Dict[str, List[torch.nn.Module]], node: str,
                        quantize_outputs: bool) -> Tuple[List[str], List[torch.nn.Module]]:
    """The points of ``points`` (``twin_points``) that ``--exclude node`` takes away (``removed_points``:
    its own and those that then reach no quantized layer), and their fake quantizers."""
    removed = [p for p in removed_points(model, plan, [node], quantize_outputs) if p in points]
    return removed, [m for p in removed for m in points[p]]


@dataclass
class SearchInputs:
    """What the bit-width search works on: the prepared float model, its plan, every weight
    MSE-initialized at every candidate width (``candidates[b]``), the activation parameters, the
    calibration set, the run's configuration and the tensors the LFH does not probe (eptq.stage.loss_tensors)."""

    model: onnx.ModelProto
    plan: QuantPlan
    candidates: Mapping[int, Dict[str, WeightQuant]]
    acts: Dict[int, ActParams]
    calib: CalibrationSet
    config: QuantConfig
    untapped: FrozenSet[str] = frozenset()


def measure_sensitivity(
    inputs: SearchInputs,
    *,
    metric: str = "lfh",
    samples: int = 32,
    pairs: Optional[Sequence[Pair]] = None,
    evaluate: bool = True,
    progress: bool = True,
) -> SensitivityResult:
    """s(l, b) for every weight l and candidate b of ``inputs.candidates``.

    ``metric``: ``lfh`` (LFH-weighted distance at the quantization points and outputs) or ``output``
    (the model outputs only, unweighted). ``pairs``: also the interaction terms of these weight
    pairs. ``evaluate=False`` only computes the LFH (for the LFH-rank baseline).
    Raises ModelError when the model has no torch twin.
    """
    start = time.perf_counter()
    model, plan, candidates, calib, config = inputs.model, inputs.plan, inputs.candidates, inputs.calib, inputs.config
    widest = max(candidates)
    probed = loss_tensors(model, plan, config.optimize.learn_act_scales, inputs.untapped)
    try:
        twin = build_twin(model, plan, candidates[widest], inputs.acts, quantize_outputs=config.quantize_outputs,
                          quantize_bias=config.quantize_bias, taps=probed)
    except ModelError as exc:
        raise ModelError(f"mixed precision measures sensitivities on the torch twin, which this model lacks: {exc}; "
                         "quantize it without --mixed-precision") from exc
    device = config.optimize.device
    twin.teacher.to(device)
    twin.student.to(device)
    lfh: Dict[str, float] = {}
    hessian = None
    if metric == "lfh" or not evaluate:
        hessian = compute_lfh(model, twin, calib, probed, config, progress)
        lfh = hessian[0].normalized
    outputs = {o.name for o in model.graph.output}
    weights = mean_one(lfh) if metric == "lfh" else {n: float(n in outputs) for n in probed}
    result = SensitivityResult({}, 0.0, metric, 0, 0, 0.0, 0.0, lfh=lfh, layer_tensor=layer_tensors(model, plan, probed),
                               hessian=hessian)
    if not evaluate:
        result.seconds = time.perf_counter() - start
        return result
    batches = list(calib.batches(batch_size=min(samples, 64), limit=samples))
    result.samples = sum(calib.samples_in(f) for f in batches)
    feeds = [to_tensors(f, device) for f in batches]
    del batches
    probe = DistanceProbe(twin, probed, weights, feeds)
    fixed: Dict[Tuple[str, int], WeightFakeQuant] = {}

    def quantizer(name: str, bits: int) -> WeightFakeQuant:
        if (name, bits) not in fixed:
            fixed[name, bits] = WeightFakeQuant(candidates[bits][name]).to(device)
        return fixed[name, bits]

    narrower = sorted(b for b in candidates if b != widest)
    names = [n for n in candidates[widest] if n in probe.modules]
    result.untracked = [n for n in candidates[widest] if n not in probe.modules]
    pairs = [(a, c) for a, c in pairs or [] if a in probe.modules and c in probe.modules]
    todo = len(names) * len(narrower) + len(pairs) * len(narrower) ** 2
    bar = tqdm(total=todo + 1, desc="sensitivity", unit="eval", disable=not progress)
    result.base = probe.distance({})
    bar.update()
    for name in names:
        result.table[name] = {widest: result.base}
        for b in narrower:
            result.table[name][b] = probe.distance({name: quantizer(name, b)})
            bar.update()
    for a, c in pairs:
        terms = result.pairs.setdefault((a, c), {})
        for ba in narrower:
            for bc in narrower:
                joint = probe.distance({a: quantizer(a, ba), c: quantizer(c, bc)})
                terms[ba, bc] = joint - result.table[a][ba] - result.table[c][bc] + result.base
                bar.update()
    bar.close()
    result.evaluations, result.eval_seconds = probe.evaluations, probe.seconds
    result.joint = lambda bits: probe.distance({n: quantizer(n, b) for n, b in bits.items() if b != widest and n in probe.modules})
    result.seconds = time.perf_counter() - start
    return result
