"""A torch.fx twin of a normalized float ONNX model, through onnx2torch 1.5.15 and its quirks.

:func:`to_torch` converts; :func:`onnx_names`, :func:`input_names` and :func:`output_names` map
ONNX tensor names to fx nodes; :func:`with_outputs` returns a view that outputs chosen tensors.
Weighted layers become :mod:`eptq_onnx.twin.modules` modules whose weights are ``nn.Parameter``\\ s
in ONNX layout, ready for quantizers.

What we register in onnx2torch's converter registry (default domain; once per process):

- Weighted ops, replacing onnx2torch's converters (which stay the fallback for a weight that is
  not a float initializer): Conv and ConvTranspose 1/11/22 -> ``ConvOp``, Gemm 9/11/13 ->
  ``GemmOp``, MatMul 1/9/13 -> ``MatMulOp``, Gather 1/11/13 -> ``GatherOp``.
- Our converters for changed or missing semantics: Reduce{Mean,Max,Min,Prod,L1,L2,LogSum,
  LogSumExp,SumSquare} 18, ReduceMax/ReduceMin 20 and ReduceSum 13 (axes input; onnx2torch's
  ReduceSum 13 crashed on empty constant axes with keepdims=0); Pad 11/13/18/19/21/23/24/25
  (onnx2torch's refused reflect/edge pads of 2-D inputs and of the first two axes; axes input;
  wrap mode; negative pads);
  Split 18 (num_outputs); Resize 11/13/18/19 (onnx2torch only matched onnxruntime for some modes;
  ours follows onnxruntime's coordinate and rounding rules, axes, keep_aspect_ratio_policy);
  Clip 11/12/13 (an omitted min); LayerNormalization 17 (onnx2torch read the normalized shape from
  value_info, 0 for symbolic dims); GroupNormalization 18 (per-group scale) and 21 (per-channel);
  RMSNormalization 23; Gelu 20; Mish 18/22; Swish 24; ThresholdedRelu 10/22; GlobalMaxPool 1/22;
  SpaceToDepth 1/13; LSTM and GRU 7/14/22 (float, an explicit loop; onnx2torch has none); CastLike 15/19/21/23/24/25; Reshape 5/13/14/19/21/23/24/25 (onnx2torch
  refused allowzero=1, which the dynamo exporter writes).
- Version aliases (:data:`VERSION_ALIASES`): onnx2torch's converter registered again for newer
  versions that only added types (checked against ``onnx.defs``); AveragePool 19/22 refuses the
  ``dilations`` added at 19.

Every registered version is tested against onnxruntime in tests/test_torch_convert.py.
"""
from __future__ import annotations

import functools
import operator
import warnings
from typing import Callable, NamedTuple, Optional, Sequence

import onnx
import onnx2torch
import torch
from onnx2torch.node_converters import registry
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import OnnxMapping, OperationConverterResult
from torch import Tensor, fx

from eptq_onnx.errors import ModelError
from eptq_onnx.twin.finite_grad import guard_singular_inputs
from eptq_onnx.graph.tensor_store import inlined, store_of, tensor_array

Converter = Callable[[OnnxNode, OnnxGraph], OperationConverterResult]

MAX_OPSET = 26  # onnxruntime 1.31's newest default-domain opset
_DEFAULT_DOMAINS = ("", "ai.onnx")
_ONNX_NAME = "onnx_name"  # fx node meta: the ONNX tensor a placeholder / constant stands for
_ONNX_OUTPUTS = "onnx_outputs"  # fx output node meta: the ONNX names of the returned values


class Alias(NamedTuple):
    """onnx2torch's converter of ``source`` serves ``targets`` too (versions that only added types)."""

    source: int
    targets: tuple[int, ...]
    unit_attrs: tuple[str, ...] = ()  # attributes a target added that must be absent or all 1


TYPES_19_TO_25 = (19, 21, 23, 24, 25)

