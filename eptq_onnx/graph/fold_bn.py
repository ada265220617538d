"""Fold per-channel affine maps into the preceding Conv, ConvTranspose, Gemm or MatMul.

BN(y) = y * s + t with s = gamma / sqrt(var + eps) and t = beta - mean * s, per channel (axis 1
of y). Folding scales the layer's weights along its output-channel axis by s and turns its bias
b into b * s + t. A bias written as a separate Add of a per-channel constant (PaddlePaddle's
export: Conv, then Add of a [1, C, 1, 1] tensor) is the same map with s = 1. The output name of
the BN or Add survives: the folded layer writes it directly.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from eptq_onnx.ops.registry import int_attr
from eptq_onnx.graph.tensor_store import tensor_array
from eptq_onnx.ops.registry import BN_FOLDABLE

_DEFAULT_DOMAINS = ("", "ai.onnx")


@dataclass(frozen=True)
class _Affine:
    """The per-channel affine map of a BatchNormalization: y * scale + shift."""

    scale: np.ndarray
    shift: np.ndarray


class _Graph:
    """Look-ups over a graph's main body, rebuilt after each change."""

    def __init__(self, graph: onnx.GraphProto, ranks: dict[str, int]) -> None:
        self.graph = graph
        self.ranks = ranks
        inputs = {inp.name for inp in graph.input}
        self.constants = {t.name: t for t in graph.initializer if t.name not in inputs}
        self.producers = {name: node for node in graph.node for name in node.output if name}
        self.uses = Counter(_used_names(graph.node))
        self.outputs = {out.name for out in graph.output}

    def constant(self, name: str) -> np.ndarray | None:
        tensor = self.constants.get(name)
        return None if tensor is None else tensor_array(tensor)

    def only_used_by_one(self, name: str) -> bool:
        return self.uses[name] == 1 and name not in self.outputs

    def set_constant(self, node: onnx.NodeProto, position: int, value: np.ndarray) -> None:
        """Make input ``position`` of ``node`` the constant ``value`` (a new initializer if shared)."""
        name = node.input[position] if position < len(node.input) else ""
        if name in self.constants and self.only_used_by_one(name):
            self.constants[name].CopyFrom(numpy_helper.from_array(value, name))
            return
        name = self._fresh_name(f"{node.name or node.output[0]}_bn_folded_{position}")
        self.graph.initializer.append(numpy_helper.from_array(value, name))
        while len(node.input) <= position:
            node.input.append("")
        node.input[position] = name

    def _fresh_name(self, base: str) -> str:
        graph = self.graph
        taken = set(self.uses) | set(self.producers) | {t.name for t in graph.initializer}
        taken |= {v.name for v in graph.input} | self.outputs
        name, count = base, 0
        while name in taken:
            count += 1
            name = f"{base}_{count}"
        return name


