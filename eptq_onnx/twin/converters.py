"""Our converters of ONNX ops to torch, registered in onnx2torch's registry by
``convert.register_converters``: the weighted ops become the twin's WeightedOps, the others modules
that compute what onnxruntime computes."""
from __future__ import annotations

import functools
from typing import Callable, Optional
import torch
import torch.nn.functional as F
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import OnnxMapping, OperationConverterResult, onnx_mapping_from_node
from torch import Tensor
from eptq_onnx.twin import modules as ops
from eptq_onnx.twin.recurrent import RecurrentOp
from eptq_onnx.twin.resize import ResizeOp
from eptq_onnx.twin.weighted import ConvOp, GatherOp, GemmOp, MatMulOp, WeightedOp
from eptq_onnx.twin.convert import ORIGINALS, TYPES_19_TO_25, converts
from eptq_onnx.plan.exclusions import node_id


# ---------------------------------------------------------------- weighted ops


def _given(node: OnnxNode, index: Optional[int]) -> bool:
    return index is not None and index < len(node.input_values) and node.input_values[index] != ""


def _float_initializer(node: OnnxNode, graph: OnnxGraph, index: int) -> Optional[Tensor]:
    name = node.input_values[index] if _given(node, index) else ""
    if name not in graph.initializers:
        return None
    value = graph.initializers[name].to_torch()
    return value if value.is_floating_point() else None


WeightedBuilder = Callable[[Tensor, str, Optional[Tensor], Optional[str]], WeightedOp]


def _weighted(node: OnnxNode, graph: OnnxGraph, weight_index: int, bias_index: Optional[int],
              build: WeightedBuilder) -> OperationConverterResult:
    """A WeightedOp on the node's other inputs, or onnx2torch's converter when weight/bias are not constant."""
    weight = _float_initializer(node, graph, weight_index)
    has_bias = _given(node, bias_index)
    bias = _float_initializer(node, graph, bias_index) if has_bias else None  # type: ignore[arg-type]
    if weight is None or (has_bias and bias is None):
        return ORIGINALS[node.operation_type](node, graph)
    names = node.input_values
    module = build(weight, names[weight_index], bias, names[bias_index] if has_bias else None)  # type: ignore[index]
    module.node = node_id(node.proto)
    rest = tuple(name for i, name in enumerate(names) if i not in (weight_index, bias_index))
    return OperationConverterResult(module, OnnxMapping(inputs=rest, outputs=node.output_values))


