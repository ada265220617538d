"""Per-channel weight quantization: step sizes (SPEC step 4) and integer codes."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import numpy as np
import onnx

from eptq_onnx.ops.arithmetic import dequantize
from eptq_onnx.plan.qpoints import QuantPlan
from eptq_onnx.init.quantizers import broadcast_scale, int_range, quantize, weight_scales
from eptq_onnx.plan.targets import TARGETS, Target, integer_kernel_bits
from eptq_onnx.graph.tensor_store import tensor_array


@dataclass
class WeightQuant:
    """A quantized weight: integer codes, per-channel steps, and where the channels lie."""

    name: str
    axis: int
    bits: int
    scale: np.ndarray  # float32 [channels]
    codes: np.ndarray  # integers in the signed ``bits`` range, the weight's shape

    def dequantized(self) -> np.ndarray:
        return dequantize(self.codes, self.scale, 0, self.axis)


def quantize_weight(
    name: str, w: np.ndarray, axis: int, bits: int, method: str, inputs: Optional[np.ndarray] = None,
    per_tensor: bool = False,
) -> WeightQuant:
    """Round-to-nearest codes of ``w`` with MSE (or min-max) per-channel steps.

    With ``inputs`` (the layer's sampled input rows, see ``layer_inputs``) the MSE is that of the
    layer's output rather than of the weight. ``per_tensor``: one step (the weight's MSE over all
    channels), repeated for every channel.
    """
    if per_tensor and w.ndim:
        step = weight_scales(w.reshape(1, -1), 0, bits, method)
        scale = np.full(w.shape[axis], step[0], dtype=np.float32)
    else:
        scale = weight_scales(w, axis, bits, method, inputs)
    qmin, qmax = int_range(bits, signed=True)
    codes = quantize(w, broadcast_scale(scale, w, axis), 0, qmin, qmax).astype(np.int8)
    return WeightQuant(name=name, axis=axis, bits=bits, scale=scale, codes=codes)


def init_weights(
    model: onnx.ModelProto,
    plan: QuantPlan,
    bits: int,
    method: str,
    layer_inputs: Optional[Dict[str, np.ndarray]] = None,
    target: Target = TARGETS["ort-cpu"],
    act_signed: bool = False,
) -> Dict[str, WeightQuant]:
    """Quantize every weight of the plan once (a weight shared by several ops is quantized once).

    ``method``: ``output-mse`` (MSE of each layer's output on ``layer_inputs``, weight MSE for
    layers without samples), ``mse`` (MSE of the weight) or ``minmax``. Ops for which ``target``
    takes no per-channel weights get one step per tensor. Weights that the target's integer kernels
    would saturate take a narrower range (``targets.integer_kernel_bits``; ``act_signed``: int8 activations).
    """
    initializers = {t.name: t for t in model.graph.initializer}
    layer_inputs = layer_inputs if method == "output-mse" else {}
    result: Dict[str, WeightQuant] = {}
    for point in plan.weights:
        if point.weight in result:
            continue
        w = tensor_array(initializers[point.weight]).astype(np.float32, copy=False)
        inputs = (layer_inputs or {}).get(point.weight)
        result[point.weight] = quantize_weight(
            point.weight, w, point.axis, integer_kernel_bits(target, bits, point.op_type, act_signed),
            "minmax" if method == "minmax" else "mse", inputs,
            per_tensor=not target.per_channel(point.op_type),
        )
    return result
