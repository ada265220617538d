"""16-bit activations where one 8-bit grid loses what a layer reads (``--act16-below DB``).

A per-tensor 8-bit grid fails a tensor whose channels span very different ranges when a layer reads
the small channels with large weights: MobileNetV3/PP-LCNet blocks put a HardSwish (which no scale
passes exactly, so cross-layer equalization does not apply) in front of a depthwise Conv whose
batch-norm-folded filters amplify a channel with a tenth of the others' range 10-100x. Every other
tensor rounds well, but that layer's output is lost, and the whole network with it.

Such points are found from the layer-input rows that weight init samples (``calib.layer_inputs``):
the SQNR of each weighted layer's output when only its input is rounded on the point's 8-bit grid,
against the same with a 16-bit grid over the point's calibrated min/max. A point whose rounding
leaves a reading layer below ``below_db``, where 16 bits gain at least ``MIN_GAIN_DB`` there, takes
16 bits, and so does the point its elementwise chain starts from (the Conv output in front of a
HardSwish or SiLU, where onnxruntime's placement puts a point for its fused kernels): both grids
hold the same channels. Only groups the user did not set (``--overrides``) are considered, and not
those read by an op that the runtime requantizes to 8 bits on the fly whatever the point's grid
(``requantizing``: a MatMul on onnxruntime's CPU becomes MatMulNBits; plan/weight_only.py).

Each layer is judged alone, and the errors of a network can partly cancel: the widening is kept only
when it raises the SQNR of the model's outputs against the float model (the fake-quant references of
both grids on a few calibration samples, ``WideningCheck``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np
import onnx

from eptq_onnx.calib.data import CalibrationSet
from eptq_onnx.calib.layer_inputs import layer_product
from eptq_onnx.export.reference import fake_quant_model
from eptq_onnx.graph.index import GraphIndex
from eptq_onnx.graph.runtime import float_outputs_of, output_sqnr_db
from eptq_onnx.graph.tensor_store import tensor_array
from eptq_onnx.init.quantizers import ActParams, fake_quant, params_for_range, sqnr_db
from eptq_onnx.init.weights import WeightQuant
from eptq_onnx.plan.composites import elementwise_root
from eptq_onnx.plan.qpoints import QuantPlan, node_roles
from eptq_onnx.plan.range_rules import GroupStats

WIDE_BITS = 16
MIN_GAIN_DB = 6.0  # 16 bits must lift the layer's output SQNR at least this much (else the loss is not the grid's)
CHECK_SAMPLES = 16  # calibration samples on which a widening is checked at the model's outputs


@dataclass
class WidePoint:
    """An activation group that takes 16 bits, and the layer that its 8-bit grid lost."""

    tensor: str  # the group's first root
    layer: str  # the weighted layer whose output 8 bits hurt most
    db_8: float  # that layer's output SQNR with only its input on the 8-bit grid
    db_16: float  # the same on the 16-bit grid
    fused: List[str] = field(default_factory=list)  # points in front of it (its elementwise chain's source) widened with it


def layer_output_sqnr(rows: np.ndarray, weight: np.ndarray, axis: int, params: ActParams) -> Optional[float]:
    """SQNR (dB) of a layer's output on its input rows [n, groups, K] when only the rows are rounded by
    ``params``; ``weight`` has its output channels on ``axis`` (None when its layout does not match the rows)."""
    exact = layer_product(rows, weight, axis)
    if exact is None:
        return None
    qmin, qmax = params.qrange
    rounded = fake_quant(rows, np.float32(params.scale), params.zero_point, qmin, qmax).astype(np.float32)
    return sqnr_db(exact, layer_product(rounded, weight, axis))


def wide_params(stats: GroupStats, signed: bool) -> ActParams:
    """The 16-bit grid of a group: its calibrated min/max (65536 steps need no clipping search)."""
    lo, hi = (stats.lo, stats.hi) if stats.seen else (0.0, 0.0)
    return params_for_range(lo, hi, WIDE_BITS, signed)


def choose_wide_points(model: onnx.ModelProto, plan: QuantPlan, acts: Mapping[int, ActParams],
                       stats: Mapping[int, GroupStats], rows: Mapping[str, np.ndarray], below_db: float,
                       keep: frozenset = frozenset(), requantizing: frozenset = frozenset()
                       ) -> Tuple[List[WidePoint], List[WidePoint]]:
    """The 8-bit activation groups to widen to 16 bits (see the module doc), and those that qualify but are
    read by an op type in ``requantizing`` (left at 8 bits); ``keep``: group ids left as they are."""
    index = GraphIndex(model.graph)
    group_of = plan.group_of()
    readers: Dict[int, List[tuple]] = {}
    requantized = set()
    for p in plan.weights:
        g = group_of.get(p.input) if p.input else None
        if g is not None and p.weight in rows and g.id not in keep and acts[g.id].bits == 8 and not acts[g.id].fixed:
            readers.setdefault(g.id, []).append((p, tensor_array(index.constants[p.weight]).astype(np.float32)))
        if g is not None and p.op_type in requantizing:
            requantized.add(g.id)
    chosen: List[WidePoint] = []
    for g in plan.groups:
        if g.id not in readers:
            continue
        wide = wide_params(stats[g.id], acts[g.id].signed)
        worst: Optional[tuple] = None
        for p, w in readers[g.id]:
            db_8 = layer_output_sqnr(rows[p.weight], w, p.axis, acts[g.id])
            if db_8 is not None and db_8 < below_db and (worst is None or db_8 < worst[1]):
                worst = (p.node, db_8, layer_output_sqnr(rows[p.weight], w, p.axis, wide))
        if worst is not None and worst[2] is not None and worst[2] >= worst[1] + MIN_GAIN_DB:
            chosen.append(WidePoint(g.roots[0], worst[0], round(float(worst[1]), 2), round(float(worst[2]), 2)))
    root_group = {r: g.id for g in plan.groups for r in g.roots}
    left = [c for c in chosen if root_group[c.tensor] in requantized]
    chosen = [c for c in chosen if root_group[c.tensor] not in requantized]
    _add_fused_sources(index, plan, chosen, acts, keep)
    return chosen, left


def _add_fused_sources(index: GraphIndex, plan: QuantPlan, chosen: List[WidePoint], acts: Mapping[int, ActParams],
                       keep: frozenset) -> None:
    """Each chosen point also widens the point its elementwise chain starts from (same channels, same spread)."""
    roles, _ = node_roles(index)
    root_group = {r: g for g in plan.groups for r in g.roots}
    taken = {root_group[c.tensor].id for c in chosen}
    memo: Dict[str, tuple] = {}
    for c in chosen:
        source, _ = elementwise_root(index, c.tensor, roles, memo)
        g = root_group.get(source)
        if source != c.tensor and g is not None and g.id not in taken and g.id not in keep and acts[g.id].bits == 8 \
                and not acts[g.id].fixed:
            c.fused.append(source)
            taken.add(g.id)


def widened_ids(plan: QuantPlan, points: List[WidePoint]) -> List[int]:
    """The group ids that ``points`` widen."""
    root_group = {r: g.id for g in plan.groups for r in g.roots}
    return [root_group[t] for p in points for t in (p.tensor, *p.fused)]


@dataclass
class WideningCheck:
    """The weights and calibration samples on which a widening is checked at the model's outputs."""

    weights: Dict[str, WeightQuant]
    calib: CalibrationSet
    quantize_outputs: bool = False
    quantize_bias: bool = True
    limit: int = CHECK_SAMPLES
    samples: int = 0  # set by output_sqnr

    def output_sqnr(self, model: onnx.ModelProto, plan: QuantPlan, acts: Mapping[int, ActParams],
                    wide: Mapping[int, ActParams]) -> Tuple[float, float]:
        """Output SQNR (dB) against the float ``model`` of its fake-quant references with ``acts`` and with ``wide``."""
        db_8, db_16 = self.states_sqnr(model, [(plan, self.weights, acts), (plan, self.weights, wide)])
        return db_8, db_16

    def states_sqnr(self, model: onnx.ModelProto,
                    states: List[Tuple[QuantPlan, Mapping[str, WeightQuant], Mapping[int, ActParams]]]) -> List[float]:
        """Output SQNR (dB) against the float ``model`` of the fake-quant reference of each (plan, weights, acts)."""
        batches = list(self.calib.batches(limit=self.limit))
        self.samples = sum(self.calib.samples_in(b) for b in batches)
        reference = float_outputs_of(model, batches)
        return [output_sqnr_db(reference, float_outputs_of(fake_quant_model(
            model, plan, dict(weights), dict(acts), self.quantize_outputs, self.quantize_bias), batches))
            for plan, weights, acts in states]
