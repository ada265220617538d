"""What each quantization point costs, measured on the torch twin with the sensitivity machinery of
mixed precision (``mixed.sensitivity.DistanceProbe``), and the error of every tensor along the graph.

Per point, two evaluations over the sensitivity samples (one no-grad forward pass of the student each,
against the teacher's outputs cached once): the output SQNR with only this point quantized (every other
fake quantizer off) and with this point left float as ``--exclude`` of its node leaves it (with the
node's other points and those in front of it that then reach no quantized layer; every other on). A point is a weight (its
quantizer and the int32 biases on its step) or an activation group (one scale and zero point).

Then one pass per sample through teacher and fully quantized student records every float tensor of
the graph: its SQNR as the next op reads it (after its own QuantizeLinear/DequantizeLinear where it is
a point), what onnxruntime's ``qdq_loss_debug`` compares.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import onnx
import torch
from tqdm import tqdm

from eptq_onnx.calib.data import CalibrationSet
from eptq_onnx.config import QuantConfig
from eptq_onnx.errors import ModelError, UsageError
from eptq_onnx.init.quantizers import ActParams
from eptq_onnx.init.weights import WeightQuant
from eptq_onnx.mixed.sensitivity import DistanceProbe, excluded_quantizers, sqnr_db, twin_points, worst
from eptq_onnx.plan.exclusions import node_id
from eptq_onnx.plan.points import FLOAT_TYPES, describe_points, float_outputs
from eptq_onnx.plan.qpoints import QuantPlan
from eptq_onnx.twin.build import Twin, build_twin, to_tensors


@dataclass
class PointCost:
    """What one quantization point costs at the model's outputs (SQNR of the worst output, dB)."""

    point: str  # the weight's name, or the first root tensor of the activation group
    kind: str  # "weight" or "activation"
    node: str  # the node reading the weight / producing the root ("" for a model input)
    op_type: str
    tensor: str  # where it sits along the graph: the weighted op's output, or the root
    bits: int
    exclude: Optional[str]  # the --exclude pattern that keeps it float (its node); None for a model input
    alone_sqnr_db: float  # only this point quantized
    float_sqnr_db: float  # every point quantized but those that --exclude of its node takes away
    gain_db: float  # float_sqnr_db - the fully quantized model's SQNR: what leaving it float buys
    noise_share: float  # the larger of the two estimates of its share of the quantized model's output noise
    alone_by_output: Dict[str, float] = field(default_factory=dict)
    float_by_output: Dict[str, float] = field(default_factory=dict)
    rank: int = 0


@dataclass
class TensorError:
    """Float-vs-quantized SQNR of one tensor (topological order), as its readers see it."""

    index: int
    tensor: str
    op_type: str  # of the producing node ("input" for a model input)
    node: str
    sqnr_db: float
    point: Optional[str] = None  # the activation group (first root) that quantizes this tensor


@dataclass
class Measurement:
    """Every point's cost, every tensor's error and what measuring them cost."""

    outputs: List[str]
    quantized_sqnr_db: Dict[str, float]  # the fully quantized model, per output
    points: List[PointCost]
    tensors: List[TensorError]
    cost: Dict[str, float]
    not_measured: List[str]


def noise_share(full_db: float, alone_db: float, gain_db: float) -> float:
    """The point's share of the quantized model's output noise N, assuming noises add: N_i / N =
    10^((full - alone) / 10) from the point alone, 1 - 10^(-gain / 10) from leaving it float; the larger."""
    if math.isinf(full_db) and full_db > 0:
        return 0.0
    alone = 0.0 if math.isinf(alone_db) and alone_db > 0 else 10.0 ** ((full_db - alone_db) / 10.0)
    floated = 1.0 if math.isinf(gain_db) and gain_db > 0 else 1.0 - 10.0 ** (-gain_db / 10.0)
    return float(max(alone, floated))


def graph_tensors(model: onnx.ModelProto) -> List[str]:
    """The model's float inputs, then every node output, in topological (graph) order."""
    initializers = {t.name for t in model.graph.initializer}
    names = [i.name for i in model.graph.input
             if i.name not in initializers and i.type.tensor_type.elem_type in FLOAT_TYPES]
    names += [o for node in model.graph.node for o in node.output if o]
    return list(dict.fromkeys(names))


def chosen_outputs(model: onnx.ModelProto, names: Sequence[str]) -> List[str]:
    """The float outputs the analysis compares: ``names`` (checked), or all; UsageError otherwise."""
    available = float_outputs(model)
    unknown = [n for n in names if n not in available]
    if unknown:
        raise UsageError(f"--output {unknown[0]!r} is no float output of the model: choose from "
                         f"{', '.join(repr(n) for n in available) or '(none)'}")
    if not available:
        raise ModelError("the analysis compares float model outputs, and this model has none")
    return list(dict.fromkeys(names)) or available


def _twin(model: onnx.ModelProto, plan: QuantPlan, weights: Dict[str, WeightQuant], acts: Dict[int, ActParams],
          config: QuantConfig, taps: Sequence[str]) -> Twin:
    try:
        return build_twin(model, plan, weights, acts, quantize_outputs=config.quantize_outputs,
                          quantize_bias=config.quantize_bias, taps=taps)
    except ModelError as exc:
        raise ModelError(f"the analysis runs on the torch twin, which this model lacks: {exc}") from exc


