"""``--overrides FILE``: what the run decides for one tensor or node, set by the user instead.

The file is one JSON (or, named .yaml/.yml, YAML) object keyed by tensor names (a weight initializer or an activation tensor) or
node names, in the spirit of onnxruntime's ``TensorQuantOverrides`` (whose vocabulary it shares:
``quant_type``, ``symmetric``, ``scale``, ``zero_point``, ``rmin``, ``rmax``; a one-element list of
settings, as onnxruntime writes them, is read as that element)::

    {"conv1.weight": {"bits": 8},
     "/head/Softmax_output_0": {"float": true},
     "/stem/Relu_output_0": {"quant_type": "QInt8"},
     "features.4": {"scale": 0.05, "zero_point": 128}}

- ``float: true`` keeps the tensor's producer (or the node, or the weight's layer) float, as
  ``--exclude`` does (``plan/exclusions.py``).
- ``bits`` on a weight (or a node with a weight): that weight's width, 2..8, instead of
  ``--weight-bits``.
- On an activation tensor (or the output of a node without a weight): ``bits`` (8 or 16) and
  ``symmetric`` (signed codes, zero point 0), or ``quant_type`` (QUInt8, QInt8, QUInt16, QInt16),
  choose its coding, calibrated as usual; ``rmin``/``rmax`` fix its range; ``scale`` and
  ``zero_point`` fix its parameters outright. A fixed range or scale is never learned
  (``--learn-act-scales`` leaves it alone). An activation shares one scale with the tensors of its
  group (a Reshape of it, the inputs of a Concat): the override sets the group's.

Every name must be quantized in the run's plan; a name that is not, or a coding the ``--target``
does not read, is a usage error naming it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, FrozenSet, Mapping, Optional, Sequence, Set, Tuple

import onnx

from eptq_onnx.errors import UsageError
from eptq_onnx.plan.exclusions import node_id
from eptq_onnx.plan.qpoints import QuantPlan
from eptq_onnx.plan.targets import ACT_TYPE_NAMES, Target
from eptq_onnx.settings_file import read_object

if TYPE_CHECKING:
    from eptq_onnx.context import RunContext

QUANT_TYPES = {"QUInt8": (8, False), "QInt8": (8, True), "QUInt16": (16, False), "QInt16": (16, True)}
WEIGHT_BITS = range(2, 9)


@dataclass(frozen=True)
class Override:
    """The user's settings for one tensor or node (None: the run decides)."""

    name: str
    float: bool = False
    bits: Optional[int] = None
    symmetric: Optional[bool] = None
    scale: Optional[float] = None
    zero_point: Optional[int] = None
    rmin: Optional[float] = None
    rmax: Optional[float] = None

    @property
    def fixed(self) -> bool:
        """The activation's parameters are set, not calibrated or learned."""
        return self.scale is not None or self.rmin is not None


@dataclass(frozen=True)
class ActOverride:
    """What an activation group takes from an override: its coding and, when fixed, its range or parameters."""

    bits: int
    signed: bool
    source: Override


@dataclass
class ResolvedOverrides:
    """Overrides resolved against a plan: weight name -> bits, activation group id -> its override."""

    weight_bits: Dict[str, int]
    acts: Dict[int, ActOverride]


def _entry(name: str, value: Any) -> Override:
    if isinstance(value, list) and len(value) == 1:  # onnxruntime's form: a list of settings per tensor
        value = value[0]
    if not isinstance(value, Mapping):
        raise UsageError(f"--overrides: {name!r} holds {type(value).__name__}, not an object of settings such as "
                         '{"bits": 8} or {"float": true}')
    known = {f.name for f in fields(Override)} - {"name"} | {"quant_type"}
    unknown = sorted(set(value) - known)
    if unknown:
        raise UsageError(f"--overrides: {name!r} has unknown setting {unknown[0]!r}: use float, bits, symmetric, "
                         "quant_type, scale, zero_point, rmin or rmax")
    settings = dict(value)
    quant_type = settings.pop("quant_type", None)
    if quant_type is not None:
        if quant_type not in QUANT_TYPES:
            raise UsageError(f"--overrides: {name!r} quant_type {quant_type!r}: choose one of {', '.join(QUANT_TYPES)}")
        settings["bits"], settings["symmetric"] = QUANT_TYPES[quant_type]
    try:
        override = Override(name=name, **settings)
    except TypeError as exc:
        raise UsageError(f"--overrides: {name!r}: {exc}") from None
    _check(override)
    return override


