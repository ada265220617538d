"""auto_pad SAME_UPPER / SAME_LOWER written as explicit pads where the padding does not depend on the input.

TensorFlow exporters write ``auto_pad="SAME_UPPER"`` on convolutions and pools; onnxruntime runs it,
but torch (and so the differentiable twin) has no such padding mode. With static spatial dims the
padding ONNX means is fixed: output ``ceil(in / stride)``, total padding
``max(0, (out - 1) * stride + (k - 1) * dilation + 1 - in)``, the odd pixel at the end (SAME_UPPER)
or at the beginning (SAME_LOWER). Along a dim of stride 1 that is ``(k - 1) * dilation`` whatever the
size, so a dynamic dim is fine there; a node with a dynamic dim of another stride, or an input of
unknown rank, keeps its attribute.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import onnx
from onnx import helper

SAME_PADDED_OPS = frozenset({"Conv", "MaxPool", "AveragePool", "LpPool"})


def make_pads_explicit(graph: onnx.GraphProto) -> int:
    """Rewrite every SAME_* auto_pad of ``graph`` whose padding is fixed by its input shape; returns how many."""
    shapes = _known_shapes(graph)
    rewritten = 0
    for node in graph.node:
        if node.op_type not in SAME_PADDED_OPS or node.domain not in ("", "ai.onnx"):
            continue
        attrs = {a.name: a for a in node.attribute}
        mode = attrs["auto_pad"].s.decode() if "auto_pad" in attrs else "NOTSET"
        if mode not in ("SAME_UPPER", "SAME_LOWER"):
            continue
        spatial = _spatial_dims(shapes.get(node.input[0]))
        kernel = _kernel(node, attrs, shapes)
        if spatial is None or kernel is None or len(kernel) != len(spatial):
            continue
        strides = _ints(attrs, "strides", [1] * len(spatial))
        dilations = _ints(attrs, "dilations", [1] * len(spatial))
        if any(size is None and stride != 1 for size, stride in zip(spatial, strides)):
            continue
        pads = same_pads(spatial, kernel, strides, dilations, upper=mode == "SAME_UPPER")
        keep = [a for a in node.attribute if a.name not in ("auto_pad", "pads")]
        del node.attribute[:]
        node.attribute.extend(keep + [helper.make_attribute("pads", pads)])
        rewritten += 1
    return rewritten


def same_pads(
    spatial: Sequence[Optional[int]], kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int], upper: bool
) -> list[int]:
    """ONNX ``pads`` (all begins, then all ends) equal to SAME_UPPER (``upper``) or SAME_LOWER; a size
    may be None (dynamic) where the stride is 1."""
    begins, ends = [], []
    for size, k, stride, dilation in zip(spatial, kernel, strides, dilations):
        if size is None:
            assert stride == 1, "a dynamic dim needs stride 1"
            total = (k - 1) * dilation
        else:
            total = max(0, (math.ceil(size / stride) - 1) * stride + (k - 1) * dilation + 1 - size)
        small, large = total // 2, total - total // 2
        begins.append(small if upper else large)
        ends.append(large if upper else small)
    return begins + ends


def _known_shapes(graph: onnx.GraphProto) -> dict[str, list[Optional[int]]]:
    """Tensor name -> dims (None where dynamic), for every tensor of known rank."""
    shapes: dict[str, list[Optional[int]]] = {init.name: list(init.dims) for init in graph.initializer}
    for info in [*graph.input, *graph.value_info, *graph.output]:
        tensor = info.type.tensor_type
        if tensor.HasField("shape"):
            shapes[info.name] = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
    return shapes


def _spatial_dims(shape: Optional[list[Optional[int]]]) -> Optional[list[Optional[int]]]:
    """The spatial sizes (None where dynamic), or None when the rank is unknown."""
    if shape is None or len(shape) < 3:
        return None
    return [int(d) if d is not None and d > 0 else None for d in shape[2:]]


def _kernel(node: onnx.NodeProto, attrs: dict, shapes: dict) -> Optional[list[int]]:
    if "kernel_shape" in attrs:
        return list(attrs["kernel_shape"].ints)
    if node.op_type == "Conv" and len(node.input) > 1:
        weight = shapes.get(node.input[1])
        if weight is not None and len(weight) > 2 and all(d for d in weight[2:]):
            return [int(d) for d in weight[2:]]
    return None


def _ints(attrs: dict, name: str, default: list[int]) -> list[int]:
    return list(attrs[name].ints) if name in attrs else default
