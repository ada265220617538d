"""The EPTQ stage of the pipeline: twin -> Label-Free Hessian -> optimization -> write-back.

Takes the MSE-initialized quantization state and returns the optimized one, in the same form
(weight codes and steps, activation parameters, the float model with learned biases), so the
QDQ writer and the validation that follow do not know whether optimization ran.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Callable, Dict, FrozenSet, List, Optional, Tuple

import numpy as np
import onnx
import torch

from eptq_onnx.calib.data import CalibrationSet, held_out_count
from eptq_onnx.config import QuantConfig
from eptq_onnx.errors import ModelError
from eptq_onnx.eptq.hessian import LFHResult, label_free_hessian
from eptq_onnx.graph.index import FLOAT_TYPES, GraphIndex
from eptq_onnx.graph.layout import position_axes
from eptq_onnx.eptq.optimize import OptimizeResult, optimize, tensor_sqnr
from eptq_onnx.plan.exclusions import node_id
from eptq_onnx.plan.qpoints import QuantPlan
from eptq_onnx.init.quantizers import ActParams
from eptq_onnx.twin.weighted import WeightedOp
from eptq_onnx.twin.build import Twin, build_twin, model_with_biases, student_biases, to_tensors
from eptq_onnx.init.weights import WeightQuant

PROBED = (
    "the activation quantization points (the paper's choice: the tensors whose error Eq. 6 sums) "
    "and the model's float outputs"
)


class TwinUnavailable(Exception):
    """The model cannot be converted to torch, so it cannot be optimized (only MSE-initialized)."""


@dataclass
class EptqOutcome:
    """The optimized state and what the stage measured."""

    float_model: onnx.ModelProto
    weights: Dict[str, WeightQuant]
    acts: Dict[int, ActParams]
    hessian: Optional[LFHResult]
    hessian_step_seconds: float
    optimization: OptimizeResult
    loss_weights: Dict[str, float]
    sqnr_before: Dict[str, float]
    sqnr_after: Dict[str, float]
    kept_init: Optional[str] = None  # why the optimized state was discarded for the initialized one
    check_samples: int = 0  # how many samples the before / after SQNR were measured on
    check_held_out: bool = False  # whether they were held out of the optimization


def loss_tensors(model: onnx.ModelProto, plan: QuantPlan, learn_act_scales: bool = False,
                 untapped: FrozenSet[str] = frozenset()) -> List[str]:
    """Tensors compared between teacher and student: every group root, then the float outputs, of those
    the optimization can change: computed from a quantized weight's layer (its rounding and bias are
    learned) or, with ``learn_act_scales``, from a quantized activation. The others (the model inputs, a
    float LSTM's state outputs, whatever only float layers compute) are equal in teacher and student
    up to a constant, and would only take a share of the Hessian weights.
    ``untapped``: tensors left out (those depthwise equalization rescaled per channel: an error of
    x_c / s_c there weighs 1 / s_c^2 more than in the model as exported, while the depthwise filter that
    took s_c passes s_c of it on; the next point measures it as the model does)."""
    index = GraphIndex(model.graph)
    weighted = {p.node for p in plan.weights}
    learned = [o for n in model.graph.node if node_id(n) in weighted for o in n.output]
    if learn_act_scales:
        learned += [t for g in plan.groups for t in g.tensors]
    changed = index.downstream(learned) - set(index.inputs)
    names = [g.roots[0] for g in plan.groups if g.roots[0] in changed and g.roots[0] not in untapped]
    for out in model.graph.output:
        if out.type.tensor_type.elem_type in FLOAT_TYPES and out.name in changed and out.name not in names:
            names.append(out.name)
    return names


def _forward_backward_seconds(twin: Twin, sample: Dict[str, torch.Tensor]) -> float:
    """Time of one forward and backward pass of the float model at batch 1 (LFH cost yardstick)."""
    feeds = {k: v.clone().requires_grad_(v.is_floating_point()) for k, v in sample.items()}
    start = time.perf_counter()
    outputs = twin.teacher(feeds)
    sum(o.float().sum() for o in outputs if o.is_floating_point()).backward()  # type: ignore[union-attr]
    return time.perf_counter() - start


HESSIAN_SHARE = 0.15  # of the time budget, the most the Label-Free Hessian may take


def compute_lfh(
    model: onnx.ModelProto, twin: Twin, calib: CalibrationSet, names: List[str], config: QuantConfig, progress: bool
) -> Tuple[LFHResult, float]:
    """Label-Free Hessian of the teacher (``model``'s twin) at ``names``, over the first calibration
    samples, one at a time; with ``hessian_trace='channel'`` summed over each tensor's position axes.
    It takes at most HESSIAN_SHARE of the time budget (fewer draws per sample, then fewer samples)."""
    options = config.optimize
    device = options.device
    samples = [to_tensors(f, device) for f in calib.batches(batch_size=1, limit=options.hessian_samples)]
    layout = position_axes(model, names) if options.hessian_trace == "channel" else None
    twin.teacher.to(device)
    result = label_free_hessian(
        lambda feeds: twin.teacher.run(feeds, names),
        samples,
        max_draws=options.hessian_draws,
        distribution=options.hessian_distribution,
        seed=options.seed,
        progress=progress,
        position_axes=layout.axes if layout else None,
        time_limit_s=HESSIAN_SHARE * options.time_budget_min * 60,
    )
    result.unknown_axes = layout.unknown if layout else []
    return result, _forward_backward_seconds(twin, samples[0])


def mean_one(weights: Dict[str, float]) -> Dict[str, float]:
    """Weights rescaled to average 1, so that lambda has the same strength under every weighting.

    The log-normalized LFH weights lie in [0, 1] (the least sensitive tensor gets 0, as in the
    paper); uniform weights are all 1.
    """
    mean = sum(weights.values()) / max(1, len(weights))
    return {k: (v / mean if mean > 0 else 1.0) for k, v in weights.items()}


def _write_back(twin: Twin, model: onnx.ModelProto, acts: Dict[int, ActParams]) -> Tuple[onnx.ModelProto, Dict[str, WeightQuant], Dict[int, ActParams]]:
    """Hard-rounded codes, learned steps and biases, in the writer's form."""
    modules = [m for m in twin.student.modules() if isinstance(m, WeightedOp)]
    float_weights = {m.weight_name: m.weight for m in modules}
    weights = {name: wfq.export(float_weights[name]) for name, wfq in twin.weight_quant.items()}
    new_acts = {gid: replace(acts[gid], scale=float(fq.scale.detach().cpu())) for gid, fq in twin.act_quant.items()}
    return model_with_biases(model, student_biases(twin)), weights, new_acts


def run_eptq(
    model: onnx.ModelProto,
    plan: QuantPlan,
    weights: Dict[str, WeightQuant],
    acts: Dict[int, ActParams],
    calib: CalibrationSet,
    config: QuantConfig,
    progress: bool = True,
    log: Callable[[str], None] = print,
    started_at: Optional[float] = None,
    lfh: Optional[Tuple[LFHResult, float]] = None,
    start: Optional[onnx.ModelProto] = None,
    untapped: FrozenSet[str] = frozenset(),
) -> EptqOutcome:
    """Optimize the quantization state of ``model`` with EPTQ (paper Algorithm 1, steps 5-7).

    ``started_at``: ``time.perf_counter()`` at the start of the run, from which the time budget counts.
    ``lfh``: ``compute_lfh``'s result for this float model and configuration, computed earlier (by the
    mixed-precision search); used instead of a second computation when its tensors are this run's.
    ``start``: ``model`` with the biases the student starts from (bias correction's, as ``--iters 0``
    writes them); the teacher keeps ``model``'s, and the check's "before" is the student as it starts.
    ``untapped``: tensors the loss does not compare (``loss_tensors``).
    """
    options = config.optimize
    names = loss_tensors(model, plan, options.learn_act_scales, untapped)
    try:
        twin = build_twin(
            start if start is not None else model, plan, weights, acts, quantize_outputs=config.quantize_outputs,
            quantize_bias=config.quantize_bias, taps=names, teacher_model=model,
        )
    except ModelError as exc:
        raise TwinUnavailable(str(exc)) from exc
    hessian, fb_seconds = None, 0.0
    if options.weighting == "lfh":
        reuse = lfh is not None and set(lfh[0].traces) == set(names)
        hessian, fb_seconds = lfh if reuse else compute_lfh(model, twin, calib, names, config, progress)  # type: ignore[misc]
        loss_weights = mean_one(hessian.normalized)
    else:
        loss_weights = dict.fromkeys(names, 1.0)
    train, check_set = _check_split(calib)
    check = list(check_set.batches(limit=max(1, config.validation_samples)))
    held_out = check_set is not calib
    log(f"EPTQ: optimized on {len(train)} calibration samples, checked on {len(check_set)} "
        + ("held out" if held_out else "of the same (too few files to hold any out)"))
    twin.student.to(options.device)
    twin.teacher.to(options.device)
    before = tensor_sqnr(twin, check, names, options.device)
    # streamed: the optimization's stacked tensors are the only copy of the calibration set in memory
    result = optimize(twin, train.batches(), loss_weights, options, progress=progress, log=log, started_at=started_at,
                      stack=train.stackable)
    after = tensor_sqnr(twin, check, names, options.device)
    twin.student.to("cpu")
    outputs = [o.name for o in model.graph.output if o.name in before]
    worse = output_regression(before, after, outputs)
    checked = dict(check_samples=len(check_set), check_held_out=held_out)
    if worse is not None and options.discard_if_worse:
        return EptqOutcome(model, weights, acts, hessian, fb_seconds, result, loss_weights, before, after, kept_init=worse,
                           **checked)
    new_model, new_weights, new_acts = _write_back(twin, model, acts)
    return EptqOutcome(new_model, new_weights, new_acts, hessian, fb_seconds, result, loss_weights, before, after, **checked)


def _check_split(calib: CalibrationSet) -> Tuple[CalibrationSet, CalibrationSet]:
    """(samples to optimize on, samples to check the result on): the last files held out (a quarter, at
    most MAX_HELD_OUT samples), so that a result fitted to its training samples is not kept for its fit
    to them; the whole set twice when it cannot spare any."""
    parts = calib.split(held_out_count(len(calib)))
    return parts if parts is not None else (calib, calib)


def output_regression(before: Dict[str, float], after: Dict[str, float], outputs: List[str]) -> Optional[str]:
    """Why the optimized model is worse than the initialized one (mean output SQNR on the check
    samples), or None when it is not."""
    if not outputs:
        return None
    mean_before = float(np.mean([min(before[o], 200.0) for o in outputs]))
    mean_after = float(np.mean([min(after[o], 200.0) for o in outputs]))
    if mean_after >= mean_before:
        return None
    return (
        f"the optimized model's output SQNR on the check samples ({mean_after:.2f} dB) is below the "
        f"MSE-initialized model's ({mean_before:.2f} dB)"
    )
