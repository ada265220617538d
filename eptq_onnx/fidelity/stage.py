"""The fidelity target as a stage of a run: the held-out samples split off, the target met, the report filled."""
from __future__ import annotations

from dataclasses import asdict
from typing import Dict, Tuple

import onnx

from eptq_onnx.calib.data import MAX_HELD_OUT, CalibrationSet, held_out_count
from eptq_onnx.context import RunContext
from eptq_onnx.eptq.schedule import budget_deadline
from eptq_onnx.errors import ModelError
from eptq_onnx.export.validate import session_config
from eptq_onnx.fidelity.target import meet_target
from eptq_onnx.graph.runtime import float_outputs_of, output_sqnr_db
from eptq_onnx.init.quantizers import ActParams
from eptq_onnx.init.weights import WeightQuant
from eptq_onnx.plan.qpoints import QuantPlan
from eptq_onnx.report import record_plan


def hold_out(run: RunContext, calib_set: CalibrationSet) -> CalibrationSet:
    """The calibration set less the samples held out for the fidelity target (``run.held_out``)."""
    parts = calib_set.split(held_out_count(len(calib_set)))
    if parts is None:
        run.report.warn(f"FIDELITY: {len(calib_set)} calibration sample(s) cannot spare held-out ones: the "
                        "--min-sqnr target is checked on calibration samples (add calibration files)")
        run.held_out = calib_set
        return calib_set
    calib_set, run.held_out = parts
    run.log(f"fidelity target: {len(run.held_out)} of {len(calib_set) + len(run.held_out)} calibration samples "
            "held out to check it")
    return calib_set


def meet_target_stage(run: RunContext, float_model: onnx.ModelProto, model: onnx.ModelProto, plan: QuantPlan,
                      weights: Dict[str, WeightQuant], acts: Dict[int, ActParams], calib: CalibrationSet
                      ) -> Tuple[onnx.ModelProto, QuantPlan, Dict[str, WeightQuant], Dict[int, ActParams]]:
    """The state with the nodes left float that --min-sqnr needs (fidelity/target.py), in the report."""
    config = run.config
    assert config.min_sqnr is not None and run.held_out is not None
    deadline = budget_deadline(run.started_at, config.optimize)
    try:
        model, plan, weights, acts, outcome = meet_target(float_model, model, plan, weights, acts, calib, run.held_out,
                                                          config, config.min_sqnr, deadline, run.progress)
    except ModelError as exc:
        run.report.warn(f"FIDELITY: the --min-sqnr target was not checked, nothing was left float: {exc}")
        return model, plan, weights, acts
    run.report.fidelity = asdict(outcome)
    record_plan(run.report, plan)
    run.log(outcome.summary())
    if not outcome.reached:
        run.report.warn(f"FIDELITY: {outcome.summary()}: {outcome.note}")
    return model, plan, weights, acts


def check_written(run: RunContext, float_model: onnx.ModelProto, qdq: onnx.ModelProto) -> None:
    """The target checked once more on the written model, in onnxruntime as it deploys it (graph
    optimizations on, the target's session options): the target walked on the torch twin's estimate,
    and the model a user runs can miss what the twin reached (onnxruntime's fused kernels round
    differently, or the written graph differs from the twin). ``fidelity.written_db`` is that figure;
    the target counts as reached only when it holds there too."""
    fidelity = run.report.fidelity
    if not fidelity or run.held_out is None:
        return
    feeds = list(run.held_out.batches(batch_size=MAX_HELD_OUT))
    ref = float_outputs_of(float_model, feeds)
    got = float_outputs_of(qdq, feeds, config=session_config(qdq, run.target))
    written_db = min((output_sqnr_db([[r[i]] for r in ref], [[g[i]] for g in got]) for i in range(len(ref[0]))),
                     default=float("inf"))
    fidelity["written_db"] = written_db
    estimate = fidelity["final_db"]
    if written_db < fidelity["target_db"] and fidelity["reached"]:
        fidelity["reached"] = False
        fidelity["note"] = (f"the twin's estimate ({estimate:.1f} dB) reached the target, but the written model "
                            f"in onnxruntime gives {written_db:.1f} dB on the held-out samples")
        run.report.warn(f"FIDELITY: --min-sqnr {fidelity['target_db']:g} dB not reached: {fidelity['note']}")
    run.log(f"fidelity target: the written model gives {written_db:.1f} dB on the held-out samples in onnxruntime "
            f"(the twin's estimate: {estimate:.1f} dB)")
