"""The fidelity target as a stage of a run: the held-out samples split off, the target met, the report filled."""
from __future__ import annotations

from dataclasses import asdict
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import onnx

from eptq_onnx.calib.data import CalibrationSet, held_out_count
from eptq_onnx.context import RunContext
from eptq_onnx.eptq.schedule import budget_deadline
from eptq_onnx.errors import ModelError
from eptq_onnx.export.validate import session_config
from eptq_onnx.fidelity.target import HeldOutNoise, meet_target
from eptq_onnx.graph.runtime import float_outputs_of
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


QuantState = Tuple[onnx.ModelProto, QuantPlan, Dict[str, WeightQuant], Dict[int, ActParams]]
Written = Tuple[onnx.ModelProto, Any]  # a state's QDQ model and what the writer says of it
Writer = Callable[[onnx.ModelProto, QuantPlan, Dict[str, WeightQuant], Dict[int, ActParams]], Written]


def meet_target_stage(run: RunContext, float_model: onnx.ModelProto, model: onnx.ModelProto, plan: QuantPlan,
                      weights: Dict[str, WeightQuant], acts: Dict[int, ActParams], calib: CalibrationSet,
                      write: Writer) -> Tuple[QuantState, Optional[Written]]:
    """The state with the nodes left float that --min-sqnr needs (fidelity/target.py), verified on the
    written model (``verify_written``; ``write`` makes the QDQ model of a state), in the report; with
    ``write``'s result for that state, which the run saves (None where the target was not checked)."""
    config = run.config
    assert config.min_sqnr is not None and run.held_out is not None
    deadline = budget_deadline(run.started_at, config.optimize)
    before: QuantState = (model, plan, weights, acts)
    try:
        *after, outcome = meet_target(float_model, model, plan, weights, acts, calib, run.held_out, config,
                                      config.min_sqnr, deadline, run.progress)
    except ModelError as exc:
        run.report.warn(f"FIDELITY: the --min-sqnr target was not checked, nothing was left float: {exc}")
        return before, None
    state: QuantState = tuple(after)  # type: ignore[assignment]
    run.report.fidelity = asdict(outcome)
    run.log(outcome.summary())
    written = write(*state)
    baseline: List[Written] = []  # written only when verify_written asks for it

    def write_baseline() -> onnx.ModelProto:
        baseline.append(write(*before))
        return baseline[-1][0]

    if verify_written(run, float_model, written[0], write_baseline):
        state, written = before, baseline[-1]
    record_plan(run.report, state[1])
    return state, written


def _feed_energy(reference: List[List[np.ndarray]], got: Optional[List[List[np.ndarray]]] = None
                 ) -> Dict[str, np.ndarray]:
    """Output index -> energy of each held-out feed: of ``reference`` (the signal), or of its difference
    from ``got`` (the error)."""
    pairs = list(zip(reference, got if got is not None else [[0.0] * len(r) for r in reference]))
    return {str(i): np.array([float(np.sum((np.float64(r[i]) - g[i]) ** 2)) for r, g in pairs])
            for i in range(len(reference[0]) if reference else 0)}


def _held_out_errors(run: RunContext, reference: List[List[np.ndarray]], qdq: onnx.ModelProto,
                     feeds: List[Dict[str, np.ndarray]]) -> Dict[str, np.ndarray]:
    """Output index -> squared error of each held-out feed of ``qdq`` in onnxruntime as it deploys it
    (graph optimizations on, the target's session options) against ``reference``."""
    return _feed_energy(reference, float_outputs_of(qdq, feeds, config=session_config(qdq, run.target)))


def verify_written(run: RunContext, float_model: onnx.ModelProto, qdq: onnx.ModelProto,
                   baseline: Callable[[], onnx.ModelProto]) -> bool:
    """The target checked on the written model in onnxruntime, on the held-out samples: the walk ran on
    the torch twin's estimate, and on a deep network the model a user runs has rounding noise of its
    own (onnxruntime's kernels round differently; two nearby states decorrelate), so the twin's gain
    can be chance. ``fidelity.written_db`` is the written model's figure, and the target counts as
    reached only when it holds there. When it does not and the nodes left float do not raise the
    written model's SQNR over ``baseline`` (the model without them) beyond the held-out samples'
    noise (``HeldOutNoise``), they only cost size and speed: True, the caller writes the baseline
    state instead (``fidelity.reverted``)."""
    fidelity = run.report.fidelity
    feeds = list(run.held_out.batches(batch_size=1))  # one by one: HeldOutNoise resamples them
    reference = float_outputs_of(float_model, feeds)
    noise = HeldOutNoise(_feed_energy(reference))
    errors = _held_out_errors(run, reference, qdq, feeds)
    written_db = noise.total_db(errors)
    target_db, estimate = fidelity["target_db"], fidelity["final_db"]
    reverted = False
    if fidelity["floated"] and written_db < target_db:
        base = _held_out_errors(run, reference, baseline(), feeds)
        base_db = noise.total_db(base)
        if noise.gain_bound(base, errors) <= 0:
            reverted = True
            fidelity["note"] = (f"the {len(fidelity['floated'])} node(s) the walk left float on the twin's estimate "
                                f"({fidelity['start_db']:.1f} -> {estimate:.1f} dB) give the written model "
                                f"{written_db:.1f} dB in onnxruntime against {base_db:.1f} dB without them, no gain "
                                "beyond the held-out samples' noise: they stay quantized")
            written_db = base_db
            fidelity.update(reverted=fidelity["floated"], floated=[], final_db=fidelity["start_db"])
    fidelity["written_db"] = written_db
    if written_db < target_db and not reverted and fidelity["reached"]:
        fidelity["note"] = (f"the twin's estimate ({estimate:.1f} dB) reached the target, but the written model "
                            f"in onnxruntime gives {written_db:.1f} dB on the held-out samples")
    fidelity["reached"] = written_db >= target_db
    state = "reached" if fidelity["reached"] else "NOT reached"
    run.log(f"fidelity target {target_db:g} dB {state}: the written model gives {written_db:.1f} dB on the held-out "
            f"samples in onnxruntime (the twin's estimate: {estimate:.1f} dB"
            + (", the nodes left float reverted)" if reverted else ")"))
    if not fidelity["reached"]:
        run.report.warn(f"FIDELITY: --min-sqnr {target_db:g} dB not reached: the written model gives {written_db:.1f} "
                        f"dB on {len(feeds)} held-out samples in onnxruntime, {len(fidelity['floated'])} node(s) left "
                        f"float: {fidelity['note']}")
    return reverted