VERSION_ALIASES: dict[str, Alias] = {
    **{op: Alias(7, (22,)) for op in ("Acos", "Asin", "Atan", "Cos", "Sin", "Tan")},
    **{op: Alias(6, (22,)) for op in ("Elu", "Selu", "HardSigmoid", "InstanceNormalization")},
    **{op: Alias(1, (22,)) for op in ("Softplus", "Softsign", "GlobalAveragePool")},
    "AveragePool": Alias(11, (19, 22), unit_attrs=("dilations",)),
    "Cast": Alias(13, TYPES_19_TO_25),
    "Constant": Alias(13, TYPES_19_TO_25),
    "ConstantOfShape": Alias(9, (20, 21, 23, 24, 25)),
    "Dropout": Alias(13, (22,)),
    "Equal": Alias(13, (19,)),
    "Flatten": Alias(13, (21, 23, 24, 25)),
    "GreaterOrEqual": Alias(12, (16,)),
    "LessOrEqual": Alias(12, (16,)),
    "HardSwish": Alias(14, (22,)),
    "Identity": Alias(16, TYPES_19_TO_25),
    "MaxPool": Alias(12, (22,)),
    "Round": Alias(11, (22,)),
    "Shape": Alias(15, TYPES_19_TO_25),
    "Squeeze": Alias(21, (23, 24, 25)),
    "Transpose": Alias(13, (21, 23, 24, 25)),
    "Unsqueeze": Alias(13, (21, 23, 24, 25)),
}

_OWN: dict[tuple[str, int], Converter] = {}  # (op type, version) -> our converter
ORIGINALS: dict[str, Converter] = {}  # op type -> onnx2torch's converter we replaced (the fallback)
_registered = False


def converts(op_types: str, *versions: int) -> Callable[[Converter], Converter]:
    """Decorator: our converter for each of the space-separated ``op_types`` at ``versions``."""

    def decorate(converter: Converter) -> Converter:
        for op_type in op_types.split():
            _OWN.update({(op_type, version): converter for version in versions})
        return converter

    return decorate


# ---------------------------------------------------------------- registry


def _key(op_type: str, version: int) -> registry.OperationDescription:
    return registry.OperationDescription(domain=onnx.defs.ONNX_DOMAIN, operation_type=op_type, version=version)


def _install(op_type: str, version: int, converter: Converter) -> None:
    """Register ``converter``, replacing (and keeping as the op's fallback) any existing one."""
    original = registry._CONVERTER_REGISTRY.pop(_key(op_type, version), None)  # noqa: SLF001 - no public removal
    if original is not None:
        ORIGINALS.setdefault(op_type, original)
    registry.add_converter(operation_type=op_type, version=version)(converter)


