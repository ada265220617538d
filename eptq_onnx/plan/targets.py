"""Deployment targets: what each runtime reads in a QDQ model, as data (``--target``).

A :class:`Target` lists the activation codings the runtime accepts, the integer weight types it
reads, which weighted ops may carry per-channel weights and which may hold sub-8-bit weights.
``config`` checks a run's settings against it, ``weights`` gives per-tensor steps where
per-channel is not allowed, ``qdq_writer`` picks storage types and scale shapes from it, and
:func:`violations` checks a written model against every rule (tests run it on the whole zoo).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, FrozenSet, List, Optional, Tuple

import numpy as np
import onnx

from eptq_onnx.graph.tensor_store import tensor_array
from eptq_onnx.ops.registry import LOW_BIT_LINEAR
from eptq_onnx.ops.registry import ORT_FUSED_ACTIVATIONS
from eptq_onnx.plan import u8s8_probe

ActType = Tuple[int, bool]  # (bits, signed)
ACT_TYPE_NAMES = {(8, False): "uint8", (8, True): "int8", (16, False): "uint16", (16, True): "int16"}
WEIGHT_TYPE_BITS = {onnx.TensorProto.INT8: 8, onnx.TensorProto.INT4: 4, onnx.TensorProto.INT2: 2}
ACT_ELEM_TYPES = {onnx.TensorProto.UINT8: (8, False), onnx.TensorProto.INT8: (8, True),
                  onnx.TensorProto.UINT16: (16, False), onnx.TensorProto.INT16: (16, True)}


@dataclass(frozen=True)
class Target:
    """The QDQ conventions of one runtime."""

    name: str
    summary: str
    act_types: Tuple[ActType, ...]  # activation codings the runtime reads; the first is the default
    weight_bits: Tuple[int, ...]  # native integer weight widths it reads (symmetric, zero point 0)
    per_channel_ops: Optional[FrozenSet[str]] = None  # weighted ops allowed per-channel weights (None: all)
    low_bit_ops: Optional[FrozenSet[str]] = None  # weighted ops allowed sub-8-bit weight types (None: all)
    fusible: Optional[FrozenSet[str]] = None  # ops a point may move past (None: any non-linearity, paper A.1)
    # code width of 8-bit weights that the runtime's uint8 x int8 kernels compute without saturating
    # (None: the full 8 bits); see U8S8_GEMM_OPS
    u8s8_weight_bits: Optional[int] = None
    # the runtime is onnxruntime itself: what is written loads and runs with its default session
    # options, and is validated with them (other targets' models are validated with onnxruntime as
    # a stand-in that computes ONNX's semantics)
    onnxruntime: bool = False

    def per_channel(self, op_type: str) -> bool:
        return self.per_channel_ops is None or op_type in self.per_channel_ops

    def storage_bits(self, bits: int, op_type: str, weight_storage: str = "native") -> int:
        """The narrowest weight type this runtime reads for a ``bits``-bit weight of ``op_type``."""
        if weight_storage == "int8" or (self.low_bit_ops is not None and op_type not in self.low_bit_ops):
            return 8
        return min(b for b in self.weight_bits if b >= bits)

    def fuses_layer(self, bits: int, op_type: str, weight_storage: str = "native") -> bool:
        """Whether a layer of ``bits``-bit weights runs as an integer kernel that takes in its output point
        (a ``fusible`` target only: onnxruntime's QLinearConv, QLinearMatMul and QGemm read int8 weights;
        INT4 weights run as DequantizeLinear then the float op, or MatMulNBits)."""
        return self.fusible is not None and self.storage_bits(bits, op_type, weight_storage) == 8

    def default_act_type(self, bits: int) -> Optional[ActType]:
        return next((t for t in self.act_types if t[0] == bits), None)


# onnxruntime's CPU kernels for uint8 activations x int8 weights (QLinearConv, QLinearMatMul, QGemm,
# MatMulIntegerToFloat: MLAS U8S8 GEMM) multiply with vpmaddubsw on AVX2/AVX-512 CPUs without VNNI,
# which adds pairs of products into int16 with saturation: 2 x 255 x 127 overflows, 2 x 255 x 63 does
# not. onnxruntime's own quantizer avoids it with reduce_range (7-bit weights); every Conv takes it,
# those of one input channel (weight [C, 1, k, k]) included, which saturate too. With VNNI, on ARM
# and elsewhere the kernels are exact and the range costs 6 dB of weight SQNR for nothing: a run
# keeps it where onnxruntime on its machine saturates, or as --reduce-range says (with_reduce_range).
U8S8_GEMM_OPS = frozenset(("Conv", "MatMul", "Gemm"))
U8S8_SAFE_WEIGHT_BITS = 7
TARGETS: Dict[str, Target] = {
    t.name: t
    for t in (
        Target("ort-cpu", "onnxruntime CPU: uint8 activations (int8 with --act-symmetric; both fuse), int8 "
               "per-channel weights fused into QLinear ops; 16-bit activations and INT4 weights run as "
               "DequantizeLinear -> float op; "
               "2-bit codes in INT4 (onnxruntime's QDQ fusions refuse INT2 with default session options)",
               act_types=((8, False), (8, True), (16, False), (16, True)), weight_bits=(8, 4),
               fusible=ORT_FUSED_ACTIVATIONS,
               u8s8_weight_bits=U8S8_SAFE_WEIGHT_BITS, onnxruntime=True),
        Target("trt", "TensorRT: symmetric int8 activations and weights (zero point 0, no uint8); "
               "INT4 weights only on MatMul/Gemm (weight-only GEMMs), other layers INT8",
               act_types=((8, True),), weight_bits=(8, 4), low_bit_ops=LOW_BIT_LINEAR),
        Target("qnn", "Qualcomm QNN: uint8/uint16 activations, int8/int4 weights, per-channel only on "
               "Conv/ConvTranspose, per-tensor MatMul/Gemm weights",
               act_types=((8, False), (16, False)), weight_bits=(8, 4),
               per_channel_ops=frozenset(("Conv", "ConvTranspose"))),
        Target("generic", "any ONNX runtime: every QDQ type ONNX defines (uint8/int8/uint16/int16 activations, "
               "INT8/INT4/INT2 weights, per-channel everywhere)",
               act_types=((8, False), (8, True), (16, False), (16, True)), weight_bits=(8, 4, 2)),
    )
}
DEFAULT_TARGET = "ort-cpu"


def integer_kernel_bits(target: Target, bits: int, op_type: str, act_signed: bool) -> int:
    """The code width of a ``bits``-bit weight of ``op_type`` that ``target``'s integer kernels compute exactly.

    8-bit weights that the runtime fuses with uint8 activations into a U8S8 GEMM take the target's
    ``u8s8_weight_bits`` range (see U8S8_GEMM_OPS); every other weight keeps ``bits``.
    """
    if target.u8s8_weight_bits is not None and bits == 8 and not act_signed and op_type in U8S8_GEMM_OPS:
        return target.u8s8_weight_bits
    return bits


def with_reduce_range(target: Target, reduce_range: Optional[bool]) -> Target:
    """``target`` with its U8S8 weight range (``u8s8_weight_bits``) kept (True) or lifted (False);
    None keeps it where onnxruntime's CPU kernels on this machine saturate (plan/u8s8_probe.py)."""
    if target.u8s8_weight_bits is None:
        return target
    if reduce_range is None:
        reduce_range = u8s8_probe.u8s8_saturates()
    return target if reduce_range else replace(target, u8s8_weight_bits=None)