def fold_batch_norms(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """Fold every foldable BatchNormalization; returns the new model and the folded BN names.

    A BN folds into a Conv, ConvTranspose (any group), Gemm (constant B and C) or MatMul with
    a constant 2-D B and a 2-D input (it becomes a Gemm) whose output only the BN reads. Other
    BNs stay. A BN without a name is reported by its output name.
    """
    result = onnx.ModelProto()
    result.CopyFrom(model)
    ranks = _tensor_ranks(result)
    folded: list[str] = []
    for output in [n.output[0] for n in result.graph.node if _is_inference_bn(n)]:
        index = _Graph(result.graph, ranks)
        bn = index.producers[output]
        name = bn.name or output
        if _fold(index, bn):
            folded.append(name)
    return result, folded


def fold_bias_adds(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """Fold every Add of a per-channel (or scalar) constant into the layer before it, as its bias;
    returns the new model and the folded Adds' names (output names for unnamed ones).

    The layers are those BatchNormalization folds into, under the same conditions (the layer's output
    read by the Add alone); the constant must be equal along every axis but the output channels."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    ranks = _tensor_ranks(result)
    folded: list[str] = []
    for output in [n.output[0] for n in result.graph.node if n.op_type == "Add" and n.domain in _DEFAULT_DOMAINS]:
        index = _Graph(result.graph, ranks)
        add = index.producers[output]
        for position in (0, 1):
            if _fold(index, add, lambda layer, p=position: _add_affine(index, add, layer, p), position):
                folded.append(add.name or output)
                break
    return result, folded


def _fold(index: _Graph, after: onnx.NodeProto, affine_of: Callable[[onnx.NodeProto], _Affine | None] | None = None,
          position: int = 0) -> bool:
    """Fold ``after`` (a BN, or with ``affine_of`` any per-channel affine op) whose input ``position`` is a layer's output."""
    layer = index.producers.get(after.input[position]) if position < len(after.input) else None
    if layer is None or layer.op_type not in BN_FOLDABLE or layer.domain not in _DEFAULT_DOMAINS:
        return False
    if not index.only_used_by_one(after.input[position]):
        return False
    affine = affine_of(layer) if affine_of is not None else _bn_affine(index, after)
    if affine is None or not _FOLDERS[layer.op_type](index, layer, affine):
        return False
    _bypass(index, layer, after)
    return True


def _add_affine(index: _Graph, add: onnx.NodeProto, layer: onnx.NodeProto, position: int) -> _Affine | None:
    """The Add's constant as a per-channel shift of ``layer``'s output channels, or None when it is not one."""
    if len(add.input) != 2:
        return None
    constant = index.constant(add.input[1 - position])
    weight = index.constant(layer.input[1]) if len(layer.input) > 1 else None
    if constant is None or weight is None or not np.issubdtype(constant.dtype, np.floating):
        return None
    rank, channels = _output_rank_and_channels(index, layer, weight)
    if rank is None or constant.ndim > rank:
        return None
    shape = (1,) * (rank - constant.ndim) + constant.shape
    if any(d != 1 for i, d in enumerate(shape) if i != 1) or shape[1] not in (1, channels):
        return None
    shift = np.broadcast_to(constant.astype(np.float64).reshape(-1), (channels,)).copy()
    return _Affine(np.ones(channels), shift)


def _output_rank_and_channels(index: _Graph, layer: onnx.NodeProto, weight: np.ndarray) -> tuple[int | None, int]:
    """The rank of the layer's output and its number of output channels (on axis 1)."""
    if layer.op_type == "Conv":
        return weight.ndim, weight.shape[0]
    if layer.op_type == "ConvTranspose":
        return weight.ndim, int_attr(layer, "group", 1) * weight.shape[1]
    if weight.ndim != 2:
        return None, 0
    if layer.op_type == "Gemm":
        return 2, weight.shape[0 if int_attr(layer, "transB", 0) else 1]
    return (2 if index.ranks.get(layer.input[0]) == 2 else None), weight.shape[1]


def _is_inference_bn(node: onnx.NodeProto) -> bool:
    if node.op_type != "BatchNormalization" or node.domain not in _DEFAULT_DOMAINS:
        return False
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    extra_outputs = any(node.output[1:])
    return not attrs.get("training_mode", 0) and attrs.get("spatial", 1) == 1 and not extra_outputs


def _bn_affine(index: _Graph, bn: onnx.NodeProto) -> _Affine | None:
    params = [index.constant(name) for name in bn.input[1:5]]
    if len(params) != 4 or any(p is None for p in params) or len({p.size for p in params}) != 1:
        return None
    gamma, beta, mean, var = (p.astype(np.float64).reshape(-1) for p in params)
    epsilon = _float_attr(bn, "epsilon", 1e-5)
    scale = gamma / np.sqrt(var + epsilon)
    return _Affine(scale, beta - mean * scale)


def _bypass(index: _Graph, layer: onnx.NodeProto, bn: onnx.NodeProto) -> None:
    """The layer writes the BN's output; the BN, its input tensor and unused parameters go."""
    graph = index.graph
    hidden, output, params = layer.output[0], bn.output[0], set(bn.input[1:])
    _delete_where(graph.node, lambda node: output in node.output)
    layer.output[0] = output
    _delete_where(graph.value_info, lambda info: info.name == hidden)
    unused = params - set(_used_names(graph.node)) - index.outputs
    _delete_where(graph.initializer, lambda tensor: tensor.name in unused)


def _delete_where(items: Any, predicate: Callable[[Any], bool]) -> None:
    """Delete from a repeated proto field by position (remove() would compare whole messages)."""
    for position in reversed([i for i, item in enumerate(items) if predicate(item)]):
        del items[position]


# ---------------------------------------------------------------- one folder per layer type


def _weight_and_bias(
    index: _Graph, layer: onnx.NodeProto
) -> tuple[np.ndarray, np.ndarray | None] | None:
    """The layer's constant weight (input 1) and optional constant bias (input 2)."""
    weight = index.constant(layer.input[1]) if len(layer.input) > 1 else None
    has_bias = len(layer.input) > 2 and bool(layer.input[2])
    bias = index.constant(layer.input[2]) if has_bias else None
    if weight is None or (has_bias and bias is None):
        return None
    return weight, bias


def _fold_conv(index: _Graph, conv: onnx.NodeProto, affine: _Affine) -> bool:
    """Conv weight [Cout, Cin/g, k...]: output channels on axis 0."""
    found = _weight_and_bias(index, conv)
    if found is None or found[0].shape[0] != affine.scale.size:
        return False
    weight, bias = found
    _write_layer(index, conv, _scale_axis(weight, affine.scale, 0), bias, affine)
    return True


def _fold_conv_transpose(index: _Graph, conv: onnx.NodeProto, affine: _Affine) -> bool:
    """ConvTranspose weight [Cin, Cout/g, k...]: output channel g_idx * (Cout/g) + j."""
    found = _weight_and_bias(index, conv)
    if found is None:
        return False
    weight, bias = found
    group = int_attr(conv, "group", 1)
    cin, cout_per_group = weight.shape[:2]
    if cin % group or group * cout_per_group != affine.scale.size:
        return False
    grouped = weight.reshape(group, cin // group, cout_per_group, *weight.shape[2:])
    scale = affine.scale.reshape(group, 1, cout_per_group, *[1] * (weight.ndim - 2))
    _write_layer(index, conv, (grouped * scale).reshape(weight.shape), bias, affine)
    return True


def _fold_gemm(index: _Graph, gemm: onnx.NodeProto, affine: _Affine) -> bool:
    """Gemm Y = alpha * A @ B + beta * C: output channels on B's N axis (0 if transB)."""
    found = _weight_and_bias(index, gemm)
    if found is None:
        return False
    weight, bias = found
    n_axis = 0 if int_attr(gemm, "transB", 0) else 1
    if weight.ndim != 2 or weight.shape[n_axis] != affine.scale.size:
        return False
    beta = _float_attr(gemm, "beta", 1.0)
    if beta != 1.0:  # the new C is added as is
        bias = None if bias is None else bias * beta
        _set_attr(gemm, "beta", 1.0)
    _write_layer(index, gemm, _scale_axis(weight, affine.scale, n_axis), bias, affine)
    return True


def _fold_matmul(index: _Graph, matmul: onnx.NodeProto, affine: _Affine) -> bool:
    """MatMul [M, K] @ [K, N] (2-D only: BN's channel axis 1 is then N) becomes a Gemm."""
    weight = index.constant(matmul.input[1])
    if weight is None or weight.ndim != 2 or weight.shape[1] != affine.scale.size:
        return False
    if index.ranks.get(matmul.input[0]) != 2:
        return False
    matmul.op_type = "Gemm"
    _write_layer(index, matmul, _scale_axis(weight, affine.scale, 1), None, affine)
    return True


_FOLDERS = {
    "Conv": _fold_conv,
    "ConvTranspose": _fold_conv_transpose,
    "Gemm": _fold_gemm,
    "MatMul": _fold_matmul,
}


def _write_layer(
    index: _Graph, layer: onnx.NodeProto, weight: np.ndarray, bias: np.ndarray | None, affine: _Affine
) -> None:
    """Store the folded weight (input 1) and bias b * s + t (input 2) in the weight's dtype."""
    dtype = index.constants[layer.input[1]].data_type
    np_dtype = onnx.helper.tensor_dtype_to_np_dtype(dtype)
    new_bias = affine.shift if bias is None else bias.astype(np.float64) * affine.scale + affine.shift
    index.set_constant(layer, 1, weight.astype(np_dtype))
    index.set_constant(layer, 2, new_bias.astype(np_dtype))


def _scale_axis(array: np.ndarray, scale: np.ndarray, axis: int) -> np.ndarray:
    shape = [1] * array.ndim
    shape[axis] = -1
    return array.astype(np.float64) * scale.reshape(shape)


# ---------------------------------------------------------------- small helpers


def _float_attr(node: onnx.NodeProto, name: str, default: float) -> float:
    return next((a.f for a in node.attribute if a.name == name), default)


def _set_attr(node: onnx.NodeProto, name: str, value: float) -> None:
    _delete_where(node.attribute, lambda attr: attr.name == name)
    node.attribute.append(onnx.helper.make_attribute(name, value))


def _used_names(nodes: Iterable[onnx.NodeProto]) -> Iterator[str]:
    """Every tensor name the nodes read, subgraph (implicit) inputs included."""
    for node in nodes:
        yield from (name for name in node.input if name)
        for attr in node.attribute:
            subgraphs = [attr.g] if attr.HasField("g") else []
            for subgraph in [*subgraphs, *attr.graphs]:
                yield from _used_names(subgraph.node)
                yield from (out.name for out in subgraph.output)


def _tensor_ranks(model: onnx.ModelProto) -> dict[str, int]:
    """Rank of every tensor whose shape is known or can be inferred."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - best effort: unknown ranks only block MatMul folds
        inferred = model
    graph = inferred.graph
    ranks = {t.name: len(t.dims) for t in graph.initializer}
    for info in [*graph.input, *graph.value_info, *graph.output]:
        tensor_type = info.type.tensor_type
        if tensor_type.HasField("shape"):
            ranks[info.name] = len(tensor_type.shape.dim)
    return ranks
