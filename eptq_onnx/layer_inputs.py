"""Samples of what each weighted layer multiplies its weight with, for output-aware step sizes.

For a Conv these are im2col patches (split by group), for a Gemm or a MatMul with a constant
B the rows of its activation input. A few hundred rows per layer, drawn at random from a few
calibration batches, are enough to rank clipping ratios by the error of the layer's output.
Layers of other kinds (ConvTranspose, 3-D convs, MatMul with a constant A, embeddings) get no
samples and fall back to the weight's own squared error.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np
import onnx
import torch
from onnx import helper

from .calib_data import CalibrationSet
from .qpoints import QuantPlan, WeightPoint
from .runtime import make_session, run, tapped_batch_size, with_outputs

DEFAULT_ROWS = 512
DEFAULT_SAMPLES = 64
IMAGES_PER_BATCH = 4  # patches come from the first few images of each batch (im2col is costly)


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _conv_patches(x: np.ndarray, node: onnx.NodeProto, kernel: List[int]) -> Optional[np.ndarray]:
    """im2col patches [positions, groups, Cin/g * prod(kernel)] of a 1-D or 2-D Conv input."""
    attrs = _attrs(node)
    if len(kernel) not in (1, 2) or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID", "NOTSET", "VALID"):
        return None
    if len(kernel) == 1:  # treat as 2-D with height 1
        x, kernel = x[:, :, None, :], [1, kernel[0]]
        pads = attrs.get("pads", [0, 0])
        pads = [0, pads[0], 0, pads[1]]
        strides, dilations = [1] + list(attrs.get("strides", [1])), [1] + list(attrs.get("dilations", [1]))
    else:
        pads = attrs.get("pads", [0, 0, 0, 0])
        strides, dilations = attrs.get("strides", [1, 1]), attrs.get("dilations", [1, 1])
    t = torch.nn.functional.pad(torch.from_numpy(np.ascontiguousarray(x)), (pads[1], pads[3], pads[0], pads[2]))
    cols = torch.nn.functional.unfold(t, kernel, dilation=dilations, stride=strides)  # [N, C*k, L]
    rows = cols.permute(0, 2, 1).reshape(-1, cols.shape[1]).numpy()
    groups = int(attrs.get("group", 1))
    return rows.reshape(rows.shape[0], groups, -1)


def _rows(point: WeightPoint, node: onnx.NodeProto, x: np.ndarray, weight_shape: List[int]) -> Optional[np.ndarray]:
    """The layer's input as [rows, groups, K], or None when the layer kind is not supported."""
    if point.op_type == "Conv":
        return _conv_patches(x[:IMAGES_PER_BATCH], node, weight_shape[2:])
    if point.op_type == "Gemm":
        a = x.T if _attrs(node).get("transA", 0) else x
        return a.reshape(a.shape[0], 1, -1)
    if point.op_type == "MatMul" and len(weight_shape) == 2 and node.input[1] == point.weight:
        return x.reshape(-1, 1, x.shape[-1])
    return None


def collect_layer_inputs(
    model: onnx.ModelProto,
    plan: QuantPlan,
    calib: CalibrationSet,
    samples: int = DEFAULT_SAMPLES,
    rows: int = DEFAULT_ROWS,
    seed: int = 0,
) -> Dict[str, np.ndarray]:
    """Random input rows of every supported weighted layer, keyed by weight name."""
    nodes = {(n.name or n.output[0]): n for n in model.graph.node}
    shapes = {t.name: list(t.dims) for t in model.graph.initializer}
    points = {}
    for p in plan.weights:
        if p.input and p.weight not in points:
            points[p.weight] = p
    if not points:
        return {}
    names = sorted({p.input for p in points.values()})
    session = make_session(with_outputs(model, names))
    rng = np.random.default_rng(seed)
    chunks: Dict[str, List[np.ndarray]] = {w: [] for w in points}
    for feeds in calib.batches(tapped_batch_size(model, names, calib.batch_size), limit=samples):
        values = run(session, feeds, names)
        for weight, p in points.items():
            if chunks[weight] is None:
                continue
            r = _rows(p, nodes[p.node], values[p.input], shapes[weight])
            if r is None:
                chunks[weight] = None  # type: ignore[assignment]
                continue
            pick = rng.choice(len(r), size=min(rows, len(r)), replace=False)
            chunks[weight].append(r[pick].astype(np.float32))
    result = {}
    for weight, parts in chunks.items():
        if parts:
            stacked = np.concatenate(parts)
            keep = rng.choice(len(stacked), size=min(rows, len(stacked)), replace=False)
            result[weight] = stacked[np.sort(keep)]
    return result

