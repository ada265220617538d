"""The fidelity target (``--min-sqnr DB``): nodes left float, fewest and most damaging first, until the
output SQNR against the float model on held-out samples reaches the target.

The held-out samples are calibration files that no stage saw (``CalibrationSet.split``): not calibrated,
not optimized on. The candidates are the nodes of the quantization points (a weighted op with its
weight, int32 bias and output point; the producer of an activation point), ranked as
``eptq-onnx-analyze`` ranks points: by the output SQNR with that node's fake quantizers off in the
otherwise quantized torch twin, measured on calibration samples. In rank order each candidate is
tried on the held-out samples with every node taken so far, and kept only when it raises the
held-out SQNR by at least ``MIN_GAIN_DB`` and the gain holds beyond the samples' noise: on a deep
network the rounding noise of two nearby states is independent, so one state's SQNR on a dozen
samples can sit a dB or two above another's by chance, and the walk would keep what the samples
happened to favour (``gain_bound``: the gain must stay positive on ``1 - SIGNIFICANCE`` of the
bootstrap resamples of the held-out samples). The walk stops at the target, when the candidates run
out, or at the deadline. The nodes kept are then excluded from the plan as ``--exclude`` would exclude
them (``plan.exclusions``), and the state written is measured once more on the held-out samples:
that figure, not the estimate, is what the report gives.
"""
from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from tqdm import tqdm

from eptq_onnx.calib.data import CalibrationSet
from eptq_onnx.config import QuantConfig
from eptq_onnx.init.quantizers import ActParams
from eptq_onnx.init.weights import WeightQuant
from eptq_onnx.mixed.sensitivity import DistanceProbe, excluded_quantizers, sqnr_db, twin_points, worst
from eptq_onnx.plan.exclusions import exclude_nodes
from eptq_onnx.plan.points import describe_points, float_outputs
from eptq_onnx.plan.qpoints import QuantPlan
from eptq_onnx.plan.targets import get_target
from eptq_onnx.plan.weight_only import float_weight_only_layers
from eptq_onnx.twin.build import Twin, build_twin, to_tensors
from eptq_onnx.twin.weighted import WeightedOp

MIN_GAIN_DB = 0.05  # a candidate that buys less on the held-out samples stays quantized
RANK_SAMPLES = 16  # calibration samples the candidates are ranked on
MIN_RANK_SAMPLES = 2  # ... and the fewest the ranking is cut to when RANK_SAMPLES would not fit its time
SUBSET_SHARE = 0.9  # of a candidate's gain that one freeing fewer of its points must buy to be tried first
RANK_SHARE = 0.5  # of the time left when the target starts, for ranking: the rest is for trying candidates
SIGNIFICANCE = 0.05  # share of the bootstrap resamples of the held-out samples on which a kept gain may vanish
RESAMPLES = 2000  # bootstrap resamples of the held-out samples (seeded: a run is repeatable)


@dataclass
class FloatedNode:
    """One node the target left float, and the held-out output SQNR once it (and those before it) were."""

    node: str
    op_type: str
    points: List[str]  # the quantization points it took away (weights, activation roots), less those of nodes before it
    sqnr_db: float
    gain_db: float  # over the step before
    gain_low_db: float  # the gain's SIGNIFICANCE quantile over bootstrap resamples of the held-out samples


@dataclass
class FidelityOutcome:
    """What the fidelity target did: the held-out SQNR before and after, and each node left float."""

    target_db: float
    held_out_samples: int
    start_db: float
    final_db: float
    reached: bool
    floated: List[FloatedNode] = field(default_factory=list)
    candidates: int = 0
    tried: int = 0
    within_noise: int = 0  # candidates that raised the estimate, but by less than the held-out samples' noise
    seconds: float = 0.0
    note: str = ""  # why the walk stopped short of the target (empty when it was reached)
    written_db: Optional[float] = None  # the written model's held-out SQNR in onnxruntime (fidelity/stage.verify_written)
    reverted: List[FloatedNode] = field(default_factory=list)  # what the walk left float and the written model undid

    def summary(self) -> str:
        """One line for the log and the summary."""
        names = ", ".join(f"{f.node} (+{f.gain_db:.1f} dB)" for f in self.floated[:5])
        more = f" and {len(self.floated) - 5} more" if len(self.floated) > 5 else ""
        left = f"; {len(self.floated)} node(s) left float: {names}{more}" if self.floated else ""
        state = "reached" if self.reached else "NOT reached"
        return (f"fidelity target {self.target_db:.1f} dB {state}: held-out output SQNR {self.start_db:.1f} -> "
                f"{self.final_db:.1f} dB on {self.held_out_samples} samples{left}")


