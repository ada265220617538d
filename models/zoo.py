"""Small deterministic test models, each returned as an ``onnx.ModelProto`` runnable by onnxruntime CPU.

Torch-built models go through :func:`exported`; the ``*_style`` / ``helper_*`` models are hand-built with
``onnx.helper`` to mimic other converters (tf2onnx, paddle2onnx, old hand-written graphs).
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

MAX_ORT_IR_VERSION = 13  # onnxruntime 1.31 rejects the IR version 14 that onnx 1.23 writes by default
MIN_DYNAMO_OPSET = 18  # the dynamo exporter has no translations below 18 (down-conversion is slow and often fails)
DEFAULT_DYNAMIC_DIM = 32  # size sample_inputs gives to symbolic non-batch dims
FALLBACK_INT_HIGH = 10  # exclusive upper bound for integer inputs whose range can't be inferred

__all__ = [
    "ZOO",
    "BasicBlock",
    "DepthwiseBlock",
    "ResidualCNN",
    "conv_bn",
    "dynamic_spatial_cnn",
    "exported",
    "finalize",
    "helper_opset11",
    "mlp",
    "mlp_mixer_block",
    "multi_input",
    "nhwc_tf_style",
    "paddle_style",
    "residual_cnn",
    "sample_inputs",
    "token_model",
    "transformer_block",
    "transformer_block_decomposed",
]


# ----------------------------------------------------------------------------------------------------------
# Generic helpers
# ----------------------------------------------------------------------------------------------------------


def finalize(model: onnx.ModelProto) -> onnx.ModelProto:
    """Pin the IR version to the lowest one the opsets need (onnxruntime-loadable) and check the model."""
    min_ir = helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    model.ir_version = min(min_ir, MAX_ORT_IR_VERSION)
    onnx.checker.check_model(model)
    return model


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch inside the block without disturbing the caller's global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _perturb_norms(module: nn.Module) -> None:
    """Give BatchNorm/LayerNorm non-trivial statistics and affine params, so that folding them matters."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)) and m.weight is not None:
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 2.0)


def _export_legacy(
    module: nn.Module, args: tuple[torch.Tensor, ...], opset: int, names: tuple[list[str], list[str]],
    axes: dict[str, dict[int, str]],
) -> onnx.ModelProto:
    buffer = io.BytesIO()
    # PRESERVE (with the module already in eval mode) skips the eval peephole pass that would fuse
    # BatchNorm into the preceding Conv; the quantizer is supposed to do that folding itself.
    torch.onnx.export(
        module, args, buffer, dynamo=False, opset_version=opset, input_names=names[0], output_names=names[1],
        dynamic_axes=axes or None, training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=True,
    )
    return onnx.load_from_string(buffer.getvalue())


def _export_dynamo(
    module: nn.Module, args: tuple[torch.Tensor, ...], opset: int, names: tuple[list[str], list[str]],
    axes: dict[str, dict[int, str]],
) -> onnx.ModelProto:
    dims = {label: torch.export.Dim(label) for per_input in axes.values() for label in per_input.values()}
    shapes = tuple({i: dims[label] for i, label in axes.get(name, {}).items()} or None for name in names[0])
    program = torch.onnx.export(
        module, args, dynamo=True, opset_version=max(opset, MIN_DYNAMO_OPSET), input_names=names[0],
        output_names=names[1], dynamic_shapes=shapes if axes else None, verbose=False,
    )
    return program.model_proto


def exported(
    module: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    *,
    opset: int,
    dynamo: bool = False,
    dynamic_batch: bool = True,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_axes: Mapping[str, Mapping[int, str]] | None = None,
) -> onnx.ModelProto:
    """Export an eval-mode torch module to ONNX (legacy TorchScript exporter or dynamo) and finalize it.

    ``dynamic_batch`` makes dim 0 of every input and output symbolic ("N"); ``dynamic_axes`` adds more
    symbolic dims (same label = same dim). The legacy exporter keeps BatchNorm as its own node; the dynamo
    exporter (onnxscript optimizer) folds it into the Conv and always emits opset >= ``MIN_DYNAMO_OPSET``.
    """
    module.eval()
    axes: dict[str, dict[int, str]] = (
        {name: {0: "N"} for name in (*input_names, *output_names)} if dynamic_batch else {}
    )
    for name, extra in (dynamic_axes or {}).items():
        axes.setdefault(name, {}).update(extra)
    export = _export_dynamo if dynamo else _export_legacy
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # legacy-exporter deprecation and constant-folding advice
        model = export(module, tuple(example_inputs), opset, (list(input_names), list(output_names)), axes)
    return finalize(model)