@converts("Conv ConvTranspose", 1, 11, 22)
def _conv(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    a = node.attributes
    attrs = dict(
        transpose=node.operation_type == "ConvTranspose", strides=a.get("strides"), dilations=a.get("dilations"),
        group=a.get("group", 1), pads=a.get("pads"), auto_pad=a.get("auto_pad", "NOTSET"),
        output_padding=a.get("output_padding"), output_shape=a.get("output_shape"),
    )
    return _weighted(node, graph, 1, 2, lambda w, wn, b, bn: ConvOp(w, wn, b, bn, **attrs))


@converts("Gemm", 9, 11, 13)
def _gemm(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    a = node.attributes
    attrs = dict(alpha=a.get("alpha", 1.0), beta=a.get("beta", 1.0), trans_a=bool(a.get("transA", 0)),
                 trans_b=bool(a.get("transB", 0)))
    return _weighted(node, graph, 1, 2, lambda w, wn, b, bn: GemmOp(w, wn, b, bn, **attrs))


@converts("MatMul", 1, 9, 13)
def _matmul(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    index = 1 if _float_initializer(node, graph, 1) is not None else 0
    return _weighted(node, graph, index, None, lambda w, wn, b, bn: MatMulOp(w, wn, weight_input=index))


@converts("Gather", 1, 11, 13)
def _gather(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    axis = node.attributes.get("axis", 0)
    return _weighted(node, graph, 0, None, lambda w, wn, b, bn: GatherOp(w, wn, axis=axis))


# ---------------------------------------------------------------- other ops


def _module(node: OnnxNode, module: torch.nn.Module) -> OperationConverterResult:
    """``module`` fed with all the node's inputs (initializers arrive as buffers)."""
    return OperationConverterResult(module, onnx_mapping_from_node(node))


@converts(" ".join(op for op in ops.REDUCE_OPS if op != "ReduceSum"), 18)
@converts("ReduceSum", 13)
@converts("ReduceMax ReduceMin", 20)
def _reduce(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    a = node.attributes
    return _module(node, ops.ReduceOp(node.operation_type, bool(a.get("keepdims", 1)),
                                      bool(a.get("noop_with_empty_axes", 0))))


@converts("Pad", 11, 13, 18, *TYPES_19_TO_25)
def _pad(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    return _module(node, ops.PadOp(node.attributes.get("mode", "constant")))


@converts("Split", 18)
def _split(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    a = node.attributes
    return _module(node, ops.SplitOp(a.get("axis", 0), a.get("num_outputs", len(node.output_values))))


@converts("Resize", 11, 13, 18, 19)
def _resize(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    a = node.attributes
    mode = a.get("mode", "nearest")
    if a.get("antialias", 0) and mode != "nearest":
        raise NotImplementedError("Resize with antialias")
    return _module(node, ResizeOp(
        mode, a.get("coordinate_transformation_mode", "half_pixel"), a.get("nearest_mode", "round_prefer_floor"),
        a.get("cubic_coeff_a", -0.75), bool(a.get("exclude_outside", 0)), a.get("axes"),
        a.get("keep_aspect_ratio_policy", "stretch"),
    ))


@converts("Clip", 11, 12, 13)
def _clip(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    return _module(node, ops.ClipOp())


@converts("LayerNormalization", 17)
@converts("RMSNormalization", 23)
def _layer_norm(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    if any(node.output_values[1:]):
        raise NotImplementedError("LayerNormalization with Mean/InvStdDev outputs")
    a = node.attributes
    rms = node.operation_type == "RMSNormalization"
    return _module(node, ops.LayerNormOp(a.get("axis", -1), a.get("epsilon", 1e-5), rms=rms))


def _group_norm(node: OnnxNode, graph: OnnxGraph, per_group_affine: bool) -> OperationConverterResult:
    a = node.attributes
    return _module(node, ops.GroupNormOp(a["num_groups"], a.get("epsilon", 1e-5), per_group_affine))


converts("GroupNormalization", 18)(functools.partial(_group_norm, per_group_affine=True))
converts("GroupNormalization", 21)(functools.partial(_group_norm, per_group_affine=False))


_FUNCTIONAL: dict[str, Callable[[OnnxNode], ops.Functional]] = {
    "Gelu": lambda n: ops.Functional(F.gelu, approximate=n.attributes.get("approximate", "none")),
    "Mish": lambda n: ops.Functional(F.mish),
    "Swish": lambda n: ops.Functional(ops.swish, alpha=n.attributes.get("alpha", 1.0)),
    "ThresholdedRelu": lambda n: ops.Functional(F.threshold, threshold=n.attributes.get("alpha", 1.0), value=0.0),
    "GlobalMaxPool": lambda n: ops.Functional(ops.global_max_pool),
    "SpaceToDepth": lambda n: ops.Functional(ops.space_to_depth, blocksize=n.attributes["blocksize"]),
    "CastLike": lambda n: ops.Functional(ops.cast_like),
    "Reshape": lambda n: ops.Functional(ops.reshape, allowzero=bool(n.attributes.get("allowzero", 0))),
}


@converts("Gelu", 20)
@converts("Mish", 18, 22)
@converts("Swish", 24)
@converts("ThresholdedRelu", 10, 22)
@converts("GlobalMaxPool", 1, 22)
@converts("SpaceToDepth", 1, 13)
@converts("CastLike", 15, *TYPES_19_TO_25)
@converts("Reshape", 5, 13, 14, *TYPES_19_TO_25)
def _functional(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    return _module(node, _FUNCTIONAL[node.operation_type](node))


_RECURRENT_DEFAULTS = {"LSTM": [b"Sigmoid", b"Tanh", b"Tanh"], "GRU": [b"Sigmoid", b"Tanh"]}


@converts("LSTM GRU", 7, 14, 22)
def _recurrent(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    """LSTM/GRU with default activations, layout 0, no clip, no peepholes, no input_forget (else refused)."""
    a = node.attributes
    kind = node.operation_type
    activations = [x.encode() if isinstance(x, str) else x for x in a.get("activations", [])]
    per_direction = _RECURRENT_DEFAULTS[kind]
    if activations and activations not in (per_direction, per_direction * 2):
        raise NotImplementedError(f"{kind} with activations {activations}")
    if a.get("clip") is not None or a.get("input_forget", 0) or _given(node, 7):
        raise NotImplementedError(f"{kind} with clip, input_forget or peepholes")
    if a.get("layout", 0):
        raise NotImplementedError(f"{kind} with layout 1 (onnxruntime's CPU kernels refuse it too)")
    module = RecurrentOp(kind, int(a["hidden_size"]), _text(a.get("direction", "forward")),
                             bool(a.get("linear_before_reset", 0)), outputs=len(node.output_values))
    return _module(node, module)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