def _unit_attrs_only(converter: Converter, names: tuple[str, ...]) -> Converter:
    """``converter`` that first refuses nodes whose ``names`` attributes are not all 1."""

    @functools.wraps(converter)
    def checked(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
        for name in names:
            value = node.attributes.get(name, 1)
            if any(v != 1 for v in (value if isinstance(value, list) else [value])):
                raise NotImplementedError(f"{node.operation_type} with {name}={value}")
        return converter(node, graph)

    return checked


def register_converters() -> None:
    """Install our converters and version aliases in onnx2torch's registry (idempotent)."""
    global _registered
    if _registered:
        return
    import eptq_onnx.twin.converters  # noqa: F401  (its decorators fill _OWN; it imports this module)

    for (op_type, version), converter in _OWN.items():
        _install(op_type, version, converter)
    for op_type, alias in VERSION_ALIASES.items():
        source = registry._CONVERTER_REGISTRY[_key(op_type, alias.source)]  # noqa: SLF001
        if alias.unit_attrs:
            source = _unit_attrs_only(source, alias.unit_attrs)
        for version in alias.targets:
            _install(op_type, version, source)
    _registered = True


def converter_versions(op_type: str) -> dict[str, list[int]]:
    """Default-domain versions of ``op_type`` by converter: ``ours`` (this module), ``alias``
    (onnx2torch's converter re-registered for newer versions) and ``onnx2torch`` (its own)."""
    register_converters()
    ours = sorted(v for op, v in _OWN if op == op_type)
    alias = sorted(VERSION_ALIASES[op_type].targets) if op_type in VERSION_ALIASES else []
    known = sorted(k.version for k in registry._CONVERTER_REGISTRY  # noqa: SLF001 - no public listing
                   if k.operation_type == op_type and k.domain == onnx.defs.ONNX_DOMAIN)
    return {"ours": ours, "alias": alias, "onnx2torch": [v for v in known if v not in ours and v not in alias]}


def has_converter(domain: str, op_type: str, opset: int) -> bool:
    """Whether onnx2torch (with our registrations) converts this op at this opset of its domain."""
    register_converters()
    try:
        registry.get_converter(operation_type=op_type, version=opset, domain=domain)
    except NotImplementedError:
        return False
    return True


# ---------------------------------------------------------------- conversion


def _unsupported(model: onnx.ModelProto) -> list[str]:
    """'Op (opset N)' for every op type of the main graph that has no converter, in graph order."""
    opsets = {("" if d.domain in _DEFAULT_DOMAINS else d.domain): d.version for d in model.opset_import}
    found: dict[str, None] = {}
    for node in model.graph.node:
        domain = "" if node.domain in _DEFAULT_DOMAINS else node.domain
        opset = opsets.get(domain)
        label = node.op_type if not domain else f"{domain}:{node.op_type}"
        if opset is None:
            found[f"{label} (domain not imported)"] = None
        elif not has_converter(domain, node.op_type, opset):
            found[f"{label} (opset {opset})"] = None
    return list(found)


def _for_onnx2torch(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model as onnx2torch needs it (a copy only when it differs): every graph output comes
    from a node (we return the others ourselves) and the default domain is spelled ''."""
    produced = {name for node in model.graph.node for name in node.output}
    outputs_ok = all(out.name in produced for out in model.graph.output)
    if outputs_ok and all(node.domain != "ai.onnx" for node in model.graph.node):
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for node in copy.graph.node:
        if node.domain == "ai.onnx":
            node.domain = ""
    kept = [out for out in copy.graph.output if out.name in produced]
    del copy.graph.output[:]
    copy.graph.output.extend(kept)
    return copy


def to_torch(model: onnx.ModelProto) -> fx.GraphModule:
    """A torch.fx twin of a normalized float model (eval mode); raises ModelError naming every
    unsupported op type at once, before converting.

    The module takes the ONNX graph inputs in :func:`input_names` order and returns the graph
    outputs in ONNX order (:func:`output_names`): one tensor, or a tuple when there are several.
    """
    register_converters()
    missing = _unsupported(model)
    if missing:
        raise ModelError(
            f"cannot convert to torch: ops {', '.join(missing)}: no converter (onnx2torch + eptq_onnx.twin.convert "
            f"cover the default domain up to opset {MAX_OPSET}, no control flow); replace them or re-export without them"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # a store-backed (large) model's weights come into memory: the twin holds them as parameters
            held = inlined(model) if store_of(model) is not None else model
            gm = onnx2torch.convert(_for_onnx2torch(held), attach_onnx_mapping=True)
            del held
    except Exception as err:  # noqa: BLE001 - converters raise NotImplementedError, KeyError, ValueError, ...
        raise ModelError(f"cannot convert to torch: {' '.join(str(err).split()) or type(err).__name__}") from err
    initializers = {t.name: t for t in model.graph.initializer}
    inputs = [value.name for value in model.graph.input if value.name not in initializers]
    for placeholder, name in zip(_placeholders(gm), inputs):
        placeholder.meta[_ONNX_NAME] = name
    _set_outputs(gm, [out.name for out in model.graph.output], initializers)
    guard_singular_inputs(gm, model, onnx_names(gm))
    return gm.eval()


def _placeholders(gm: fx.GraphModule) -> list[fx.Node]:
    return [node for node in gm.graph.nodes if node.op == "placeholder"]


def _output_node(gm: fx.GraphModule) -> fx.Node:
    return next(node for node in reversed(gm.graph.nodes) if node.op == "output")


def _set_outputs(gm: fx.GraphModule, names: Sequence[str], initializers: dict[str, onnx.TensorProto]) -> None:
    """Make the module return exactly the ONNX graph outputs, in order (duplicates and constants included)."""
    nodes = onnx_names(gm)
    for name in names:
        if name not in nodes and name in initializers:
            nodes[name] = _constant_node(gm, name, torch.from_numpy(tensor_array(initializers[name]).copy()))
    _replace_output(gm.graph, [nodes[name] for name in names], names, always_tuple=False)
    gm.recompile()


def _constant_node(gm: fx.GraphModule, name: str, value: Tensor) -> fx.Node:
    """A buffer holding a constant graph output, and the get_attr node that reads it."""
    target = f"onnx_constant_{sum(1 for _ in gm.buffers())}"
    gm.register_buffer(target, value)
    with gm.graph.inserting_before(_output_node(gm)):
        node = gm.graph.get_attr(target)
    node.meta[_ONNX_NAME] = name
    return node


def _replace_output(graph: fx.Graph, values: list[fx.Node], names: Sequence[str], *, always_tuple: bool) -> None:
    """Give ``graph`` a new output node returning ``values`` (a lone value unwrapped unless ``always_tuple``)."""
    for old in [node for node in graph.nodes if node.op == "output"]:
        graph.erase_node(old)
    new = graph.output(values[0] if len(values) == 1 and not always_tuple else tuple(values))
    new.meta[_ONNX_OUTPUTS] = list(names)


def onnx_names(gm: fx.GraphModule) -> dict[str, fx.Node]:
    """ONNX tensor name -> the fx node that produces it (graph inputs -> placeholders; outputs of
    multi-output nodes -> getitem nodes, created when the graph has none)."""
    names: dict[str, fx.Node] = {}
    created = False
    for node in list(gm.graph.nodes):
        if _ONNX_NAME in node.meta:
            names[node.meta[_ONNX_NAME]] = node
        if node.op != "call_module":
            continue
        mapping: Optional[OnnxMapping] = getattr(gm.get_submodule(node.target), "onnx_mapping", None)
        if mapping is None:
            continue
        if len(mapping.outputs) == 1:
            names[mapping.outputs[0]] = node
            continue
        items = _getitems(node)
        for index, name in enumerate(mapping.outputs):
            if name and index not in items:
                with gm.graph.inserting_after(node):
                    items[index] = gm.graph.call_function(operator.getitem, (node, index))
                created = True
            if name:
                names[name] = items[index]
    if created:
        gm.recompile()
    return names


def _getitems(node: fx.Node) -> dict[int, fx.Node]:
    """The existing ``node[i]`` nodes, by index."""
    items: dict[int, fx.Node] = {}
    for user in node.users:
        if user.op == "call_function" and user.target is operator.getitem and isinstance(user.args[1], int):
            items.setdefault(user.args[1], user)
    return items


def input_names(gm: fx.GraphModule) -> list[str]:
    """The ONNX graph input names, in placeholder (forward argument) order."""
    return [node.meta[_ONNX_NAME] for node in _placeholders(gm)]


def output_names(gm: fx.GraphModule) -> list[str]:
    """The ONNX names of the values the module returns, in order."""
    return list(_output_node(gm).meta[_ONNX_OUTPUTS])


def with_outputs(gm: fx.GraphModule, names: Sequence[str]) -> fx.GraphModule:
    """A GraphModule sharing ``gm``'s modules and parameters whose forward returns the tuple of the
    named ONNX tensors (only what they need is computed)."""
    sources = onnx_names(gm)
    unknown = [name for name in names if name not in sources]
    if unknown:
        raise KeyError(f"no fx node produces {unknown}")
    graph = fx.Graph()
    copies: dict[fx.Node, fx.Node] = {}
    graph.graph_copy(gm.graph, copies)
    _replace_output(graph, [copies[sources[name]] for name in names], names, always_tuple=True)
    view = fx.GraphModule(gm, graph)
    view.graph.eliminate_dead_code()
    view.recompile()
    return view
