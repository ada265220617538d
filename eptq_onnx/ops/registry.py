"""What eptq-onnx knows about each ONNX op, in one table read by every stage.

An op's ``role`` decides how quantization treats it:

- ``weighted``: a layer with a constant weight input (quantized per channel on ``weight_axis``);
  its output is an activation quantization point, its activation inputs must be quantized.
- ``act_matmul``: MatMul of two activations: both inputs and the output are quantization points.
- ``join``: joins several activations (Add, Concat, Mul of two activations): output is a point.
- ``normalize``: computes new values that are a point of their own (Softmax, LayerNorm, ...).
- ``activation``: a non-linearity; fused with the op before it (the point moves after it).
- ``elementwise``: float math that may be part of a composite activation (GELU, SiLU, ...);
  never a point by itself.
- ``data``: only moves or selects values; its output shares its input's quantization.
- ``float``: left in float; its output is quantized only if a weighted op needs it.

Ops not in the table are treated as ``float`` and listed in the report.

The sets after the table hold the other per-op facts the stages read (recurrent ops, singular
inputs, reductions and roots, layout rules, batch-norm folding, on-grid data ops, onnxruntime's
fusions, low-bit linear ops): every stage takes them from here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import onnx

Role = str  # one of the ROLES below
ROLES = ("weighted", "act_matmul", "join", "normalize", "activation", "elementwise", "data", "float")


def int_attr(node: onnx.NodeProto, name: str, default: int) -> int:
    """The integer attribute ``name`` of ``node``, or ``default`` when it is absent."""
    for a in node.attribute:
        if a.name == name:
            return int(onnx.helper.get_attribute_value(a))
    return default


@dataclass(frozen=True)
class WeightRule:
    """Where a weighted op keeps its weight and bias, and which weight axis is its output channel."""

    weight_input: int
    axis: Callable[[onnx.NodeProto, int], int]  # (node, weight rank) -> channel axis
    bias_input: Optional[int] = None


@dataclass(frozen=True)
class OpInfo:
    role: Role
    weight: Optional[WeightRule] = None
    note: str = ""


def _gemm_axis(node: onnx.NodeProto, rank: int) -> int:
    return 0 if int_attr(node, "transB", 0) else 1


def _matmul_b_axis(node: onnx.NodeProto, rank: int) -> int:
    return rank - 1


CONV_RULE = WeightRule(weight_input=1, axis=lambda n, r: 0, bias_input=2)
CONV_TRANSPOSE_RULE = WeightRule(weight_input=1, axis=lambda n, r: 1, bias_input=2)
GEMM_RULE = WeightRule(weight_input=1, axis=_gemm_axis, bias_input=2)
MATMUL_B_RULE = WeightRule(weight_input=1, axis=_matmul_b_axis)
MATMUL_A_RULE = WeightRule(weight_input=0, axis=lambda n, r: r - 2)
EMBEDDING_RULE = WeightRule(weight_input=0, axis=lambda n, r: 0)

_ACTIVATIONS = (
    "Relu LeakyRelu PRelu Clip Sigmoid HardSigmoid HardSwish Tanh Elu Selu Celu Softplus "
    "Softsign Gelu Mish ThresholdedRelu"
).split()
_ELEMENTWISE = "Erf Exp Log Sqrt Reciprocal Neg Abs Pow Add Sub Mul Div Max Min Sin Cos".split()
_DATA = (
    "Reshape Transpose Flatten Squeeze Unsqueeze Slice Gather MaxPool GlobalMaxPool Resize "
    "Split Pad DepthToSpace SpaceToDepth Expand Tile ReduceMax ReduceMin Identity Dropout"
).split()
_NORMALIZE = (
    "Softmax LogSoftmax LayerNormalization GroupNormalization InstanceNormalization "
    "BatchNormalization LpNormalization"
).split()

OP_TABLE: Dict[str, OpInfo] = {}
OP_TABLE.update({op: OpInfo("activation") for op in _ACTIVATIONS})
OP_TABLE.update({op: OpInfo("elementwise") for op in _ELEMENTWISE})
OP_TABLE.update({op: OpInfo("data", note="shares its input's quantization") for op in _DATA})
DATA_OPS = frozenset(_DATA)  # ops that only move, select or copy their input's values (Pad adds its constant)
OP_TABLE.update({op: OpInfo("normalize") for op in _NORMALIZE})
OP_TABLE.update(
    {
        "Conv": OpInfo("weighted", CONV_RULE, "per-channel weights on axis 0, int32 bias"),
        "ConvTranspose": OpInfo("weighted", CONV_TRANSPOSE_RULE, "per-channel weights on axis 1, int32 bias"),
        "Gemm": OpInfo("weighted", GEMM_RULE, "per-channel weights on the N axis (by transB), int32 bias"),
        "MatMul": OpInfo("weighted", MATMUL_B_RULE, "constant operand: per-channel weights; else act x act"),
        "Sum": OpInfo("join"),
        "Add": OpInfo("elementwise", note="a join when both operands are activations"),
        "Mul": OpInfo("elementwise", note="a join when both operands are activations"),
        "Gather": OpInfo("data", note="a weighted embedding, per row, when the table is constant"),
        "Resize": OpInfo("data", note="nearest mode only; other modes stay float"),
        "Concat": OpInfo("join", note="output is a point; sole-use inputs share its scale"),
        "AveragePool": OpInfo("float"),
        "GlobalAveragePool": OpInfo("float"),
        "ReduceMean": OpInfo("float"),
        "ReduceSum": OpInfo("float"),
    }
)

# Recurrent ops stay float by design (their gates' ranges change every step); they are reported.
RECURRENT = frozenset(("LSTM", "GRU", "RNN"))

# Binary ops that become a join (an activation point) when both operands are activations.
BINARY_JOINS = frozenset(("Add", "Mul", "Sum"))
# Resize shares its input's quantization only in nearest mode.
NEAREST_ONLY = frozenset(("Resize",))

# Inputs at which an op is singular: a value near 0 rounded to 0 there gives inf or NaN, or a huge
# relative error (1/x, the denominator of x/y, log x, sqrt x, x ** p for p < 0 or fractional p).
# No activation quantizer may feed them (singular.py); Pow only for such exponents (singular_inputs).
SINGULAR_INPUTS: Dict[str, Tuple[int, ...]] = {"Reciprocal": (0,), "Div": (1,), "Log": (0,), "Sqrt": (0,), "Pow": (0,)}
# Reductions that compute statistics of an activation over some of its axes (means, sums, norms).
REDUCTIONS = frozenset(("ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL1", "ReduceL2"))
# Ops that compute a root of their input (the signature of a normalization's standard deviation),
# Pow when its exponent is +-0.5.
ROOTS = frozenset(("Sqrt", "ReduceL2"))
ROOT_EXPONENTS = (0.5, -0.5)


def singular_inputs(node: onnx.NodeProto, exponent: Optional[float]) -> Tuple[int, ...]:
    """Positions of the inputs at which ``node`` is singular; ``exponent`` is a Pow's constant scalar
    exponent (None when it is not a constant scalar: treated as singular)."""
    if node.domain not in ("", "ai.onnx"):
        return ()
    if node.op_type == "Pow" and exponent is not None and exponent >= 0 and float(exponent).is_integer():
        return ()
    return SINGULAR_INPUTS.get(node.op_type, ())


def op_info(node: onnx.NodeProto) -> OpInfo:
    """The table entry of a node; unknown ops and other domains are ``float``."""
    if node.domain not in ("", "ai.onnx"):
        return OpInfo("float", note=f"custom domain {node.domain}")
    if node.op_type in RECURRENT:
        return OpInfo("float", note="recurrent: weights and state stay float")
    info = OP_TABLE.get(node.op_type, OpInfo("float", note="not in the op table"))
    if node.op_type in NEAREST_ONLY:
        mode = next((a.s.decode() for a in node.attribute if a.name == "mode"), "nearest")
        if mode != "nearest":
            return OpInfo("float", note="Resize other than nearest")
    return info


def resolve_role(node: onnx.NodeProto, is_activation: Callable[[str], bool]) -> tuple[Role, Optional[WeightRule]]:
    """The role of a node in this graph, given which of its inputs are float activations.

    Roles that depend on the inputs are decided here: MatMul/Gemm/Conv with a constant weight are
    ``weighted`` (else MatMul is ``act_matmul``), Gather from a constant table is ``weighted``
    (an embedding), Add/Mul/Sum of two activations is a ``join``.
    """
    info = op_info(node)
    inputs = list(node.input)
    acts = [bool(name) and is_activation(name) for name in inputs]
    if node.op_type == "MatMul" and info.role == "weighted":
        if len(inputs) == 2 and acts[0] and not acts[1]:
            return "weighted", MATMUL_B_RULE
        if len(inputs) == 2 and acts[1] and not acts[0]:
            return "weighted", MATMUL_A_RULE
        return ("act_matmul", None) if all(acts) else ("float", None)
    if info.role == "weighted":
        w = info.weight
        assert w is not None
        if acts[0] and w.weight_input < len(inputs) and not acts[w.weight_input]:
            return "weighted", w
        return "float", None
    if node.op_type == "Gather":
        if not acts[0] and len(inputs) > 1 and not acts[1]:
            return "weighted", EMBEDDING_RULE
        return ("data", None) if acts[0] else ("float", None)
    if node.op_type in BINARY_JOINS and sum(acts) >= 2:
        return "join", None
    return info.role, None


def is_known(node: onnx.NodeProto) -> bool:
    """Whether the op is in the table (ops outside it stay float and are reported)."""
    return node.domain in ("", "ai.onnx") and node.op_type in OP_TABLE


# --------------------------------------------------------------------------- facts other stages read

# Layout rules (graph/layout.py): ops whose tensors are [N, C, spatial...]
LAYOUT_CHANNELS_FIRST = frozenset((
    "Conv", "ConvTranspose", "ConvInteger", "MaxPool", "AveragePool", "LpPool", "GlobalAveragePool",
    "GlobalMaxPool", "GlobalLpPool", "BatchNormalization", "InstanceNormalization", "GroupNormalization",
    "LRN", "MaxUnpool", "DepthToSpace", "SpaceToDepth", "DeformConv",
))

# ... whose output rows are positions and last axis the channels
LAYOUT_ROW_WISE = frozenset(("MatMul", "Gemm", "MatMulInteger", "FusedMatMul"))

# ... that reshape (axes follow through the shape)
LAYOUT_RESHAPING = frozenset(("Reshape", "Flatten", "Squeeze", "Unsqueeze"))

# ... that reduce axes
LAYOUT_REDUCING = frozenset((
    "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
    "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare",
))

# ... after which the axes cannot be told
LAYOUT_OPAQUE = frozenset(("Einsum", "If", "Loop", "Scan", "Gather", "GatherElements", "GatherND", "ScatterND", "TopK"))

# Ops a following BatchNormalization folds into (graph/fold_bn.py)
BN_FOLDABLE = ("Conv", "ConvTranspose", "Gemm", "MatMul")

# Ops a target with low_bit_ops limited to MatMul/Gemm stores below 8 bits (plan/targets.py)
LOW_BIT_LINEAR = frozenset(("MatMul", "Gemm"))
# onnxruntime's CPU optimizer turns a MatMul of a float input and a DequantizeLinear weight into
# MatMulNBits, which quantizes the float input to int8 on the fly (blockwise, default accuracy level):
# an input left float on purpose (an outlier channel, --exclude) is quantized all the same
ORT_WEIGHT_ONLY_REQUANTIZED = frozenset(("MatMul",))

# Fused integer ops onnxruntime's QDQ transformers produce for Conv, MatMul and Gemm
ORT_FUSED_LINEAR = {"QLinearConv", "QLinearMatMul", "QGemm", "MatMulIntegerToFloat", "ConvInteger", "MatMulInteger"}

# Ops whose QDQ form onnxruntime fuses into ORT_FUSED_LINEAR
LINEAR_OPS = {"Conv", "MatMul", "Gemm"}

# Ops onnxruntime's layout transformers insert around the op that computes a tensor (NHWC, NCHWc)
ORT_LAYOUT_OPS = {"Transpose", "ReorderInput", "ReorderOutput"}

BINARY_MATH = frozenset(("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min"))

LOG_DOMAIN = frozenset(("Log",))  # range-compressing ops: their output is a point

# onnxruntime folds these into the QuantizeLinear after Conv/MatMul/Gemm/Add (ReluQuantFusion,
# ClipQuantFusion); a point after any other non-linearity keeps the op from becoming QLinear*.
ORT_FUSED_ACTIVATIONS = frozenset(("Relu", "Clip"))

# data-movement ops whose outputs hold only values of their input (Pad adds its constant, which
# need not be on the grid)
ON_GRID_OPS = frozenset(op for op in DATA_OPS if op != "Pad")
