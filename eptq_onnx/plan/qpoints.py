"""Quantization points: which weights and which activation tensors get quantized (paper A.1).

Weights: every weighted op (Conv, ConvTranspose, Gemm, MatMul with a constant operand, Gather
from a constant table), per channel on the op's output-channel axis.

Activations, per tensor: the model's float inputs; the outputs of weighted ops, activation x
activation MatMuls, joins (Add/Concat/Mul of activations), normalizations and non-linearities,
where a non-linearity (or a composite one such as GELU or SiLU made of elementwise ops) is
fused with the op before it: the point moves after it. Ops that only move data share their
input's quantization. Any float tensor a weighted op reads is a point too (e.g. after a
GlobalAveragePool). The model's outputs, and every point whose values reach only them (the graph's
tail after its last quantized layer), stay float unless ``quantize_outputs``.

Normalization statistics stay float: a decomposed LayerNorm/RMSNorm/GroupNorm/InstanceNorm
(norm_blocks.py) is quantized as its fused op, with a point on its normalized output and none
inside; and no point is placed where its rounding only reaches a singular op (singular.py:
Reciprocal, a Div denominator, Log, Sqrt, negative or fractional Pow).

The result is a ``QuantPlan``; tensors that share one set of parameters form an ``ActGroup``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, FrozenSet, List, Optional, Set, Tuple

import onnx

from eptq_onnx.plan.norm_blocks import NormBlock, find_norm_blocks
from eptq_onnx.ops.registry import RECURRENT, WeightRule, is_known, op_info, resolve_role
from eptq_onnx.plan.singular import singular_feeders
from eptq_onnx.graph.index import GraphIndex
from eptq_onnx.plan.composites import before_blocks, composite_of_root, composites, fuse_forward
from eptq_onnx.ops.registry import LOG_DOMAIN

OUTPUT_ROLES = frozenset(("weighted", "act_matmul", "join", "normalize", "activation"))


@dataclass
class WeightPoint:
    """A constant weight quantized per channel, and the op that reads it."""

    node: str
    op_type: str
    weight: str
    axis: int
    input: Optional[str] = None  # the op's activation input (its scale sets the bias scale)
    bias: Optional[str] = None  # a 1-D constant bias stored as int32


@dataclass
class ActGroup:
    """Activation tensors that share one scale and zero point.

    ``roots`` are the tensors whose values set the range (calibrated); ``tensors`` are all the
    tensors that get a QuantizeLinear/DequantizeLinear pair (roots first, then the outputs of
    data-movement ops that share their input's grid).
    """

    id: int
    roots: List[str]
    tensors: List[str]
    reason: str


@dataclass
class QuantPlan:
    weights: List[WeightPoint] = field(default_factory=list)
    groups: List[ActGroup] = field(default_factory=list)
    float_ops: List[Tuple[str, str, str]] = field(default_factory=list)  # (node, op_type, why)
    norm_blocks: List[NormBlock] = field(default_factory=list)  # decomposed normalizations (internals float)
    singular_float: List[str] = field(default_factory=list)  # would-be points that feed a singular op
    excluded: List[Tuple[str, str, str]] = field(default_factory=list)  # kept float by the user: (node, op_type, pattern)

    def group_of(self) -> Dict[str, ActGroup]:
        """Map from every quantized activation tensor to its group."""
        return {t: g for g in self.groups for t in g.tensors}


def _data_root(index: GraphIndex, tensor: str, roles: Dict[str, str]) -> str:
    """Walk back through data-movement ops to the tensor that holds the actual values."""
    while True:
        node = index.producer.get(tensor)
        if node is None or roles.get(node.output[0]) != "data" or not node.input:
            return tensor
        src = node.input[0]
        if not index.is_activation(src):
            return tensor
        tensor = src


def node_roles(index: GraphIndex) -> Tuple[Dict[str, str], Dict[str, WeightRule]]:
    """Role of every node (keyed by its first output) and the weight rule of weighted ones."""
    roles: Dict[str, str] = {}
    rules: Dict[str, WeightRule] = {}
    for node in index.nodes:
        role, rule = resolve_role(node, index.is_activation)
        if role == "weighted":
            assert rule is not None
            w = node.input[rule.weight_input]
            if not index.is_float_constant(w):
                role = "float"
            else:
                rules[node.output[0]] = rule
        roles[node.output[0]] = role
    return roles, rules


def build_plan(model: onnx.ModelProto, quantize_outputs: bool = False,
               fusible: Optional[FrozenSet[str]] = None,
               fused_layer: Optional[Callable[[onnx.NodeProto], bool]] = None) -> QuantPlan:
    """Find the weight and activation quantization points of a normalized float model.

    ``fusible``: the only op types the point after a Conv/ConvTranspose/Gemm/MatMul may move
    past (a target whose runtime fuses such an op into an integer kernel only when its output
    point follows it or one of these directly); other points move as in the paper.
    ``fused_layer``: which weighted nodes the runtime fuses at all (None: every one); the point
    after one it does not fuse (e.g. 4-bit weights that onnxruntime's CPU runs as
    DequantizeLinear then the float op) moves as in the paper, there is no kernel to keep.
    """
    index = GraphIndex(model.graph)
    roles, rules = node_roles(index)
    exits, internal = composites(index, roles)
    composite_root = composite_of_root(index, exits)
    plan = QuantPlan(norm_blocks=find_norm_blocks(index))
    block_of = {b.output: b for b in plan.norm_blocks}
    in_blocks = {t for b in plan.norm_blocks for t in b.internal}
    block_nodes = {n for b in plan.norm_blocks for n in b.nodes}
    singular = singular_feeders(index, roles)

    points: Dict[str, str] = {}  # tensor -> reason (ordered by discovery)
    absorbed: Set[str] = set(internal) | in_blocks

    def add_point(tensor: str, reason: str, restricted: bool = False) -> None:
        chain = fuse_forward(index, tensor, composite_root)
        if restricted and fusible is not None and chain[-1] not in index.outputs:
            chain = fuse_forward(index, tensor, composite_root, fusible)  # a last layer keeps its float output
        chain = before_blocks(chain, in_blocks)
        if chain[-1] in singular:
            # e.g. a variance before Sqrt, a power before Log: the point sits after the singular op
            if chain[-1] not in plan.singular_float:
                plan.singular_float.append(chain[-1])
            return
        absorbed.update(chain[:-1])
        if chain[-1] not in points:
            points[chain[-1]] = reason if len(chain) == 1 else f"{reason} (fused)"

    for name in index.inputs:
        if index.is_activation(name) and name in singular:
            plan.singular_float.append(name)
        elif index.is_activation(name):
            points[name] = "model input"
    for node in index.nodes:
        role = roles[node.output[0]]
        out = node.output[0]
        if out in block_of:
            add_point(out, f"{block_of[out].kind} (decomposed) output")
        elif role in OUTPUT_ROLES or out in exits or node.op_type in LOG_DOMAIN:
            if index.is_activation(out) and out not in absorbed:
                fused = role == "act_matmul" or (role == "weighted" and (fused_layer is None or fused_layer(node)))
                add_point(out, f"{node.op_type} output", restricted=fused)
        if (node.name or out) in block_nodes:
            continue  # a recognized normalization's ops are accounted for by its block
        if not is_known(node) and any(index.is_activation(o) or index.untyped(o) for o in node.output):
            why = op_info(node).note or "not in the op table"
            plan.float_ops.append((node.name or out, node.op_type, why))
        elif op_info(node).role == "weighted" and role == "float" and any(index.untyped(i) for i in node.input):
            plan.float_ops.append((node.name or out, node.op_type, "reads a tensor of unknown type: shape inference does not know the op producing it"))
    # inputs of weighted ops and activation x activation MatMuls must be quantized
    for node in index.nodes:
        role = roles[node.output[0]]
        if role not in ("weighted", "act_matmul"):
            continue
        rule = rules.get(node.output[0])
        for pos, inp in enumerate(node.input):
            if rule is not None and pos in (rule.weight_input, rule.bias_input):
                continue
            if index.is_activation(inp):
                root = _data_root(index, inp, roles)
                if root not in points:
                    add_point(root, f"input of {node.op_type}")
    if not quantize_outputs:
        for name in _output_tail(index, roles, rules, points):
            del points[name]
    else:
        for name in index.outputs:
            if index.is_activation(name) and _data_root(index, name, roles) not in points:
                points[_data_root(index, name, roles)] = "model output"

    plan.groups = _share_and_merge(index, roles, points)
    plan.weights = _weight_points(index, rules)
    return plan


def _quantized_readers(index: GraphIndex, roles: Dict[str, str], rules: Dict[str, WeightRule], tensor: str) -> bool:
    """Whether a weighted op or an activation x activation MatMul reads ``tensor`` as an activation input."""
    for node in index.consumers.get(tensor, []):
        role = roles.get(node.output[0])
        rule = rules.get(node.output[0])
        if role == "act_matmul" or (role == "weighted" and any(
                name == tensor and pos not in (rule.weight_input, rule.bias_input)
                for pos, name in enumerate(node.input) if rule is not None)):
            return True
    return False


def _output_tail(index: GraphIndex, roles: Dict[str, str], rules: Dict[str, WeightRule], points: Dict[str, str],
                 stops: FrozenSet[str] = frozenset(), keep_outputs: bool = False) -> List[str]:
    """The points whose values reach only model outputs: no weighted op or activation x activation
    MatMul reads them or anything computed from them, except through another point that is needed.

    Such a point would round what the user reads (box pixels, class probabilities, logits) and
    gain no integer kernel, so the tail of the graph after the last quantized layer stays float
    (a detector's decode and output Concat, a classifier's Softmax). A recurrent op (LSTM/GRU/RNN,
    float by design) ends the walk: a point that only feeds its input or state is not needed either
    (rounded state carried through every time step costs fidelity and gains no kernel). Decided from
    the graph's last points back to its first. The walk does not pass the nodes named in ``stops``
    (nodes the user keeps float); with ``keep_outputs`` a model output counts as a quantized reader.
    """
    order = {o: i for i, n in enumerate(index.nodes) for o in n.output}
    needed: Dict[str, bool] = {}
    for point in sorted(points, key=lambda t: order.get(t, -1), reverse=True):
        stack, seen, found = [point], {point}, False
        while stack and not found:
            t = stack.pop()
            if _quantized_readers(index, roles, rules, t) or (keep_outputs and t in index.outputs):
                found = True
                break
            for node in index.consumers.get(t, []):
                if node.op_type in RECURRENT or (node.name or node.output[0]) in stops:
                    continue  # a recurrent op stays float: its input and state points feed no integer kernel
                for out in node.output:
                    if not out or out in seen:
                        continue
                    seen.add(out)
                    if out in points:
                        found = found or needed.get(out, True)
                    else:
                        stack.append(out)
        needed[point] = found
    return [t for t in points if not needed[t]]


def _share_and_merge(index: GraphIndex, roles: Dict[str, str], points: Dict[str, str]) -> List[ActGroup]:
    """Make one group per point, extend groups through data ops, merge sole-use Concat inputs."""
    groups: Dict[str, ActGroup] = {}
    for i, (tensor, reason) in enumerate(points.items()):
        groups[tensor] = ActGroup(id=i, roots=[tensor], tensors=[tensor], reason=reason)
    member: Dict[str, ActGroup] = {t: g for t, g in groups.items()}
    for node in index.nodes:
        if roles[node.output[0]] != "data" or not node.input:
            continue
        g = member.get(node.input[0])
        if g is None:
            continue
        for out in node.output:
            if index.is_activation(out) and out not in member:
                g.tensors.append(out)
                member[out] = g
    for node in index.nodes:
        if node.op_type != "Concat" or node.output[0] not in groups:
            continue
        target = groups[node.output[0]]
        for inp in index.act_inputs(node):
            g = member.get(inp)
            sole_use = len(index.consumers.get(inp, [])) == 1 and inp not in index.outputs
            if g is not None and g is not target and g.tensors == [inp] and sole_use:
                target.roots.append(inp)
                target.tensors.append(inp)
                member[inp] = target
                del groups[inp]
    ordered = sorted(groups.values(), key=lambda g: g.id)
    for i, g in enumerate(ordered):
        g.id = i
    return ordered


def _weight_points(index: GraphIndex, rules: Dict[str, WeightRule]) -> List[WeightPoint]:
    result = []
    for node in index.nodes:
        rule = rules.get(node.output[0])
        if rule is None:
            continue
        weight = node.input[rule.weight_input]
        rank = len(index.constants[weight].dims)
        bias = None
        if rule.bias_input is not None and len(node.input) > rule.bias_input:
            b = node.input[rule.bias_input]
            if index.is_float_constant(b) and len(index.constants[b].dims) == 1:
                bias = b
        act = next((i for p, i in enumerate(node.input) if p != rule.weight_input and index.is_activation(i)), None)
        result.append(
            WeightPoint(
                node=node.name or node.output[0],
                op_type=node.op_type,
                weight=weight,
                axis=rule.axis(node, rank) if rank > 0 else 0,
                input=act,
                bias=bias,
            )
        )
    return result
