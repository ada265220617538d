"""Activation step sizes from calibration statistics, streamed batch by batch.

Pass 1 (``range_statistics``) records each group root's finite min and max, from which the range
rules refine the plan; pass 2 (for ``mse`` and ``percentile``) fills a
fixed-range histogram per group (a batch's histograms in parallel threads, each filled by one).
Only the histograms are kept: never the activations.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Mapping, Optional

import numpy as np
import onnx
from tqdm import tqdm

from eptq_onnx.calib.data import CalibrationSet
from eptq_onnx.calib.layer_inputs import LayerRowSampler
from eptq_onnx.calib.transfer import Transfer
from eptq_onnx.config import QuantConfig
from eptq_onnx.plan.overrides import ActOverride
from eptq_onnx.plan.qpoints import QuantPlan
from eptq_onnx.init.quantizers import ActParams, Histogram, params_for_range, params_mse, params_percentile
from eptq_onnx.plan.range_rules import GroupStats, group_stats
from eptq_onnx.graph.runtime import make_session, run, tapped_batch_size, with_outputs


HISTOGRAM_THREADS = max(1, min(4, os.cpu_count() or 1))  # histograms of one batch filled at once


def _passes(session, calib: CalibrationSet, names: List[str], desc: str, progress: bool, batch_size: int):
    batches = tqdm(calib.batches(batch_size), desc=desc, total=calib.num_batches(batch_size), disable=not progress,
                   unit="batch", leave=False)
    for feeds in batches:
        yield run(session, feeds, names)


@dataclass
class RangePass:
    """The first calibration pass: every group root's finite min/max (and mask-fill/non-finite counts),
    with the tapped session and batch size that the histogram pass reuses."""

    root_stats: Dict[str, GroupStats]
    session: Optional[Any] = None
    batch_size: int = 1


def range_statistics(model: onnx.ModelProto, plan: QuantPlan, calib: CalibrationSet, progress: bool = True,
                     rows: Optional[LayerRowSampler] = None) -> RangePass:
    """Pass 1 over the calibration data: the statistics the range rules (range_rules.refine_plan) read;
    with ``rows``, the same pass also taps the weighted layers' inputs and feeds their row sampler
    (calib/layer_inputs.py) while it wants samples."""
    names = [root for g in plan.groups for root in g.roots]
    extra = [n for n in dict.fromkeys(rows.names) if n not in set(names)] if rows is not None else []
    if not names and not extra:
        return RangePass({})
    root_stats = {name: GroupStats() for name in names}
    session = make_session(with_outputs(model, names + extra))
    batch_size = tapped_batch_size(session, calib, calib.batch_size)
    batches = tqdm(calib.batches(batch_size), desc="calibration: ranges", total=calib.num_batches(batch_size),
                   disable=not progress, unit="batch", leave=False)
    for feeds in batches:
        sampling = rows is not None and rows.wanted
        outputs = run(session, feeds, names + extra if sampling else names)
        for name in names:
            root_stats[name].add(np.asarray(outputs[name]))
        if sampling:
            rows.offer(outputs, calib.samples_in(feeds))  # type: ignore[union-attr]
        del outputs
    return RangePass(root_stats, session, batch_size)


def calibrate_activations(
    plan: QuantPlan, ranges: RangePass, calib: CalibrationSet, config: QuantConfig, progress: bool = True,
    overrides: Optional[Mapping[int, ActOverride]] = None, transfers: Optional[Mapping[int, Transfer]] = None,
) -> tuple[Dict[int, ActParams], Dict[int, GroupStats]]:
    """Quantization parameters of every activation group of ``plan`` (refined by the range rules from
    ``ranges``), by ``config.calib_method``: from the min/max, or from pass 2's histograms; a group in
    ``overrides`` (plan/overrides.py) takes its coding from there, and its parameters when they are fixed;
    an ``mse`` range of a group in ``transfers`` minimizes the error of what the activation that reads it
    computes (calib/transfer.py). Returns the parameters and the statistics per group."""
    if not plan.groups:
        return {}, {}
    overrides, transfers = overrides or {}, transfers or {}
    stats = group_stats(plan.groups, ranges.root_stats)
    fixed = {i: _fixed_params(o) for i, o in overrides.items() if o.source.fixed}
    coded = {g.id: _coded(config, overrides.get(g.id)) for g in plan.groups}
    roots = {root: g for g in plan.groups for root in g.roots if g.id not in fixed}
    names = list(roots)
    params: Dict[int, ActParams] = dict(fixed)
    if config.calib_method == "minmax" or not names:
        for g in plan.groups:
            s, c = stats[g.id], coded[g.id]
            params.setdefault(g.id, params_for_range(s.lo if s.seen else 0.0, s.hi if s.seen else 0.0, c.act_bits,
                                                     c.act_symmetric))
        return params, stats
    hists = {g.id: _histogram(stats[g.id]) for g in plan.groups if g.id not in fixed}
    with ThreadPoolExecutor(HISTOGRAM_THREADS) as pool:
        for outputs in _passes(ranges.session, calib, names, "calibration: histograms", progress, ranges.batch_size):
            by_group: Dict[int, List[np.ndarray]] = {}
            for name, value in outputs.items():
                by_group.setdefault(roots[name].id, []).append(value)
            # numpy's histogram releases the GIL; one task per histogram, so none is filled by two at once
            list(pool.map(_fill, [hists[g] for g in by_group], by_group.values()))
    for group_id, hist in hists.items():
        params[group_id] = _params_from_histogram(hist, coded[group_id], transfers.get(group_id))
    return params, stats


def _coded(config: QuantConfig, override: Optional[ActOverride]) -> QuantConfig:
    """``config`` with the activation coding an override asks for."""
    if override is None or (override.bits, override.signed) == (config.act_bits, config.act_symmetric):
        return config
    return replace(config, act_bits=override.bits, act_symmetric=override.signed)


def _fixed_params(override: ActOverride) -> ActParams:
    """The parameters an override fixes: its scale and zero point, or the step of its range."""
    o = override.source
    if o.scale is not None:
        return ActParams(float(o.scale), int(o.zero_point), override.bits, override.signed, fixed=True)  # type: ignore[arg-type]
    return replace(params_for_range(float(o.rmin), float(o.rmax), override.bits, override.signed), fixed=True)  # type: ignore[arg-type]


def _fill(hist: Histogram, values: List[np.ndarray]) -> None:
    for value in values:
        hist.add(value)


def _histogram(stats: GroupStats) -> Histogram:
    if not stats.seen:
        return Histogram(0.0, 0.0)
    return Histogram(stats.lo, stats.hi)


def _params_from_histogram(hist: Histogram, config: QuantConfig, transfer: Optional[Transfer]) -> ActParams:
    if hist.total() == 0:
        return params_for_range(0.0, 0.0, config.act_bits, config.act_symmetric)
    if config.calib_method == "percentile":
        return params_percentile(hist, config.act_bits, config.act_symmetric, config.percentile)
    return params_mse(hist, config.act_bits, config.act_symmetric, transfer)

