"""The weight stages' run-level steps: MSE-initialized weights at every width the run may choose, int32
bias fitting, and bias correction, with what the log and report say about them."""
from __future__ import annotations

from dataclasses import asdict, replace
from typing import Dict

import numpy as np
import onnx

from eptq_onnx.calib.data import CalibrationSet
from eptq_onnx.context import RunContext
from eptq_onnx.init.bias_correction import correct_biases
from eptq_onnx.init.quantizers import ActParams
from eptq_onnx.init.weights import WeightQuant, fit_int32_biases, init_weights
from eptq_onnx.plan.qpoints import QuantPlan
from eptq_onnx.plan.targets import get_target


def init_weight_candidates(run: RunContext, model: onnx.ModelProto, plan: QuantPlan, fixed_bits: Dict[str, int],
                           inputs: Dict[str, np.ndarray]) -> Dict[int, Dict[str, WeightQuant]]:
    """MSE-initialized weight quantizers at every width the run may choose (one unless mixed precision);
    a weight in ``fixed_bits`` (--overrides) has its own width in every candidate."""
    config = run.config
    inputs = inputs if config.weight_init == "output-mse" else {}
    widths = config.mixed.bit_options if config.mixed is not None else (config.weight_bits,)

    def init(points: QuantPlan, bits: int) -> Dict[str, WeightQuant]:
        return init_weights(model, points, bits, config.weight_init, inputs, run.target, config.act_symmetric,
                            config.weight_rounding)

    candidates = {b: init(plan, b) for b in widths}
    if 8 in widths or 8 in fixed_bits.values():
        _note_u8s8_range(run)
    if config.weight_rounding == "gptq":
        gptq = sum(w.rounding == "gptq" for w in candidates[widths[0]].values())
        run.log(f"weight rounding: GPTQ on {gptq} of {len(candidates[widths[0]])} weights (the others round to "
                "nearest: no layer inputs for their kind, or GPTQ did not lower their output error)")
    for bits in set(fixed_bits.values()):
        own = init(replace(plan, weights=[p for p in plan.weights if fixed_bits.get(p.weight) == bits]), bits)
        for weights in candidates.values():
            weights.update(own)
    return candidates


def _note_u8s8_range(run: RunContext) -> None:
    """Say (log and report) whether 8-bit weights of U8S8 kernels took the target's 7-bit range, and why."""
    rule = get_target(run.config.target).u8s8_weight_bits
    if rule is None or run.config.act_symmetric:
        return
    reduced = run.target.u8s8_weight_bits is not None
    asked = run.config.reduce_range
    why = ("--reduce-range" if asked else "--no-reduce-range") if asked is not None else (
        "onnxruntime's CPU kernels on this machine saturate U8S8 int16 pair sums (x86 without VNNI)" if reduced
        else "onnxruntime's CPU kernels on this machine compute U8S8 products exactly")
    run.report.u8s8_range = {"reduce_range": reduced, "weight_bits": rule if reduced else 8, "why": why}
    run.log(f"8-bit Conv/MatMul/Gemm weights: {'7-bit range' if reduced else 'full int8 range'} ({why})"
            + ("" if reduced else "; for x86 CPUs without VNNI, quantize with --reduce-range"))


def fit_bias_steps(run: RunContext, model: onnx.ModelProto, plan: QuantPlan, weights: Dict[str, WeightQuant],
                   acts: Dict[int, ActParams]) -> Dict[str, WeightQuant]:
    """``weights`` with steps raised where a layer's int32 bias would not fit (init/weights.fit_int32_biases)."""
    if not run.config.quantize_bias:
        return weights
    act_scales = {t: acts[g.id].scale for g in plan.groups for t in g.tensors}
    fitted, raised = fit_int32_biases(model, plan, weights, act_scales)
    if raised:
        total = sum(raised.values())
        run.report.warn(f"{total} weight channel(s) of {len(raised)} layer(s) have near-zero weights: their steps were "
                        f"raised so that the int32 biases fit (a bias code of at most 2**24)")
    return fitted


def bias_corrected_model(run: RunContext, model: onnx.ModelProto, plan: QuantPlan, weights: Dict[str, WeightQuant],
                         acts: Dict[int, ActParams], calib: CalibrationSet) -> onnx.ModelProto:
    """The float model with bias-corrected biases (init/bias_correction.py) where that helps."""
    config = run.config
    if not config.bias_correction:
        return model
    with run.stage("bias correction"):
        corrected, outcome = correct_biases(model, plan, weights, acts, calib, config.quantize_outputs,
                                            config.quantize_bias)
    run.report.bias_correction = asdict(outcome)
    run.log(outcome.summary())
    return corrected