def _candidates(model: onnx.ModelProto, plan: QuantPlan, points: Dict[str, List[torch.nn.Module]],
                quantize_outputs: bool) -> Dict[str, Tuple[str, List[str], List[torch.nn.Module]]]:
    """node -> (op type, the points excluding it takes away, their fake quantizers): the units the target
    may leave float. Excluding a node takes its own points and those before it that then reach no
    quantized layer (``excluded_quantizers``), so leaving an activation float also frees the Conv output
    point in front of it, as the written model will."""
    by_node: Dict[str, Tuple[str, List[str], List[torch.nn.Module]]] = {}
    for _kind, node, op_type, _tensor, exclude in describe_points(model, plan).values():
        if exclude is None or node in by_node:  # a model input has no node to exclude
            continue
        removed, modules = excluded_quantizers(model, plan, points, node, quantize_outputs)
        if removed:
            by_node[node] = (op_type, removed, modules)
    return by_node


class FloatBiases:
    """The float model's biases, put on the student's layers of nodes as they are left float (a bias
    corrected or learned for a quantized layer is wrong for the float one)."""

    def __init__(self, twin: Twin, float_model: onnx.ModelProto, plan: QuantPlan) -> None:
        values = {t.name: t for t in float_model.graph.initializer}
        points = {p.weight: p for p in plan.weights if p.bias}
        self.layers: Dict[str, List[Tuple[WeightedOp, torch.Tensor]]] = defaultdict(list)
        for m in twin.student.modules():
            point = points.get(getattr(m, "weight_name", None))  # type: ignore[arg-type]
            if isinstance(m, WeightedOp) and m.bias is not None and point and m.bias_name == point.bias \
                    and point.bias in values:
                value = torch.from_numpy(numpy_helper.to_array(values[point.bias]).copy())
                self.layers[point.node].append((m, value.reshape(m.bias.shape).to(m.bias)))

    def put(self, nodes: Sequence[str]) -> List[Tuple[WeightedOp, torch.Tensor]]:
        """Put the float biases on the layers of ``nodes``; what they held (for :meth:`restore`)."""
        held = []
        for node in nodes:
            for m, value in self.layers.get(node, []):
                held.append((m, m.bias.data.clone()))
                m.bias.data.copy_(value)
        return held

    @staticmethod
    def restore(held: List[Tuple[WeightedOp, torch.Tensor]]) -> None:
        for m, value in reversed(held):
            m.bias.data.copy_(value)


def _rank(candidates: Dict[str, tuple], calib: CalibrationSet, twin: Twin, outputs: List[str], biases: "FloatBiases",
          device: str, deadline: Optional[float], bar: tqdm) -> Dict[str, float]:
    """Worst output SQNR with each candidate's quantizers off, on RANK_SAMPLES calibration samples, or on
    fewer (down to MIN_RANK_SAMPLES) when the first candidate's time says that all would not fit ``deadline``;
    the candidates ranked by then."""
    samples = RANK_SAMPLES
    score: Dict[str, float] = {}
    while True:
        feeds = [to_tensors(f, device) for f in calib.batches(batch_size=samples, limit=samples)]
        ranker = DistanceProbe(twin, outputs, dict.fromkeys(outputs, 1.0), feeds)
        for node, (_, _, modules) in candidates.items():
            if node in score:
                continue
            now = time.perf_counter()
            if deadline is not None and now > deadline:
                return score
            held = biases.put([node])
            score[node] = worst(ranker.sqnr_db(disabled=modules))
            biases.restore(held)
            bar.update()
            if len(score) == 1 and deadline is not None and samples > MIN_RANK_SAMPLES:
                each = time.perf_counter() - now
                fit = int(samples * (deadline - time.perf_counter()) / max(each * len(candidates), 1e-9))
                if fit < samples:  # rank them all on fewer samples, this one again too
                    samples, score = max(MIN_RANK_SAMPLES, fit), {}
                    break
        else:
            return score


def walk_order(candidates: Dict[str, tuple], score: Dict[str, float], start_db: float) -> List[str]:
    """The ranked candidates, best score first, each one preceded by the best candidate that frees a strict
    subset of its points for at least ``SUBSET_SHARE`` of its gain (a Relu whose output point is the culprit
    before the MatMul reading it, which would free the same point and its weight too)."""
    ranked = sorted(score, key=lambda n: -score[n])
    points = {n: frozenset(candidates[n][1]) for n in ranked}
    order: Dict[str, None] = {}  # insertion-ordered set
    for node in ranked:
        need = start_db + SUBSET_SHARE * (score[node] - start_db)
        smaller = next((a for a in ranked if a not in order and a != node and points[a] < points[node]
                        and score[a] >= need), None)
        if smaller is not None:
            order[smaller] = None
        order.setdefault(node, None)
    return list(order)


