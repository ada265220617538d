"""The weight stages' run-level steps: MSE-initialized weights at every width the run may choose, the
8-bit weights left float (init/float_weights.py), int32 bias fitting, and bias correction, with what the
log and report say about them."""
from __future__ import annotations

from dataclasses import asdict, replace
from typing import Dict, Optional, Tuple

import numpy as np
import onnx

from eptq_onnx.calib.data import CalibrationSet
from eptq_onnx.calib.wide_acts import WideningCheck
from eptq_onnx.context import RunContext
from eptq_onnx.fidelity.target import without_nodes
from eptq_onnx.init.bias_correction import correct_biases
from eptq_onnx.init.float_weights import FLOAT_WEIGHT_BITS, choose_float_weights
from eptq_onnx.init.quantizers import ActParams
from eptq_onnx.init.weights import WeightQuant, fit_int32_biases, init_weights
from eptq_onnx.plan.qpoints import QuantPlan
from eptq_onnx.plan.targets import Target, get_target, with_reduce_range


def init_weight_candidates(run: RunContext, model: onnx.ModelProto, plan: QuantPlan, fixed_bits: Dict[str, int],
                           inputs: Dict[str, np.ndarray]) -> Dict[int, Dict[str, WeightQuant]]:
    """MSE-initialized weight quantizers at every width the run may choose (one unless mixed precision);
    a weight in ``fixed_bits`` (--overrides) has its own width in every candidate."""
    config = run.config
    widths = config.mixed.bit_options if config.mixed is not None else (config.weight_bits,)
    candidates = {b: _init_at(run, model, plan, b, inputs) for b in widths}
    if 8 in widths or 8 in fixed_bits.values():
        _note_u8s8_range(run)
    if config.weight_rounding == "gptq":
        gptq = sum(w.rounding == "gptq" for w in candidates[widths[0]].values())
        run.log(f"weight rounding: GPTQ on {gptq} of {len(candidates[widths[0]])} weights (the others round to "
                "nearest: no layer inputs for their kind, or GPTQ did not lower their output error)")
    for bits in set(fixed_bits.values()):
        own = _init_at(run, model, replace(plan, weights=[p for p in plan.weights if fixed_bits.get(p.weight) == bits]),
                       bits, inputs)
        for weights in candidates.values():
            weights.update(own)
    return candidates


def _init_at(run: RunContext, model: onnx.ModelProto, plan: QuantPlan, bits: int, inputs: Dict[str, np.ndarray],
             target: Optional[Target] = None) -> Dict[str, WeightQuant]:
    """The run's weight init of ``plan``'s weights at ``bits`` (``target``: the run's unless given)."""
    config = run.config
    return init_weights(model, plan, bits, config.weight_init, inputs if config.weight_init == "output-mse" else {},
                        target or run.target, config.act_symmetric, config.weight_rounding)


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


def float_weak_weights(run: RunContext, model: onnx.ModelProto, plan: QuantPlan,
                       candidates: Dict[int, Dict[str, WeightQuant]], acts: Dict[int, ActParams],
                       inputs: Dict[str, np.ndarray], rows: Dict[str, np.ndarray], user_set: frozenset,
                       check: WideningCheck
                       ) -> Tuple[QuantPlan, Dict[int, Dict[str, WeightQuant]], Dict[int, ActParams]]:
    """The state with the weights whose 8-bit codes lose a reading layer (init/float_weights.py) left float,
    with every layer that reads them, when that raises the model's output SQNR on ``check``'s samples;
    ``inputs``: sampled layer inputs per weight (weight init's); ``rows``: per node; ``user_set``: weights
    whose width --overrides sets."""
    config, report = run.config, run.report
    if config.float_weights_below <= 0 or not rows:
        return plan, candidates, acts
    eight = _judged_codes(run, model, plan, candidates, inputs)
    chosen = choose_float_weights(model, plan, eight, rows, config.float_weights_below, user_set)
    if not chosen:
        return plan, candidates, acts
    worst = chosen[0]
    nodes = list(dict.fromkeys(n for f in chosen for n in f.nodes))
    found = (f"{len(chosen)} weight(s) leave a layer's output below {config.float_weights_below:g} dB SQNR at 8 bits "
             f"(worst: {worst.weight} read by {worst.layer}, {worst.db_8:.1f} dB; a fixed filter's taps, say)")
    new_plan, new_weights, new_acts = without_nodes(model, plan, check.weights, acts, nodes, config)
    before, after = check.states_sqnr(model, [(plan, check.weights, acts), (new_plan, new_weights, new_acts)])
    if after <= before:
        report.warn(f"{found}, but keeping them float does not raise the model's output SQNR on {check.samples} "
                    f"calibration sample(s) ({after:.1f} vs {before:.1f} dB): they stay quantized")
        return plan, candidates, acts
    report.float_weights = [asdict(f) for f in chosen]
    report.float_weights_output_sqnr_db = {"quantized": round(before, 2), "float": round(after, 2),
                                           "samples": check.samples}
    report.warn(f"FLOAT: {found}: they and the {len(nodes)} layer(s) that read them stay float (output SQNR "
                f"{before:.1f} -> {after:.1f} dB on {check.samples} calibration samples; --float-weights-below 0: "
                "never)")
    check.weights = new_weights
    kept = {p.weight for p in new_plan.weights}
    return new_plan, {b: {n: w for n, w in ws.items() if n in kept} for b, ws in candidates.items()}, new_acts


def _judged_codes(run: RunContext, model: onnx.ModelProto, plan: QuantPlan,
                  candidates: Dict[int, Dict[str, WeightQuant]], inputs: Dict[str, np.ndarray]) -> Dict[str, WeightQuant]:
    """The 8-bit codes, at the full int8 range, that the float-weight check judges: the run's own where it has
    them, else (a 4-bit run, or a 7-bit U8S8 range) the same init at 8 bits, so that the weights left float
    do not depend on the width asked for or on the machine."""
    eight = candidates.get(FLOAT_WEIGHT_BITS)
    if eight is not None and all(w.bits == FLOAT_WEIGHT_BITS for w in eight.values()):
        return eight
    return _init_at(run, model, plan, FLOAT_WEIGHT_BITS, inputs, with_reduce_range(run.target, False))


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