def _batch(dynamic_batch: bool) -> int:
    """Example batch size: 2 when dynamic (a batch of 1 would be specialised by torch.export), else 1."""
    return 2 if dynamic_batch else 1


# ----------------------------------------------------------------------------------------------------------
# Torch building blocks (also used by models/build_demo.py)
# ----------------------------------------------------------------------------------------------------------


def conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """Bias-free Conv2d ("same" padding) followed by BatchNorm2d."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    )


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv-BN with identity shortcut, ReLU after the add."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_bn(channels, channels, 3), nn.ReLU(), conv_bn(channels, channels, 3))
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.body(x))


class DepthwiseBlock(nn.Module):
    """Depthwise 3x3 conv-BN-ReLU6 then pointwise 1x1 conv-BN, with a strided 1x1 conv-BN projection shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 2) -> None:
        super().__init__()
        self.body = nn.Sequential(
            conv_bn(cin, cin, 3, stride, groups=cin), nn.ReLU6(), conv_bn(cin, cout, 1)
        )
        self.proj = conv_bn(cin, cout, 1, stride)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.proj(x) + self.body(x))


class ResidualCNN(nn.Module):
    """Stem conv-BN-ReLU, basic block, strided conv-BN-ReLU, depthwise block (stride 2), GAP, Linear."""

    def __init__(self, in_channels: int, widths: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        w0, w1, w2 = widths
        self.features = nn.Sequential(
            conv_bn(in_channels, w0, 3),
            nn.ReLU(),
            BasicBlock(w0),
            conv_bn(w0, w1, 3, stride=2),
            nn.ReLU(),
            DepthwiseBlock(w1, w2, stride=2),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(w2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.features(x)), 1))


