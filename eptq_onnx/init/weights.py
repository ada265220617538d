"""Per-channel weight quantization: step sizes (SPEC step 4) and integer codes."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import numpy as np
import onnx

from eptq_onnx.init.gptq import gptq_weight
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
    rounding: str = "nearest"  # how the codes were chosen at these steps: "nearest" or "gptq" (init/gptq.py)

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
    rounding: str = "nearest",
) -> Dict[str, WeightQuant]:
    """Quantize every weight of the plan once (a weight shared by several ops is quantized once).

    ``method``: ``output-mse`` (MSE of each layer's output on ``layer_inputs``, weight MSE for
    layers without samples), ``mse`` (MSE of the weight) or ``minmax``. Ops for which ``target``
    takes no per-channel weights get one step per tensor. Weights that the target's integer kernels
    would saturate take a narrower range (``targets.integer_kernel_bits``; ``act_signed``: int8 activations).
    ``rounding``: ``nearest``, or ``gptq`` (init/gptq.py) for the layers with ``layer_inputs``.
    """
    initializers = {t.name: t for t in model.graph.initializer}
    rows = layer_inputs or {}
    layer_inputs = layer_inputs if method == "output-mse" else {}
    result: Dict[str, WeightQuant] = {}
    for point in plan.weights:
        if point.weight in result:
            continue
        w = tensor_array(initializers[point.weight]).astype(np.float32, copy=False)
        inputs = (layer_inputs or {}).get(point.weight)
        wq = quantize_weight(
            point.weight, w, point.axis, integer_kernel_bits(target, bits, point.op_type, act_signed),
            "minmax" if method == "minmax" else "mse", inputs,
            per_tensor=not target.per_channel(point.op_type),
        )
        if rounding == "gptq" and point.weight in rows:
            qmin, qmax = int_range(wq.bits, signed=True)
            found = gptq_weight(w, wq.axis, wq.scale, rows[point.weight], qmin, qmax)
            if found is not None:
                wq = WeightQuant(wq.name, wq.axis, wq.bits, wq.scale, found.codes, "gptq")
        result[point.weight] = wq
    return result


# An int32 bias code at most this large: a channel's output accumulates in int32 around its bias
# code, so the code keeps 2**7 of headroom; a weight step floored to reach it rounds only weights
# whose whole contribution is below the bias's own resolution.
BIAS_CODE_LIMIT = 2**24


def fit_int32_biases(
    model: onnx.ModelProto, plan: QuantPlan, weights: Dict[str, WeightQuant], act_scales: Dict[str, float],
) -> tuple[Dict[str, WeightQuant], Dict[str, int]]:
    """Weights whose steps are raised, per channel, until the layer's int32 bias fits BIAS_CODE_LIMIT.

    The int32 bias step is (input step x weight step); a channel of near-zero weights (BatchNorm folded
    with a vanishing gamma: steps of 1e-40) gets a step so small that its bias saturates int32 and is
    lost in the written model. ``act_scales``: the step of each quantized layer input, by tensor name.
    Returns the new weights and, per weight whose steps changed, how many channels were raised.
    """
    initializers = {t.name: t for t in model.graph.initializer}
    floors: Dict[str, np.ndarray] = {}
    for point in plan.weights:
        wq = weights.get(point.weight)
        s_in = act_scales.get(point.input) if point.input else None
        if wq is None or point.bias is None or not s_in or point.bias not in initializers:
            continue
        bias = np.abs(tensor_array(initializers[point.bias]).astype(np.float64)).reshape(-1)
        if bias.shape != wq.scale.shape:
            continue
        need = bias / (s_in * BIAS_CODE_LIMIT)
        floors[point.weight] = np.maximum(floors.get(point.weight, need), need)
    result = dict(weights)
    raised: Dict[str, int] = {}
    for name, floor in floors.items():
        wq = weights[name]
        low = wq.scale.astype(np.float64) < floor
        if not low.any():
            continue
        scale = np.where(low, floor, wq.scale).astype(np.float32)
        w = tensor_array(initializers[name]).astype(np.float32, copy=False)
        qmin, qmax = int_range(wq.bits, signed=True)
        codes = quantize(w, broadcast_scale(scale, w, wq.axis), 0, qmin, qmax).astype(np.int8)
        keep = broadcast_scale(low, w, wq.axis) == 0  # the channels whose step stays keep their codes (GPTQ's)
        codes = np.where(keep, wq.codes, codes).astype(np.int8)
        result[name] = WeightQuant(name=name, axis=wq.axis, bits=wq.bits, scale=scale, codes=codes,
                                   rounding=wq.rounding)
        raised[name] = int(low.sum())
    return result, raised