def measure(model: onnx.ModelProto, plan: QuantPlan, weights: Dict[str, WeightQuant], acts: Dict[int, ActParams],
            calib: CalibrationSet, config: QuantConfig, samples: int = 32, progress: bool = True,
            outputs: Sequence[str] = ()) -> Measurement:
    """Every point's cost and every tensor's error on the first ``samples`` calibration samples, at
    the model's float ``outputs`` (default: all of them)."""
    start = time.perf_counter()
    outputs = chosen_outputs(model, outputs)
    tensors = graph_tensors(model)
    twin = _twin(model, plan, weights, acts, config, tensors)
    device = config.optimize.device
    twin.teacher.to(device)
    twin.student.to(device)
    batches = list(calib.batches(batch_size=min(samples, 64), limit=samples))
    count = sum(calib.samples_in(f) for f in batches)
    feeds = [to_tensors(f, device) for f in batches]
    del batches
    probe = DistanceProbe(twin, outputs, dict.fromkeys(outputs, 1.0), feeds)
    points = twin_points(twin, plan)
    info = describe_points(model, plan)
    bar = tqdm(total=2 * len(points) + 1, desc="analysis", unit="eval", disable=not progress)
    full = probe.sqnr_db()
    bar.update()
    everything = [m for modules in points.values() for m in modules]
    freed: Dict[str, List[torch.nn.Module]] = {}  # node -> the quantizers its --exclude takes away
    costs: List[PointCost] = []
    for name, modules in points.items():
        own = {id(m) for m in modules}
        alone = probe.sqnr_db(disabled=[m for m in everything if id(m) not in own])
        kind, node, op_type, tensor, exclude = info[name]
        if exclude is not None and exclude not in freed:
            freed[exclude] = excluded_quantizers(model, plan, points, exclude, config.quantize_outputs)[1]
        floated = probe.sqnr_db(disabled=freed[exclude] if exclude is not None else modules)
        bar.update(2)
        gain = worst(floated) - worst(full)
        bits = weights[name].bits if kind == "weight" else _act_bits(acts, plan, name)
        costs.append(PointCost(name, kind, node, op_type, tensor, bits, exclude, worst(alone), worst(floated), gain,
                               noise_share(worst(full), worst(alone), gain), alone, floated))
    bar.close()
    costs.sort(key=lambda c: (-c.noise_share, c.alone_sqnr_db))
    for rank, cost in enumerate(costs, 1):
        cost.rank = rank
    float_seconds = _float_forward_seconds(twin, feeds)
    tensor_start = time.perf_counter()
    errors = tensor_errors(twin, model, plan, calib, samples, tensors, device, progress)
    per_eval = probe.seconds / max(1, probe.evaluations)
    cost = {
        "points": len(points),
        "samples": count,
        "evaluations": probe.evaluations,
        "eval_seconds": round(probe.seconds, 3),
        "seconds_per_evaluation": round(per_eval, 4),
        "float_forward_seconds": round(float_seconds, 4),
        "evaluation_over_float_forward": round(per_eval / float_seconds, 2) if float_seconds > 0 else None,
        "tensor_pass_seconds": round(time.perf_counter() - tensor_start, 3),
        "seconds": round(time.perf_counter() - start, 3),
    }
    not_measured = [p.weight for p in plan.weights if p.weight not in points]
    return Measurement(outputs, full, costs, errors, cost, list(dict.fromkeys(not_measured)))


def _act_bits(acts: Dict[int, ActParams], plan: QuantPlan, root: str) -> int:
    return next(acts[g.id].bits for g in plan.groups if g.roots[0] == root)


def _float_forward_seconds(twin: Twin, feeds: Sequence[Dict[str, torch.Tensor]]) -> float:
    """One no-grad forward pass of the float teacher over the sensitivity samples (the cost yardstick)."""
    start = time.perf_counter()
    with torch.no_grad():
        for f in feeds:
            twin.teacher(f)
    return time.perf_counter() - start


def tensor_errors(twin: Twin, model: onnx.ModelProto, plan: QuantPlan, calib: CalibrationSet, samples: int,
                  tensors: Sequence[str], device: str, progress: bool = True) -> List[TensorError]:
    """Float-vs-quantized SQNR of every float tensor, one sample at a time (every tensor of one
    sample of both modules is held at once)."""
    quantizer = {t: (g.roots[0], twin.act_quant[g.id]) for g in plan.groups for t in g.tensors}
    producer = {o: (n.op_type, node_id(n)) for n in model.graph.node for o in n.output}
    signal = dict.fromkeys(tensors, 0.0)
    noise = dict.fromkeys(tensors, 0.0)
    seen: Dict[str, bool] = {}
    total = calib.num_batches(1, limit=samples)
    with torch.no_grad():
        for batch in tqdm(calib.batches(1, limit=samples), total=total, desc="tensors", disable=not progress, leave=False):
            feeds = to_tensors(batch, device)
            _, ref = twin.teacher.run(feeds, tensors)
            _, got = twin.student.run(feeds, tensors)
            for name in tensors:
                r, q = ref.get(name), got.get(name)
                if r is None or q is None or not r.is_floating_point() or r.numel() == 0:
                    continue
                if name in quantizer:
                    q = quantizer[name][1](q)
                r64 = r.double()
                signal[name] += float(r64.pow(2).sum())
                noise[name] += float((r64 - q.double()).pow(2).sum())
                seen[name] = True
            del ref, got
    return [TensorError(i, name, *producer.get(name, ("input", name)), sqnr_db(signal[name], noise[name]),
                        quantizer[name][0] if name in quantizer else None)
            for i, name in enumerate(n for n in tensors if n in seen)]