def _ffn(dim: int, hidden: int) -> nn.Sequential:
    """Linear-GELU(exact erf)-Linear."""
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class _SelfAttention(nn.Module):
    """Multi-head self-attention with explicit Q/K/V projections and activation x activation MatMuls."""

    def __init__(self, tokens: int, dim: int, heads: int) -> None:
        super().__init__()
        self.tokens, self.dim, self.heads, self.head_dim = tokens, dim, heads, dim // heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))

    def _split(self, y: torch.Tensor) -> torch.Tensor:
        return y.reshape(-1, self.tokens, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(self.q(x)), self._split(self.k(x)), self._split(self.v(x))
        attn = torch.softmax((q @ k.transpose(-2, -1)) * self.scale, dim=-1)
        merged = (attn @ v).transpose(1, 2).reshape(-1, self.tokens, self.dim)
        return self.out(merged)


class _TransformerBlock(nn.Module):
    """Pre-norm transformer encoder block."""

    def __init__(self, tokens: int, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = _SelfAttention(tokens, dim, heads)
        self.mlp = _ffn(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class _MixerBlock(nn.Module):
    """MLP-Mixer block (token-mixing + channel MLPs) followed by mean over tokens and a Linear head."""

    def __init__(self, tokens: int, dim: int, num_classes: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.token_mlp = _ffn(tokens, 2 * tokens)
        self.channel_mlp = _ffn(dim, 2 * dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.token_mlp(self.ln1(x).transpose(1, 2)).transpose(1, 2)
        x = x + self.channel_mlp(self.ln2(x))
        return self.head(x.mean(dim=1))


class _MultiInput(nn.Module):
    """Conv branch on an image + MLP branch on a feature vector, concatenated into a shared embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
        self.embed = nn.Linear(8 + 16, 16)
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(16, 4))

    def forward(self, image: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = self.embed(torch.cat([self.conv(image), self.mlp(features)], dim=1))
        return self.head(embedding), embedding


class _TokenModel(nn.Module):
    """Embedding lookup, mean over the sequence, Linear."""

    def __init__(self, vocab: int, dim: int, num_classes: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embedding(ids).mean(dim=1))


# ----------------------------------------------------------------------------------------------------------
# Torch-exported builders
# ----------------------------------------------------------------------------------------------------------


def residual_cnn(opset: int = 13, dynamic_batch: bool = True, *, dynamo: bool = False) -> onnx.ModelProto:
    """Residual CNN on [N,3,32,32] with unfolded BatchNorm, a depthwise block and a Gemm head."""
    with _seeded(0):
        net = ResidualCNN(3, (8, 16, 32), 10)
        _perturb_norms(net)
        x = torch.randn(_batch(dynamic_batch), 3, 32, 32)
    return exported(
        net, (x,), opset=opset, dynamo=dynamo, dynamic_batch=dynamic_batch,
        input_names=["input"], output_names=["logits"],
    )


def resnet50(opset: int = 13) -> onnx.ModelProto:
    """torchvision's ResNet-50 (random weights, BatchNorm unfolded) on [N,3,224,224]: the scale benchmark's model."""
    from torchvision.models import resnet50 as torchvision_resnet50

    with _seeded(0):
        net = torchvision_resnet50(weights=None)
        _perturb_norms(net)
        x = torch.randn(2, 3, 224, 224)
    return exported(net, (x,), opset=opset, input_names=["input"], output_names=["logits"])


def _transformer(opset: int, dynamo: bool, tokens: int = 16, dim: int = 32, heads: int = 2, hidden: int = 64) -> onnx.ModelProto:
    with _seeded(1):
        net = _TransformerBlock(tokens=tokens, dim=dim, heads=heads, hidden=hidden)
        _perturb_norms(net)
        x = torch.randn(2, tokens, dim)
    return exported(net, (x,), opset=opset, dynamo=dynamo, input_names=["tokens"], output_names=["output"])


def transformer_block(opset: int = 17, *, dynamo: bool = False) -> onnx.ModelProto:
    """Pre-norm transformer block on [N,16,32]; opset >= 17 keeps LayerNorm as one LayerNormalization op."""
    return _transformer(opset, dynamo)


def vit_tiny_block() -> onnx.ModelProto:
    """The same block at ViT-Tiny's width (dim 192, 3 heads, MLP 768) on [N,65,192] (8x8 patches and a
    class token): tools/bench.py's step cost at a realistic layer size (not in ZOO: too slow for tests)."""
    return _transformer(17, dynamo=False, tokens=65, dim=192, heads=3, hidden=768)


def transformer_block_decomposed() -> onnx.ModelProto:
    """Same block at opset 13, where LayerNorm is decomposed (ReduceMean/Sub/Pow/Sqrt/Div/Mul/Add)."""
    return _transformer(13, dynamo=False)


def mlp_mixer_block(opset: int = 17, *, dynamo: bool = False) -> onnx.ModelProto:
    """MLP-Mixer block on [N,16,32] (tokens x channels) with a mean-over-tokens Linear head."""
    with _seeded(2):
        net = _MixerBlock(tokens=16, dim=32, num_classes=10)
        _perturb_norms(net)
        x = torch.randn(2, 16, 32)
    return exported(net, (x,), opset=opset, dynamo=dynamo, input_names=["tokens"], output_names=["logits"])


def mlp(dynamic_batch: bool = True, *, opset: int = 13, dynamo: bool = False) -> onnx.ModelProto:
    """64 -> 128 -> 64 -> 10 MLP with ReLU (Gemm nodes)."""
    with _seeded(3):
        net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))
        x = torch.randn(_batch(dynamic_batch), 64)
    return exported(
        net, (x,), opset=opset, dynamo=dynamo, dynamic_batch=dynamic_batch,
        input_names=["input"], output_names=["logits"],
    )


def multi_input(opset: int = 13, *, dynamo: bool = False) -> onnx.ModelProto:
    """Inputs "image" [N,3,16,16] and "features" [N,8]; outputs "logits" [N,4] and "embedding" [N,16]."""
    with _seeded(4):
        net = _MultiInput()
        image, features = torch.randn(2, 3, 16, 16), torch.randn(2, 8)
    return exported(
        net, (image, features), opset=opset, dynamo=dynamo,
        input_names=["image", "features"], output_names=["logits", "embedding"],
    )


def token_model(opset: int = 13, *, dynamo: bool = False) -> onnx.ModelProto:
    """int64 token ids [N,12] -> embedding Gather (vocab 100) -> mean -> Linear to 4 classes."""
    with _seeded(5):
        net = _TokenModel(vocab=100, dim=16, num_classes=4)
        ids = torch.randint(0, 100, (2, 12), dtype=torch.int64)
    return exported(net, (ids,), opset=opset, dynamo=dynamo, input_names=["ids"], output_names=["logits"])


def dynamic_spatial_cnn(opset: int = 13, *, dynamo: bool = False) -> onnx.ModelProto:
    """Conv net on [N,3,H,W] (batch and spatial dims symbolic), global average pool, Linear."""
    with _seeded(6):
        net = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5),
        )
        x = torch.randn(2, 3, 24, 20)
    return exported(
        net, (x,), opset=opset, dynamo=dynamo, input_names=["input"], output_names=["logits"],
        dynamic_axes={"input": {2: "H", 3: "W"}},
    )


