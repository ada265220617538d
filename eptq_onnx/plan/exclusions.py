"""Nodes the user keeps float (``--exclude``): matched by name, output tensor, regular expression or op type,
and taken out of the quantization plan, so that every later stage (calibration, mixed precision, EPTQ,
the writer, the report) leaves them alone.

A pattern ``op:TYPE`` matches every node of that op type (``op:Conv``). Any other pattern is first an
exact node name or output tensor name; when no node has that name or output, it is a regular
expression that must match a whole node name or output tensor name (``re.fullmatch``). A pattern that
matches nothing is a usage error.

An excluded node keeps its weights float (its weight point, and its int32 bias, leave the plan) and no
activation point sits on its outputs; a shared-grid tensor after it (a Reshape of its output) that a
quantized layer still reads becomes a root of its own. A point on its inputs stays only where its
values still reach a quantized layer (weighted op or activation x activation MatMul) without passing
through an excluded node, or, with ``quantize_outputs``, where it is a model output; the excluded node
then reads that quantized tensor as its other readers do.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Sequence, Set

import onnx

from eptq_onnx.errors import UsageError
from eptq_onnx.graph.index import GraphIndex
from eptq_onnx.plan.qpoints import ActGroup, QuantPlan, _output_tail, node_roles

OP_PREFIX = "op:"


@dataclass(frozen=True)
class Excluded:
    """One node kept float, and the first pattern that matched it."""

    node: str
    op_type: str
    pattern: str


def node_id(node: onnx.NodeProto) -> str:
    """The name a node goes by in the plan and the report: its name, else its first output."""
    return node.name or node.output[0]


def match_nodes(nodes: Sequence[onnx.NodeProto], pattern: str) -> List[onnx.NodeProto]:
    """The nodes one ``--exclude`` pattern matches (see the module docstring for the rules)."""
    if pattern.startswith(OP_PREFIX):
        return [n for n in nodes if n.op_type == pattern[len(OP_PREFIX):]]
    exact = [n for n in nodes if n.name == pattern or pattern in n.output]
    if exact:
        return exact
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise UsageError(f"--exclude {pattern!r} is no node or tensor name of the model and no valid regular "
                         f"expression ({exc}): check the name or escape the regex") from None
    return [n for n in nodes if (n.name and regex.fullmatch(n.name)) or any(o and regex.fullmatch(o) for o in n.output)]


def find_excluded(model: onnx.ModelProto, patterns: Sequence[str]) -> List[Excluded]:
    """Every node the patterns match, in graph order; UsageError naming a pattern that matches nothing."""
    nodes = list(model.graph.node)
    first: Dict[str, Excluded] = {}
    for pattern in patterns:
        matched = match_nodes(nodes, pattern)
        if not matched:
            raise UsageError(
                f"--exclude {pattern!r} matches no node name, output tensor name or op type of the model: give a "
                "name as the model spells it, a regular expression matching whole names, or op:TYPE such as op:Conv")
        for node in matched:
            first.setdefault(node_id(node), Excluded(node_id(node), node.op_type, pattern))
    order = {node_id(n): i for i, n in enumerate(nodes)}
    return sorted(first.values(), key=lambda e: order[e.node])


def exclude_nodes(model: onnx.ModelProto, plan: QuantPlan, patterns: Sequence[str],
                  quantize_outputs: bool = False) -> QuantPlan:
    """``plan`` without the weights and activation points of the nodes ``patterns`` match (the plan
    itself when there are no patterns); ``plan.excluded`` lists them."""
    if not patterns:
        return plan
    excluded = find_excluded(model, patterns)
    names = {e.node for e in excluded}
    index = GraphIndex(model.graph)
    float_outputs = {o for n in index.nodes if node_id(n) in names for o in n.output if o}
    groups = [g for g in (_without(index, g, float_outputs) for g in plan.groups) if g is not None]
    groups = _needed(index, groups, names, quantize_outputs)
    for i, g in enumerate(groups):
        g.id = i
    return QuantPlan(
        weights=[p for p in plan.weights if p.node not in names],
        groups=groups,
        float_ops=list(plan.float_ops),
        norm_blocks=list(plan.norm_blocks),
        singular_float=list(plan.singular_float),
        excluded=[(e.node, e.op_type, e.pattern) for e in excluded],
    )


def removed_points(model: onnx.ModelProto, plan: QuantPlan, nodes: Sequence[str],
                   quantize_outputs: bool = False) -> List[str]:
    """The plan's points that excluding ``nodes`` takes away (keyed as ``twin_points`` keys them: a weight
    by name, an activation group by its first root): the nodes' own weights and output points, and the
    points on their inputs that no longer reach a quantized layer (a Conv's output point before an
    excluded activation). A group that keeps some of its tensors is not counted."""
    new = exclude_nodes(model, plan, list(nodes), quantize_outputs)
    kept = {p.weight for p in new.weights} | {t for g in new.groups for t in g.tensors}
    weights = [p.weight for p in plan.weights if p.weight not in kept]
    groups = [g.roots[0] for g in plan.groups if not any(t in kept for t in g.tensors)]
    return list(dict.fromkeys([*weights, *groups]))


def _without(index: GraphIndex, group: ActGroup, removed: Set[str]) -> ActGroup | None:
    """``group`` without the ``removed`` tensors; a tensor that shared the grid of a removed one
    (a data op's output) becomes a root. None when nothing is left."""
    tensors = [t for t in group.tensors if t not in removed]
    if not tensors:
        return None
    if len(tensors) == len(group.tensors):
        return ActGroup(group.id, list(group.roots), list(group.tensors), group.reason)
    kept = set(tensors)
    roots = [t for t in tensors if t in group.roots or _source(index, t) not in kept]
    return ActGroup(group.id, roots, [*roots, *(t for t in tensors if t not in roots)], group.reason)


def _source(index: GraphIndex, tensor: str) -> str:
    """The tensor a data op's output takes its values (and grid) from: the op's first input."""
    node = index.producer.get(tensor)
    return node.input[0] if node is not None and node.input else ""


def _needed(index: GraphIndex, groups: List[ActGroup], excluded: Set[str], quantize_outputs: bool) -> List[ActGroup]:
    """The groups with a root whose values still reach a quantized layer, excluded nodes blocking the
    way (the plan's output-tail rule), or, with ``quantize_outputs``, a model output."""
    roles, rules = node_roles(index)
    for node in index.nodes:
        if node_id(node) in excluded:
            roles[node.output[0]] = "float"
            rules.pop(node.output[0], None)
    points = {root: "" for g in groups for root in g.roots}
    dropped = set(_output_tail(index, roles, rules, points, stops=frozenset(excluded), keep_outputs=quantize_outputs))
    return [g for g in groups if any(root not in dropped for root in g.roots)]