def _check(o: Override) -> None:
    def bad(message: str) -> UsageError:
        return UsageError(f"--overrides: {o.name!r} {message}")

    for key in ("bits", "zero_point"):
        value = getattr(o, key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise bad(f"{key} {value!r} must be an integer")
    for key in ("scale", "rmin", "rmax"):
        value = getattr(o, key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)):
            raise bad(f"{key} {value!r} must be a finite number")
    if not isinstance(o.float, bool) or (o.symmetric is not None and not isinstance(o.symmetric, bool)):
        raise bad("float and symmetric take true or false")
    if o.float and any(v is not None for v in (o.bits, o.symmetric, o.scale, o.zero_point, o.rmin, o.rmax)):
        raise bad("is float: it takes no other setting")
    if (o.scale is None) != (o.zero_point is None):
        raise bad("needs both scale and zero_point")
    if o.scale is not None and o.scale <= 0:
        raise bad(f"scale {o.scale} must be positive")
    if (o.rmin is None) != (o.rmax is None) or (o.rmin is not None and o.rmin > o.rmax):  # type: ignore[operator]
        raise bad("needs both rmin and rmax, rmin <= rmax")
    if o.scale is not None and o.rmin is not None:
        raise bad("takes scale/zero_point or rmin/rmax, not both")


def parse_overrides(data: Mapping[str, Any]) -> Tuple[Override, ...]:
    """The overrides of a JSON object {name: settings} (UsageError naming a malformed entry)."""
    if not isinstance(data, Mapping):
        raise UsageError(f"--overrides: the file holds a JSON {type(data).__name__}, not an object "
                         '{"tensor or node name": {"bits": 8}}')
    return tuple(_entry(str(name), value) for name, value in data.items())


def read_overrides(path: Path) -> Tuple[Override, ...]:
    """The overrides of a JSON or YAML (.yaml, .yml) file."""
    return parse_overrides(read_object(path, "--overrides", '{"conv1.weight": {"bits": 8}}'))


def float_names(overrides: Sequence[Override], model: onnx.ModelProto) -> Tuple[str, ...]:
    """The ``--exclude`` patterns of the float overrides: the name itself, or for a weight the nodes reading it."""
    initializers = {t.name for t in model.graph.initializer}
    known = {n.name for n in model.graph.node} | {o for n in model.graph.node for o in n.output}
    names = []
    for o in overrides:
        if not o.float:
            continue
        if o.name in initializers:
            names += [node_id(n) for n in model.graph.node if o.name in n.input]
        elif o.name in known:
            names.append(o.name)
        else:
            raise UsageError(f"--overrides: {o.name!r} is no node, tensor or weight of the model: give a name as the "
                             "model spells it")
    return tuple(names)


def layer_weight_bits(overrides: Sequence[Override], initializers: Set[str], node: onnx.NodeProto,
                      default: int) -> int:
    """The weight width the overrides give ``node`` (by its name or its weight's), else ``default``."""
    names = {node_id(node), *(i for i in node.input if i in initializers)}
    return next((o.bits for o in overrides if o.name in names and _weight_bits_only(o)), default)  # type: ignore[misc]


def fused_layers(run: "RunContext", model: onnx.ModelProto, unfused: FrozenSet[str] = frozenset()
                 ) -> Optional[Callable[[onnx.NodeProto], bool]]:
    """Which weighted nodes the run's target fuses with their output point (build_plan's ``fused_layer``),
    by their weights' width, less the ``unfused`` node names (an equalized block's layer: its point moves
    past its activation); None (every one) under mixed precision, which decides the widths later."""
    if run.target.fusible is None or (run.config.mixed is not None and not unfused):
        return None
    config, initializers = run.config, {t.name for t in model.graph.initializer}

    def fused(node: onnx.NodeProto) -> bool:
        if (node.name or node.output[0]) in unfused:
            return False
        if config.mixed is not None:
            return True
        bits = layer_weight_bits(config.overrides, initializers, node, config.weight_bits)
        return run.target.fuses_layer(bits, node.op_type, config.weight_storage)

    return fused