# ----------------------------------------------------------------------------------------------------------
# Hand-built (onnx.helper) builders
# ----------------------------------------------------------------------------------------------------------


def _weights(rng: np.random.Generator, *shape: int, fan_in: int | None = None) -> np.ndarray:
    """He-style random float32 weights."""
    scale = math.sqrt(2.0 / (fan_in or int(np.prod(shape[1:])) or 1))
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _graph_model(
    name: str,
    nodes: Sequence[onnx.NodeProto],
    inputs: Sequence[onnx.ValueInfoProto],
    outputs: Sequence[onnx.ValueInfoProto],
    initializers: Mapping[str, np.ndarray],
    opset: int,
    producer: str,
) -> onnx.ModelProto:
    graph = helper.make_graph(
        list(nodes), name, list(inputs), list(outputs),
        initializer=[numpy_helper.from_array(v, k) for k, v in initializers.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name=producer)
    return finalize(model)


def _float_io(name: str, shape: Sequence[int | str]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


def nhwc_tf_style() -> onnx.ModelProto:
    """tf2onnx-like NHWC graph: Transpose -> Conv -> Relu -> depthwise Conv -> Relu -> Transpose -> ReduceMean
    -> MatMul + Add -> Softmax; tensor names carry TF ":0" suffixes."""
    rng = np.random.default_rng(7)
    c = 8
    inits = {
        "model/conv1/Conv2D/ReadVariableOp:0": _weights(rng, c, 3, 3, 3),
        "model/conv1/BiasAdd/ReadVariableOp:0": (rng.standard_normal(c) * 0.1).astype(np.float32),
        "model/dw/depthwise/ReadVariableOp:0": _weights(rng, c, 1, 3, 3),
        "model/dw/BiasAdd/ReadVariableOp:0": (rng.standard_normal(c) * 0.1).astype(np.float32),
        "model/dense/MatMul/ReadVariableOp:0": _weights(rng, c, 10, fan_in=c),
        "model/dense/BiasAdd/ReadVariableOp:0": (rng.standard_normal(10) * 0.1).astype(np.float32),
    }
    w = list(inits)
    nodes = [
        helper.make_node("Transpose", ["input:0"], ["model/nchw:0"], "model/to_nchw", perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["model/nchw:0", w[0], w[1]], ["model/conv1/BiasAdd:0"], "model/conv1",
                         kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1]),
        helper.make_node("Relu", ["model/conv1/BiasAdd:0"], ["model/conv1/Relu:0"], "model/conv1/Relu"),
        helper.make_node("Conv", ["model/conv1/Relu:0", w[2], w[3]], ["model/dw/BiasAdd:0"], "model/dw",
                         kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2], group=c),
        helper.make_node("Relu", ["model/dw/BiasAdd:0"], ["model/dw/Relu:0"], "model/dw/Relu"),
        helper.make_node("Transpose", ["model/dw/Relu:0"], ["model/nhwc:0"], "model/to_nhwc", perm=[0, 2, 3, 1]),
        helper.make_node("ReduceMean", ["model/nhwc:0"], ["model/gap/Mean:0"], "model/gap/Mean",
                         axes=[1, 2], keepdims=0),
        helper.make_node("MatMul", ["model/gap/Mean:0", w[4]], ["model/dense/MatMul:0"], "model/dense/MatMul"),
        helper.make_node("Add", ["model/dense/MatMul:0", w[5]], ["model/dense/BiasAdd:0"], "model/dense/BiasAdd"),
        helper.make_node("Softmax", ["model/dense/BiasAdd:0"], ["Identity:0"], "model/dense/Softmax", axis=-1),
    ]
    return _graph_model(
        "tf2onnx", nodes, [_float_io("input:0", ["N", 32, 32, 3])], [_float_io("Identity:0", ["N", 10])],
        inits, opset=13, producer="tf2onnx",
    )