def _held_out_probe(float_model: onnx.ModelProto, model: onnx.ModelProto, plan: QuantPlan,
                    weights: Dict[str, WeightQuant], acts: Dict[int, ActParams],
                    feeds: Sequence[Dict[str, torch.Tensor]], config: QuantConfig, outputs: List[str]) -> DistanceProbe:
    """A probe of the student of ``model`` against the float model on ``feeds``."""
    twin = build_twin(model, plan, weights, acts, quantize_outputs=config.quantize_outputs,
                      quantize_bias=config.quantize_bias, taps=outputs, teacher_model=float_model)
    twin.teacher.to(config.optimize.device)
    twin.student.to(config.optimize.device)
    return DistanceProbe(twin, outputs, dict.fromkeys(outputs, 1.0), feeds)


class HeldOutNoise:
    """How far a gain between two states on the held-out samples is more than which samples were held
    out: the worst output SQNR recomputed on bootstrap resamples of the samples (drawn once, seeded, the
    same for every comparison: a paired test)."""

    def __init__(self, signal: Dict[str, np.ndarray], resamples: int = RESAMPLES, seed: int = 0) -> None:
        """``signal``: output -> signal energy of each held-out sample (``DistanceProbe.feed_signal``)."""
        samples = len(next(iter(signal.values()), []))
        self.total = {n: float(v.sum()) for n, v in signal.items()}
        self.index = np.random.default_rng(seed).integers(0, samples, size=(resamples, samples))
        self.signal = {n: v[self.index].sum(axis=1) for n, v in signal.items()}

    def total_db(self, errors: Dict[str, np.ndarray]) -> float:
        """The worst output SQNR of all the samples together (``errors``: output -> error of each sample)."""
        return worst({n: sqnr_db(self.total[n], float(e.sum())) for n, e in errors.items()})

    def resampled_db(self, errors: Dict[str, np.ndarray]) -> np.ndarray:
        """The worst output SQNR of each resample."""
        tiny = np.finfo(np.float64).tiny  # a resample without error: a finite, very high SQNR
        per_output = [10.0 * np.log10(np.maximum(self.signal[n], tiny) / np.maximum(e[self.index].sum(axis=1), tiny))
                      for n, e in errors.items()]
        return np.min(per_output, axis=0)

    def gain_bound(self, before: Dict[str, np.ndarray], after: Dict[str, np.ndarray]) -> float:
        """The SIGNIFICANCE quantile of the gain from ``before`` to ``after`` over the resamples (each a
        dict of output -> error of each held-out sample): positive when the gain holds beyond the noise."""
        return float(np.quantile(self.resampled_db(after) - self.resampled_db(before), SIGNIFICANCE))


def float_biases(model: onnx.ModelProto, float_model: onnx.ModelProto, plan: QuantPlan,
                 nodes: Sequence[str]) -> onnx.ModelProto:
    """``model`` with the float model's biases back on the layers of ``nodes`` (a bias corrected or
    learned for a quantized layer is wrong for the float one)."""
    names = {p.bias for p in plan.weights if p.node in set(nodes) and p.bias}
    original = {t.name: t for t in float_model.graph.initializer if t.name in names}
    if not original:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for init in out.graph.initializer:
        if init.name in original:
            init.CopyFrom(original[init.name])
    return out


def without_nodes(model: onnx.ModelProto, plan: QuantPlan, weights: Dict[str, WeightQuant],
                  acts: Dict[int, ActParams], nodes: Sequence[str], config: QuantConfig
                  ) -> Tuple[QuantPlan, Dict[str, WeightQuant], Dict[int, ActParams]]:
    """The state with ``nodes`` excluded as ``--exclude`` does (and the layers the target would
    requantize, ``plan.weight_only``); each remaining activation group keeps the parameters of the
    group its first tensor was in."""
    if not nodes:
        return plan, weights, acts
    new = exclude_nodes(model, plan, list(nodes), config.quantize_outputs)
    new = float_weight_only_layers(new, get_target(config.target))
    old_group = {t: g.id for g in plan.groups for t in g.tensors}
    new_acts = {g.id: acts[old_group[g.tensors[0]]] for g in new.groups}
    kept = {p.weight for p in new.weights}
    new_weights = {name: w for name, w in weights.items() if name in kept}
    return replace(new, excluded=list(plan.excluded)), new_weights, new_acts  # excluded: the user's alone