def _weight_bits_only(o: Override) -> bool:
    """An override that sets a weight's width (bits and nothing of an activation's coding)."""
    return not o.float and o.bits is not None and o.symmetric is None and o.scale is None and o.rmin is None


def max_act_bits(overrides: Sequence[Override], default: int) -> int:
    """The widest activation coding the overrides ask for (the opset must hold it)."""
    return max([default, *(o.bits for o in overrides if o.bits in (16,))])


def resolve(model: onnx.ModelProto, plan: QuantPlan, overrides: Sequence[Override], target: Target,
            act_bits: int, act_symmetric: bool) -> ResolvedOverrides:
    """Each override's weight or activation group in ``plan`` (UsageError naming one that has none, or whose
    coding ``target`` does not read)."""
    resolved = ResolvedOverrides({}, {})
    weight_of_node = {p.node: p.weight for p in plan.weights}
    weights = {p.weight for p in plan.weights}
    group_of = plan.group_of()
    output_of = {node_id(n): n.output[0] for n in model.graph.node if n.output}
    for o in overrides:
        if o.float:
            continue
        weight = o.name if o.name in weights else weight_of_node.get(o.name)
        if weight is not None and _weight_bits_only(o):
            if o.bits not in WEIGHT_BITS:
                raise UsageError(f"--overrides: weight {weight!r} bits {o.bits}: give 2..8")
            resolved.weight_bits[weight] = o.bits
            continue
        tensor = o.name if o.name in group_of else output_of.get(o.name)
        if tensor not in group_of:
            raise UsageError(f"--overrides: {o.name!r} is no weight or activation that this run quantizes (a name as "
                             "the model spells it; tensors kept float by the plan or --exclude take no override)")
        bits = o.bits if o.bits is not None else act_bits
        signed = o.symmetric if o.symmetric is not None else act_symmetric
        if (bits, signed) not in target.act_types:
            readable = ", ".join(ACT_TYPE_NAMES[t] for t in target.act_types)
            raise UsageError(f"--overrides: {o.name!r} asks for {ACT_TYPE_NAMES.get((bits, signed), f'{bits}-bit')} "
                             f"activations, which --target {target.name} does not read ({readable})")
        group = group_of[tensor]  # type: ignore[index]
        if group.id in resolved.acts and resolved.acts[group.id].source != o:
            raise UsageError(f"--overrides: {o.name!r} and {resolved.acts[group.id].source.name!r} share one scale "
                             "(one activation group): give one override for them")
        if o.zero_point is not None:
            qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
            if not qmin <= o.zero_point <= qmax or (signed and o.zero_point != 0):
                raise UsageError(f"--overrides: {o.name!r} zero_point {o.zero_point} does not fit "
                                 f"{ACT_TYPE_NAMES[(bits, signed)]} codes" + (" (symmetric: 0)" if signed else ""))
        resolved.acts[group.id] = ActOverride(bits, signed, o)
    return resolved


def resolve_for_run(run: "RunContext", model: onnx.ModelProto, plan: QuantPlan) -> ResolvedOverrides:
    """The --overrides of the run against its plan, in the report."""
    config = run.config
    resolved = resolve(model, plan, config.overrides, run.target, config.act_bits, config.act_symmetric)
    if resolved.weight_bits and config.mixed is not None:
        raise UsageError("--overrides sets weight bits, which --mixed-precision chooses: drop one of them")
    group_root = {g.id: g.roots[0] for g in plan.groups}
    run.report.overrides = (
        [{"name": o.name, "applied_to": "float (excluded)"} for o in config.overrides if o.float]
        + [{"name": w, "applied_to": "weight", "bits": b} for w, b in resolved.weight_bits.items()]
        + [{"name": a.source.name, "applied_to": f"activation {group_root[i]}", "bits": a.bits, "signed": a.signed,
            "fixed": a.source.fixed} for i, a in resolved.acts.items()])
    return resolved