def helper_opset11() -> onnx.ModelProto:
    """Opset-11 Conv + BatchNormalization + Relu + MaxPool + Flatten + Gemm(transB=1) on [N,3,16,16]."""
    rng = np.random.default_rng(8)
    c = 8
    inits = {
        "conv.weight": _weights(rng, c, 3, 3, 3),
        "conv.bias": (rng.standard_normal(c) * 0.1).astype(np.float32),
        "bn.scale": rng.uniform(0.5, 1.5, c).astype(np.float32),
        "bn.bias": rng.uniform(-0.2, 0.2, c).astype(np.float32),
        "bn.mean": rng.uniform(-0.3, 0.3, c).astype(np.float32),
        "bn.var": rng.uniform(0.5, 2.0, c).astype(np.float32),
        "fc.weight": _weights(rng, 10, c * 8 * 8),
        "fc.bias": (rng.standard_normal(10) * 0.1).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["input", "conv.weight", "conv.bias"], ["conv"], "conv",
                         kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["conv", "bn.scale", "bn.bias", "bn.mean", "bn.var"], ["bn"], "bn",
                         epsilon=1e-5),
        helper.make_node("Relu", ["bn"], ["relu"], "relu"),
        helper.make_node("MaxPool", ["relu"], ["pool"], "pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["pool"], ["flat"], "flatten", axis=1),
        helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["output"], "fc", transB=1),
    ]
    return _graph_model(
        "helper_opset11", nodes, [_float_io("input", ["N", 3, 16, 16])], [_float_io("output", ["N", 10])],
        inits, opset=11, producer="onnx.helper",
    )


def _constant(name: str, value: np.ndarray) -> onnx.NodeProto:
    """A Constant node producing tensor ``name``."""
    return helper.make_node("Constant", [], [name], f"{name}_const", value=numpy_helper.from_array(value, name))


