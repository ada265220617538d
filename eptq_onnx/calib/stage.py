"""The calibration stages' run-level steps: the calibration set, the layer-row sampler, and the 16-bit
activation points (calib/wide_acts.py) with what the report says about them."""
from __future__ import annotations

from dataclasses import asdict
from typing import Dict, FrozenSet, Optional, Tuple

import numpy as np
import onnx

from eptq_onnx.calib.channel_ranges import channel_ranges
from eptq_onnx.calib.data import CalibrationSet
from eptq_onnx.calib.layer_inputs import LayerRowSampler
from eptq_onnx.calib.memory import CalibSource, open_calibration
from eptq_onnx.calib.specs import input_specs
from eptq_onnx.calib.wide_acts import WIDE_BITS, WideningCheck, choose_wide_points, wide_params, widened_ids
from eptq_onnx.context import RunContext
from eptq_onnx.errors import ModelError
from eptq_onnx.export.writer import ACT_TYPES
from eptq_onnx.graph.equalize import equalize, find_blocks
from eptq_onnx.graph.model_io import default_opset
from eptq_onnx.graph.normalize import raise_opset
from eptq_onnx.init.quantizers import ActParams
from eptq_onnx.ops.registry import ORT_WEIGHT_ONLY_REQUANTIZED
from eptq_onnx.plan.qpoints import QuantPlan
from eptq_onnx.plan.range_rules import GroupStats


def calibration_set(run: RunContext, calib: CalibSource, model: onnx.ModelProto) -> CalibrationSet:
    """The calibration samples, checked against the model's inputs."""
    calib_set = open_calibration(calib, input_specs(model), run.config.calib)
    run.report.calibration_samples = len(calib_set)
    if calib_set.whole_feeds:
        run.report.warn(f"calibration data: {calib_set.describe()}")
    return calib_set


EQUALIZE_SAMPLES = 16  # calibration samples whose per-channel ranges set the equalization factors


def equalize_depthwise(run: RunContext, model: onnx.ModelProto, calib: CalibrationSet
                       ) -> Tuple[onnx.ModelProto, FrozenSet[str]]:
    """The model with the inputs of its depthwise Convs equalized per channel (graph/equalize.py) where their
    ranges spread (``model`` itself where none is), and the layers whose output point then moves past their
    activation on a fusing target (overrides.fused_layers)."""
    if not run.config.equalize:
        return model, frozenset()
    blocks = find_blocks(model)
    if not blocks:
        return model, frozenset()
    ranges = channel_ranges(model, [b.tensor for b in blocks], calib, EQUALIZE_SAMPLES, run.progress)
    model, done = equalize(model, blocks, ranges)
    if done and run.store.used:
        model = run.store.held(model)
    run.report.equalized = [{"conv": e.block.conv, "tensor": e.block.tensor, "kind": e.block.kind,
                             "min_scale": round(e.min_scale, 5)} for e in done]
    run.rescaled = frozenset(t for e in done for t in e.rescaled)
    return model, frozenset(e.block.layer for e in done if e.block.kind != "relu" and e.block.layer is not None)


def row_sampler(run: RunContext, model: onnx.ModelProto, plan: QuantPlan) -> Optional[LayerRowSampler]:
    """The sampler of every weighted layer's input rows (calib/layer_inputs.py) that the range pass feeds,
    where weight init, the 16-bit activation check or the float-weight check reads them."""
    config = run.config
    if config.weight_init == "output-mse" or (config.act16_below > 0 and config.act_bits == 8) \
            or config.float_weights_below > 0:
        return LayerRowSampler(model, plan)
    return None


def widen_activations(run: RunContext, model: onnx.ModelProto, plan: QuantPlan, acts: Dict[int, ActParams],
                      stats: Dict[int, GroupStats], rows: Dict[str, np.ndarray], user_set: frozenset,
                      check: WideningCheck) -> onnx.ModelProto:
    """16 bits for the 8-bit points whose grid loses a reading layer (calib/wide_acts.py), written into
    ``acts`` when they raise the output SQNR of the model on ``check``'s samples; returns the model,
    raised to the opset of 16-bit QuantizeLinear when they need it."""
    config, report = run.config, run.report
    if config.act16_below <= 0 or config.act_bits != 8 or not rows:
        return model
    requantizing = ORT_WEIGHT_ONLY_REQUANTIZED if run.target.onnxruntime else frozenset()
    points, left = choose_wide_points(model, plan, acts, stats, rows, config.act16_below, user_set, requantizing)
    if left:
        shown = ", ".join(f"{p.tensor} ({p.layer}, {p.db_8:.1f} dB)" for p in left[:3]) + (" ..." if len(left) > 3 else "")
        report.warn(f"{len(left)} activation point(s) leave a MatMul's output below {config.act16_below:g} dB on one "
                    f"8-bit grid but stay at 8 bits: onnxruntime's CPU would requantize a wider input to int8 on the "
                    f"fly (MatMulNBits): {shown}; --exclude the MatMul, or --min-sqnr, to keep it float")
    if not points:
        return model
    worst = min(points, key=lambda p: p.db_8)
    found = (f"{len(points)} activation point(s) leave a layer's output below {config.act16_below:g} dB SQNR on one "
             f"8-bit grid (worst: {worst.tensor} read by {worst.layer}, {worst.db_8:.1f} dB; 16 bits: {worst.db_16:.1f} dB)")
    if (WIDE_BITS, config.act_symmetric) not in run.target.act_types:
        report.warn(f"{found}; --target {run.target.name} reads no 16-bit activations, so they stay at 8 bits "
                    "(--exclude their nodes, or --min-sqnr, to keep them float)")
        return model
    needed = ACT_TYPES[(WIDE_BITS, config.act_symmetric)][2]
    raised = default_opset(model) < needed
    unraised = model
    if raised:
        if run.store.used:
            report.warn(f"{found}; they stay at 8 bits: a large model is not raised to opset {needed} after preparation")
            return model
        try:
            model = raise_opset(model, needed)
        except ModelError as exc:
            report.warn(f"{found}; they stay at 8 bits: {exc}")
            return model
    widened = widened_ids(plan, points)
    wide = dict(acts)
    for group_id in widened:
        wide[group_id] = wide_params(stats[group_id], acts[group_id].signed)
    db_8, db_16 = check.output_sqnr(model, plan, acts, wide)
    if db_16 <= db_8:
        report.warn(f"{found}, but 16 bits there lower the model's output SQNR on {check.samples} calibration "
                    f"sample(s) ({db_16:.1f} vs {db_8:.1f} dB on one 8-bit grid): they stay at 8 bits")
        return unraised
    acts.update(wide)
    report.opset = default_opset(model)
    report.wide_activations = [asdict(p) for p in points]
    report.wide_output_sqnr_db = {"8-bit": round(db_8, 2), "16-bit": round(db_16, 2), "samples": check.samples}
    report.warn(f"WIDE: {found}: {len(widened)} point(s) take 16-bit activations"
                + (f" (opset raised to {needed})" if raised else "")
                + ("; onnxruntime's CPU runs their readers as float ops" if run.target.onnxruntime else "")
                + " (--act16-below 0: never)")
    return model

