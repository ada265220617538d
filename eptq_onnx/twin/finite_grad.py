"""Finite gradients at singular inputs: the twin's Sqrt, Log, Reciprocal, Div and Pow see their
inputs through an identity whose backward pass replaces inf and NaN by 0.

At a point where such an op has no derivative (sqrt or log at an exact 0: silent audio frames in a
power spectrum, a zero-variance channel), backpropagation gives inf, and inf * 0 = NaN further up;
one such element makes the gradient of every layer before it NaN, the Label-Free Hessian trace
non-finite and an optimization step poison the rounding variables. Zero is the gradient the
element then contributes (a subgradient of sqrt and |x| at 0); the forward values are untouched.
"""
from __future__ import annotations

import onnx
import torch
from torch import Tensor, fx

from eptq_onnx.ops.registry import SINGULAR_INPUTS


class _FiniteGradient(torch.autograd.Function):
    """Identity forward; the incoming gradient with inf and NaN replaced by 0."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        return torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)


def finite_gradient(x: Tensor) -> Tensor:
    """``x``, with a backward pass that never sends inf or NaN further up."""
    if not (isinstance(x, Tensor) and x.is_floating_point() and x.requires_grad):
        return x
    return _FiniteGradient.apply(x)


def guard_singular_inputs(gm: fx.GraphModule, model: onnx.ModelProto, nodes: dict) -> int:
    """Route every tensor argument of the fx node of each singular ONNX op (``SINGULAR_INPUTS``) through
    :func:`finite_gradient`; ``nodes`` maps ONNX tensor names to fx nodes. Returns the count guarded."""
    guarded = 0
    for node in model.graph.node:
        if node.op_type not in SINGULAR_INPUTS or not node.output or node.output[0] not in nodes:
            continue
        call = nodes[node.output[0]]
        if call.op not in ("call_module", "call_function", "call_method"):
            continue
        args = []
        for arg in call.args:
            if isinstance(arg, fx.Node) and arg.op != "get_attr":
                with gm.graph.inserting_before(call):
                    arg = gm.graph.call_function(finite_gradient, (arg,))
            args.append(arg)
        call.args = tuple(args)
        guarded += 1
    if guarded:
        gm.recompile()
    return guarded