def get_target(name: str) -> Target:
    """The target called ``name`` (a UsageError names the choices otherwise)."""
    from eptq_onnx.errors import UsageError

    if name not in TARGETS:
        raise UsageError(f"--target {name} is unknown: choose one of {', '.join(TARGETS)}")
    return TARGETS[name]


# ------------------------------------------------------------------ checking a written model


def _weight_consumers(graph: onnx.GraphProto) -> Dict[str, List[str]]:
    """DequantizeLinear output -> op types reading it."""
    readers: Dict[str, List[str]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node.op_type)
    return readers


def violations(model: onnx.ModelProto, target: Target) -> List[str]:
    """Every place where a QDQ model breaks one of ``target``'s rules (empty: it complies).

    Activations: each QuantizeLinear's type is one the target reads; symmetric codings have zero
    point 0. Weights (DequantizeLinear of an integer initializer read by a weighted op): a type
    the target reads for that op, zero point 0, per-channel scales only where allowed.
    """
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    readers = _weight_consumers(graph)
    found: List[str] = []
    for node in graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] not in inits:
            zp = inits[node.input[2]]
            act = ACT_ELEM_TYPES.get(zp.data_type)
            if act not in target.act_types:
                found.append(f"activation {node.input[0]}: {ACT_TYPE_NAMES.get(act, zp.data_type)} not read by {target.name}")
            elif act[1] and np.any(tensor_array(zp) != 0):
                found.append(f"activation {node.input[0]}: signed with a non-zero zero point")
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits:
            continue
        codes, scale, zp = (inits[n] for n in node.input[:3])
        ops = [op for op in readers.get(node.output[0], []) if op not in ("QuantizeLinear",)]
        if codes.data_type == onnx.TensorProto.INT32:
            continue  # biases: int32 in every runtime
        bits = WEIGHT_TYPE_BITS.get(codes.data_type)
        for op in ops:
            if bits is None or bits not in target.weight_bits or target.storage_bits(bits, op) > bits:
                found.append(f"weight {node.input[0]} of {op}: {onnx.TensorProto.DataType.Name(codes.data_type)} "
                             f"not read by {target.name} for {op}")
            if int(np.prod(scale.dims)) > 1 and not target.per_channel(op):
                found.append(f"weight {node.input[0]} of {op}: per-channel, {target.name} takes per-tensor")
        if np.any(tensor_array(zp).astype(np.int64) != 0):
            found.append(f"weight {node.input[0]}: non-zero zero point")
    return found