def meet_target(float_model: onnx.ModelProto, model: onnx.ModelProto, plan: QuantPlan, weights: Dict[str, WeightQuant],
                acts: Dict[int, ActParams], calib: CalibrationSet, held_out: CalibrationSet, config: QuantConfig,
                target_db: float, deadline: Optional[float] = None, progress: bool = True
                ) -> Tuple[onnx.ModelProto, QuantPlan, Dict[str, WeightQuant], Dict[int, ActParams], FidelityOutcome]:
    """The state with the nodes left float that the target needs (see the module docstring), and the
    outcome. ``model`` is the prepared model with the biases the run chose (bias correction, EPTQ),
    ``float_model`` the prepared float model the SQNR is measured against. ``deadline`` is a
    ``time.perf_counter()`` value after which no more candidates are tried."""
    start_time = time.perf_counter()
    device = config.optimize.device
    outputs = float_outputs(model)
    checks = [to_tensors(f, device) for f in held_out.batches(batch_size=1)]  # one by one: HeldOutNoise resamples them
    probe = _held_out_probe(float_model, model, plan, weights, acts, checks, config, outputs)
    noise = HeldOutNoise(probe.feed_signal)
    current_errors = probe.feed_errors()
    start_db = noise.total_db(current_errors)
    outcome = FidelityOutcome(target_db, len(held_out), start_db, start_db, start_db >= target_db)
    if outcome.reached:
        outcome.seconds = time.perf_counter() - start_time
        return model, plan, weights, acts, outcome
    candidates = _candidates(model, plan, twin_points(probe.twin, plan), config.quantize_outputs)
    outcome.candidates = len(candidates)
    bar = tqdm(total=2 * len(candidates), desc="fidelity target", unit="eval", disable=not progress)
    biases = FloatBiases(probe.twin, float_model, plan)
    rank_deadline = None if deadline is None else start_time + RANK_SHARE * (deadline - start_time)
    score = _rank(candidates, calib, probe.twin, outputs, biases, device, rank_deadline, bar)
    if len(score) < len(candidates):
        outcome.note = f"the time budget ran out while the candidates were ranked ({len(score)} of {len(candidates)})"
    taken: List[str] = []
    disabled: List[torch.nn.Module] = []
    current = start_db
    for node in walk_order(candidates, score, start_db):
        if current >= target_db:
            break
        if deadline is not None and time.perf_counter() > deadline:
            outcome.note = outcome.note or "the time budget ran out while candidates were tried"
            break
        op_type, points, modules = candidates[node]
        held = biases.put([node])
        errors = probe.feed_errors(disabled=[*disabled, *modules])
        db = noise.total_db(errors)
        outcome.tried += 1
        bar.update()
        raised = db >= current + MIN_GAIN_DB
        low = noise.gain_bound(current_errors, errors) if raised else -math.inf
        if low <= 0:
            outcome.within_noise += raised
            biases.restore(held)
        else:
            taken.append(node)
            disabled.extend(modules)
            freed = {p for f in outcome.floated for p in f.points}
            outcome.floated.append(FloatedNode(node, op_type, [p for p in points if p not in freed], db, db - current,
                                               low))
            current, current_errors = db, errors
    bar.close()
    new_plan, new_weights, new_acts = without_nodes(model, plan, weights, acts, taken, config)
    kept = {p.node for p in new_plan.weights}
    new_model = float_biases(model, float_model, plan, [p.node for p in plan.weights if p.node not in kept])
    if taken:
        outcome.final_db = worst(_held_out_probe(float_model, new_model, new_plan, new_weights, new_acts, checks,
                                                 config, outputs).sqnr_db())
    outcome.reached = outcome.final_db >= target_db
    if not outcome.reached and not outcome.note:
        outcome.note = (f"every one of the {len(score)} candidate nodes was tried" if outcome.tried == len(score)
                        else "the estimate reached the target but the excluded model did not")
    if not outcome.reached and outcome.within_noise:
        outcome.note += (f"; {outcome.within_noise} candidate(s) raised the estimate by less than the noise of the "
                         f"{len(held_out)} held-out samples and stayed quantized (more calibration files hold out more)")
    outcome.seconds = time.perf_counter() - start_time
    return new_model, new_plan, new_weights, new_acts, outcome
