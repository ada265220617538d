"""Weights left float where the target's runtime would quantize their layer's float input anyway.

On onnxruntime's CPU a MatMul that reads a float activation and a DequantizeLinear weight becomes
MatMulNBits (``ops.registry.ORT_WEIGHT_ONLY_REQUANTIZED``), which quantizes that activation to int8 on
the fly, blockwise: an input the plan leaves float (an excluded node's output, a tensor the fidelity
target or a range rule keeps float) would be quantized all the same, with a dynamic step that one
outlier channel ruins. Such a layer is left float whole: its weight leaves the plan, with the reason
in ``plan.float_ops`` (the report warns about each).
"""
from __future__ import annotations

from dataclasses import replace

from eptq_onnx.ops.registry import ORT_WEIGHT_ONLY_REQUANTIZED
from eptq_onnx.plan.qpoints import QuantPlan
from eptq_onnx.plan.targets import Target

WHY = ("its input stays float, and onnxruntime's CPU would run a quantized weight here as MatMulNBits, which "
       "quantizes that input to int8 on the fly: the layer stays float whole")


def float_weight_only_layers(plan: QuantPlan, target: Target) -> QuantPlan:
    """``plan`` without the weights of the layers ``target``'s runtime would requantize (the module docstring)."""
    if not target.onnxruntime:
        return plan
    quantized = plan.group_of()
    dropped = [p for p in plan.weights
               if p.op_type in ORT_WEIGHT_ONLY_REQUANTIZED and p.input is not None and p.input not in quantized]
    if not dropped:
        return plan
    gone = {id(p) for p in dropped}
    known = {node for node, _, _ in plan.float_ops}
    notes = [(p.node, p.op_type, WHY) for p in dropped if p.node not in known]
    return replace(plan, weights=[p for p in plan.weights if id(p) not in gone], float_ops=[*plan.float_ops, *notes])