def paddle_style() -> onnx.ModelProto:
    """paddle2onnx-like opset-11 graph: all weights in Constant nodes, Conv -> Relu, then a runtime shape
    subgraph (Shape -> Gather -> Unsqueeze -> Concat) feeding the Reshape before a MatMul + Add."""
    rng = np.random.default_rng(9)
    c, hw = 4, 16
    consts = {
        "conv2d_0.w_0": _weights(rng, c, 3, 3, 3),
        "conv2d_0.b_0": (rng.standard_normal(c) * 0.1).astype(np.float32),
        "fill_constant_0.tmp_0": np.array([c * hw * hw], dtype=np.int64),
        "linear_0.w_0": _weights(rng, c * hw * hw, 10),
        "linear_0.b_0": (rng.standard_normal(10) * 0.1).astype(np.float32),
    }
    nodes = [_constant(k, v) for k, v in consts.items()] + [
        helper.make_node("Conv", ["x", "conv2d_0.w_0", "conv2d_0.b_0"], ["conv2d_0.tmp_1"], "conv2d_0",
                         kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv2d_0.tmp_1"], ["relu_0.tmp_0"], "relu_0"),
        helper.make_node("Shape", ["relu_0.tmp_0"], ["shape_0.tmp_0"], "shape_0"),
        _constant("gather_0.index", np.array(0, dtype=np.int64)),
        helper.make_node("Gather", ["shape_0.tmp_0", "gather_0.index"], ["gather_0.tmp_0"], "gather_0", axis=0),
        helper.make_node("Unsqueeze", ["gather_0.tmp_0"], ["unsqueeze_0.tmp_0"], "unsqueeze_0", axes=[0]),
        helper.make_node("Concat", ["unsqueeze_0.tmp_0", "fill_constant_0.tmp_0"], ["concat_0.tmp_0"], "concat_0",
                         axis=0),
        helper.make_node("Reshape", ["relu_0.tmp_0", "concat_0.tmp_0"], ["reshape_0.tmp_0"], "reshape_0"),
        helper.make_node("MatMul", ["reshape_0.tmp_0", "linear_0.w_0"], ["linear_0.tmp_0"], "linear_0"),
        helper.make_node("Add", ["linear_0.tmp_0", "linear_0.b_0"], ["save_infer_model/scale_0.tmp_0"],
                         "linear_0.add"),
    ]
    return _graph_model(
        "paddle", nodes, [_float_io("x", ["N", 3, hw, hw])], [_float_io("save_infer_model/scale_0.tmp_0", ["N", 10])],
        {}, opset=11, producer="PaddlePaddle",
    )


# ----------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------


def _constant_shapes(graph: onnx.GraphProto) -> dict[str, tuple[int, ...]]:
    """Shapes of every initializer and Constant-node output in the graph."""
    shapes = {init.name: tuple(init.dims) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    shapes[node.output[0]] = tuple(attr.t.dims)
    return shapes


def _index_bound(graph: onnx.GraphProto, name: str) -> int:
    """Exclusive upper bound for an integer input: the gathered table's size if it indexes a constant."""
    shapes = _constant_shapes(graph)
    for node in graph.node:
        if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == name and node.input[0] in shapes:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            return shapes[node.input[0]][axis]
    return FALLBACK_INT_HIGH


def sample_inputs(model: onnx.ModelProto, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random feeds for every graph input: standard-normal floats, in-range integer ids, 0/1 integer
    masks (inputs named ``*mask*``), random bools.

    A symbolic dim 0 gets ``n``, other symbolic dims get ``DEFAULT_DYNAMIC_DIM``; fixed dims are kept.
    """
    rng = np.random.default_rng(seed)
    graph = model.graph
    initializers = {init.name for init in graph.initializer}
    feeds: dict[str, np.ndarray] = {}
    for value in graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        shape = [
            d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (n if i == 0 else DEFAULT_DYNAMIC_DIM)
            for i, d in enumerate(tensor_type.shape.dim)
        ]
        dtype = helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        if np.issubdtype(dtype, np.floating):
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            feeds[value.name] = rng.random(shape) < 0.5
        elif np.issubdtype(dtype, np.integer):
            high = 2 if "mask" in value.name else _index_bound(graph, value.name)  # attention masks are 0/1
            feeds[value.name] = rng.integers(0, high, shape).astype(dtype)
        else:
            raise TypeError(f"sample_inputs: unsupported input dtype {dtype} for {value.name!r}")
    return feeds


# Every test architecture by name (tests and tools/bench.py iterate over this).
ZOO: dict[str, Callable[[], onnx.ModelProto]] = {
    "residual_cnn": residual_cnn,
    "residual_cnn_static": lambda: residual_cnn(dynamic_batch=False),
    "transformer_block": transformer_block,
    "transformer_block_decomposed": transformer_block_decomposed,
    "mlp_mixer_block": mlp_mixer_block,
    "mlp": mlp,
    "mlp_static": lambda: mlp(dynamic_batch=False),
    "nhwc_tf_style": nhwc_tf_style,
    "helper_opset11": helper_opset11,
    "paddle_style": paddle_style,
    "multi_input": multi_input,
    "token_model": token_model,
    "dynamic_spatial_cnn": dynamic_spatial_cnn,
    "residual_cnn_dynamo": lambda: residual_cnn(dynamo=True),
    "transformer_block_dynamo": lambda: transformer_block(dynamo=True),
}

# The architecture families and the quantization traps live in their own modules, which add
# themselves to ZOO when imported (from here, or first, as e.g. `from models import zoo_traps`).
import models.zoo_families  # noqa: E402,F401
import models.zoo_traps  # noqa: E402,F401
