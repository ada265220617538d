"""Range-aware refinements of the quantization plan, decided from the first calibration pass.

The plan (qpoints.py) is built from the graph alone; two traps are only visible in the values:

- **Mask fill and non-finite values.** An attention mask added as ``(1 - mask) * float32 min``
  (or -inf, or -1e30-style fills) puts values no 8-bit grid can hold next to the data: a
  min/max range would leave every real value on one code, a clipped range would turn masked
  logits into ordinary ones. Such values (|x| >= ``MASK_FILL_ABS`` or non-finite) are ignored by
  range estimation, and a tensor that carries them stays float (reported).
- **One scale over very different ranges.** A Concat output shares its scale with its sole-use
  inputs; when those inputs' ranges differ by more than ``MAX_SHARED_RANGE_RATIO`` (e.g. box
  pixel coordinates next to class probabilities) the inputs get scales of their own, and a
  Concat that is a model output stays float (one scale cannot hold both).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Dict, List, Tuple

import numpy as np
import onnx

from eptq_onnx.plan.qpoints import ActGroup, QuantPlan

from eptq_onnx.graph.index import GraphIndex

MASK_FILL_ABS = 1e30  # |x| at or above this is a mask fill (float32 min is -3.4e38), not data
MAX_SHARED_RANGE_RATIO = 16.0  # largest ratio of max |x| between tensors allowed to share a scale


@dataclass
class GroupStats:
    """What calibration saw of one tensor (or group of tensors): finite range and excluded values."""

    lo: float = math.inf
    hi: float = -math.inf
    nonfinite: int = 0
    mask_fill: int = 0
    count: int = 0

    def add(self, x: np.ndarray) -> None:
        self.count += x.size
        if not x.size:
            return
        lo, hi = float(x.min()), float(x.max())
        if -MASK_FILL_ABS < lo and hi < MASK_FILL_ABS:  # all finite, no fill value: the common case, two reductions
            self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)
            return
        finite = np.isfinite(x)
        if not finite.all():
            self.nonfinite += int(x.size - finite.sum())
            x = x[finite]
        fill = np.abs(x) >= MASK_FILL_ABS
        if fill.any():
            self.mask_fill += int(fill.sum())
            x = x[~fill]
        if x.size:
            self.lo = min(self.lo, float(x.min()))
            self.hi = max(self.hi, float(x.max()))

    def merge(self, other: "GroupStats") -> None:
        self.lo, self.hi = min(self.lo, other.lo), max(self.hi, other.hi)
        self.nonfinite += other.nonfinite
        self.mask_fill += other.mask_fill
        self.count += other.count

    @property
    def seen(self) -> bool:
        return self.lo <= self.hi

    @property
    def absmax(self) -> float:
        return max(abs(self.lo), abs(self.hi)) if self.seen else 0.0


def group_stats(groups: List[ActGroup], root_stats: Dict[str, GroupStats]) -> Dict[int, GroupStats]:
    """Per-group statistics: the union of the group's roots' statistics."""
    result: Dict[int, GroupStats] = {}
    for g in groups:
        merged = GroupStats()
        for root in g.roots:
            merged.merge(root_stats[root])
        result[g.id] = merged
    return result


def refine_plan(model: onnx.ModelProto, plan: QuantPlan,
                root_stats: Dict[str, GroupStats]) -> Tuple[QuantPlan, List[str]]:
    """The plan the range rules make of ``plan`` (a new one, groups renumbered), and report notes."""
    plan = copy.deepcopy(plan)
    notes = _drop_extreme_groups(plan, root_stats)
    notes += _split_wide_concats(model, plan, root_stats)
    for i, g in enumerate(plan.groups):
        g.id = i
    return plan, notes


def _drop_extreme_groups(plan: QuantPlan, root_stats: Dict[str, GroupStats]) -> List[str]:
    notes, kept = [], []
    for g in plan.groups:
        bad = [r for r in g.roots if root_stats[r].mask_fill or root_stats[r].nonfinite]
        if not bad:
            kept.append(g)
            continue
        s = root_stats[bad[0]]
        notes.append(
            f"activation {bad[0]} stays float: {s.mask_fill} mask-fill values (|x| >= {MASK_FILL_ABS:g}, e.g. an "
            f"attention mask of float32 min) and {s.nonfinite} non-finite values that no integer grid holds "
            "next to its data"
        )
    plan.groups = kept
    return notes


def _split_wide_concats(model: onnx.ModelProto, plan: QuantPlan, root_stats: Dict[str, GroupStats]) -> List[str]:
    index = GraphIndex(model.graph)
    notes: List[str] = []
    for node in index.nodes:
        if node.op_type != "Concat":
            continue
        out = node.output[0]
        member = plan.group_of()
        target = member.get(out)
        if target is None or target.roots[0] != out:
            continue
        ranges = _input_ranges(index, node, target, member, root_stats)
        if len(ranges) < 2 or min(ranges) <= 0 or max(ranges) / min(ranges) <= MAX_SHARED_RANGE_RATIO:
            continue
        for extra in target.roots[1:]:  # merged sole-use inputs get their own scale again
            plan.groups.append(ActGroup(id=len(plan.groups), roots=[extra], tensors=[extra], reason="Concat input (own range)"))
        target.tensors = [t for t in target.tensors if t not in target.roots[1:]]
        target.roots = [out]
        why = f"its inputs' ranges differ {max(ranges) / min(ranges):.0f}x (> {MAX_SHARED_RANGE_RATIO:g}x)"
        if out in index.outputs:
            plan.groups.remove(target)
            notes.append(f"Concat output {out} stays float: {why}, one scale cannot hold them")
        else:
            notes.append(f"Concat {out}: inputs keep their own scales, {why}")
    return notes


def _input_ranges(index: GraphIndex, node: onnx.NodeProto, target: ActGroup, member: Dict[str, ActGroup],
                  root_stats: Dict[str, GroupStats]) -> List[float]:
    """max |x| of every activation input of a Concat (its own statistics or its group's)."""
    ranges = []
    for inp in index.act_inputs(node):
        if inp in root_stats and inp in target.roots:
            ranges.append(root_stats[inp].absmax)
        elif inp in member:
            ranges.append(max(root_stats[r].absmax for r in member[inp].roots))
    return ranges
