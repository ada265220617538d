"""Decomposed normalizations as exporters write them, each in a tiny model (random weights) whose
statistics have a realistic scale: quantizing them at 8 bits (a variance that rounds to ~0, an
E[x^2] - E[x]^2 that cancels) ruins the normalized output.

- :func:`jax2tf_layernorm`: a jax2tf/tf2onnx-style byte classifier (int32 byte ids, embedding, two
  flax-style LayerNorms: Mul(x, x), ReduceSum + Div by N, E[x^2] - E[x]^2, Max 0, Sqrt, Reciprocal,
  scale folded into the reciprocal), tokens with a large mean next to a small spread; its output has
  no declared shape (tf2onnx's unknown dims);
- :func:`torch_layernorm`: torch's LayerNorm below opset 17 (ReduceMean, Sub, Pow 2, ReduceMean, Add
  eps, Sqrt, Div, Mul, Add) in a token MLP;
- :func:`rmsnorm`: an RMSNorm (Pow 2, ReduceMean, Add eps, Sqrt, Reciprocal, Mul) in a token MLP;
- :func:`groupnorm`: a CNN with GroupNorm written as Reshape to groups, Mul(d, d) variance, Div,
  Reshape back and the per-channel affine; groups of very different spread;
- :func:`instancenorm`: a CNN with InstanceNorm decomposed over H, W (E[x^2] - E[x]^2 and
  Pow(var + eps, -0.5)) after convolutions whose biases dwarf their spatial spread.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper
from torch import nn

from models.zoo import _graph_model, _seeded, _weights, exported

TOKEN_OFFSET = 3.0  # spread of the per-token mean of the token models (their std: TOKEN_SPREAD)
TOKEN_SPREAD = (0.1, 0.5)
GROUP_SPREADS = (1.0, 0.5, 0.2, 0.1)  # std of the GroupNorm model's channel groups, relative
CHANNEL_BIAS = 3.0  # the InstanceNorm model's conv biases, next to weights scaled by CHANNEL_GAIN
CHANNEL_GAIN = 0.7

__all__ = ["NORMS", "groupnorm", "instancenorm", "jax2tf_layernorm", "rmsnorm", "torch_layernorm"]


# ---------------------------------------------------------------------------------------------- jax2tf


def _flax_layernorm(prefix: str, x: str, dim: int, rng: np.random.Generator, inits: dict) -> tuple[list, str]:
    """flax.linen.LayerNorm as jax2tf + tf2onnx write it (mean of squares minus squared mean)."""
    p = f"{prefix}/LayerNorm"
    inits[f"{p}/N:0"] = np.array(dim, np.float32)
    inits[f"{p}/zero:0"] = np.array(0.0, np.float32)
    inits[f"{p}/eps:0"] = np.array(1e-6, np.float32)
    inits[f"{p}/axes:0"] = np.array([-1], np.int64)
    inits[f"{p}/scale:0"] = rng.uniform(0.5, 1.5, dim).astype(np.float32)
    inits[f"{p}/bias:0"] = rng.uniform(-0.2, 0.2, dim).astype(np.float32)
    n = lambda op, ins, out, **kw: helper.make_node(op, ins, [f"{p}/{out}:0"], f"{p}/{out}", **kw)  # noqa: E731
    t = lambda name: f"{p}/{name}:0"  # noqa: E731
    nodes = [
        n("ReduceSum", [x, t("axes")], "sum", keepdims=1),
        n("Div", [t("sum"), t("N")], "mean"),
        n("Mul", [x, x], "square"),
        n("ReduceSum", [t("square"), t("axes")], "sum_sq", keepdims=1),
        n("Div", [t("sum_sq"), t("N")], "mean_sq"),
        n("Mul", [t("mean"), t("mean")], "mean_squared"),
        n("Sub", [t("mean_sq"), t("mean_squared")], "var_raw"),
        n("Max", [t("var_raw"), t("zero")], "var"),
        n("Add", [t("var"), t("eps")], "var_eps"),
        n("Sqrt", [t("var_eps")], "std"),
        n("Reciprocal", [t("std")], "rsqrt"),
        n("Mul", [t("rsqrt"), t("scale")], "mul"),
        n("Sub", [x, t("mean")], "centered"),
        n("Mul", [t("centered"), t("mul")], "normed"),
        n("Add", [t("normed"), t("bias")], "out"),
    ]
    return nodes, t("out")


def jax2tf_layernorm() -> onnx.ModelProto:
    """int32 bytes [N,32] -> embedding (tokens: mean ~U(-3,3), std ~0.3) -> LayerNorm -> Dense-Relu-Dense +
    residual -> LayerNorm -> mean over tokens -> Dense to 8 classes; flax LayerNorms, output shape undeclared."""
    rng = np.random.default_rng(40)
    vocab, tokens, dim, hidden, classes = 257, 32, 32, 64, 8
    table = rng.standard_normal((vocab, dim)) * rng.uniform(*TOKEN_SPREAD, (vocab, 1))
    table += rng.uniform(-TOKEN_OFFSET, TOKEN_OFFSET, (vocab, 1))
    inits: dict = {
        "model/embed/table:0": table.astype(np.float32),
        "model/dense1/kernel:0": _weights(rng, dim, hidden, fan_in=dim),
        "model/dense1/bias:0": (rng.standard_normal(hidden) * 0.1).astype(np.float32),
        "model/dense2/kernel:0": _weights(rng, hidden, dim, fan_in=hidden) * 0.5,
        "model/dense2/bias:0": (rng.standard_normal(dim) * 0.1).astype(np.float32),
        "model/head/kernel:0": _weights(rng, dim, classes, fan_in=dim),
        "model/head/bias:0": (rng.standard_normal(classes) * 0.1).astype(np.float32),
        "model/pool/axes:0": np.array([1], np.int64),
    }
    nodes = [
        helper.make_node("Cast", ["bytes:0"], ["model/ids:0"], "model/ids", to=TensorProto.INT64),
        helper.make_node("Gather", ["model/embed/table:0", "model/ids:0"], ["model/embed:0"], "model/embed", axis=0),
    ]
    ln1, x1 = _flax_layernorm("model/block/ln1", "model/embed:0", dim, rng, inits)
    mlp = [
        helper.make_node("MatMul", [x1, "model/dense1/kernel:0"], ["model/dense1/MatMul:0"], "model/dense1/MatMul"),
        helper.make_node("Add", ["model/dense1/MatMul:0", "model/dense1/bias:0"], ["model/dense1/BiasAdd:0"], "model/dense1/BiasAdd"),
        helper.make_node("Relu", ["model/dense1/BiasAdd:0"], ["model/dense1/Relu:0"], "model/dense1/Relu"),
        helper.make_node("MatMul", ["model/dense1/Relu:0", "model/dense2/kernel:0"], ["model/dense2/MatMul:0"], "model/dense2/MatMul"),
        helper.make_node("Add", ["model/dense2/MatMul:0", "model/dense2/bias:0"], ["model/dense2/BiasAdd:0"], "model/dense2/BiasAdd"),
        helper.make_node("Add", ["model/embed:0", "model/dense2/BiasAdd:0"], ["model/block/residual:0"], "model/block/residual"),
    ]
    ln2, x2 = _flax_layernorm("model/block/ln2", "model/block/residual:0", dim, rng, inits)
    head = [
        helper.make_node("ReduceSum", [x2, "model/pool/axes:0"], ["model/pool/Sum:0"], "model/pool/Sum", keepdims=0),
        helper.make_node("MatMul", ["model/pool/Sum:0", "model/head/kernel:0"], ["model/head/MatMul:0"], "model/head/MatMul"),
        helper.make_node("Add", ["model/head/MatMul:0", "model/head/bias:0"], ["Identity:0"], "model/head/BiasAdd"),
    ]
    inputs = [helper.make_tensor_value_info("bytes:0", TensorProto.INT32, ["unk__0", tokens])]
    outputs = [helper.make_tensor_value_info("Identity:0", TensorProto.FLOAT, ["unk__1", "unk__2"])]
    return _graph_model("tf2onnx", nodes + ln1 + mlp + ln2 + head, inputs, outputs, inits, opset=13, producer="tf2onnx")


# ---------------------------------------------------------------------------------------------- torch


class _TokenScales(nn.Module):
    """Linear on [N,T,D] tokens, then a per-token offset and spread (as a residual stream has)."""

    def __init__(self, tokens: int, dim: int) -> None:
        super().__init__()
        self.embed = nn.Linear(dim, dim)
        self.register_buffer("offset", torch.empty(1, tokens, 1).uniform_(-TOKEN_OFFSET, TOKEN_OFFSET))
        self.register_buffer("spread", torch.empty(1, tokens, 1).uniform_(*TOKEN_SPREAD))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(x) * self.spread + self.offset


class _RMSNorm(nn.Module):
    """x * reciprocal(sqrt(mean(x^2) + eps)) * weight."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim).uniform_(0.5, 1.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inv = torch.reciprocal(torch.sqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps))
        return x * inv * self.weight


class _NormedTokenMLP(nn.Module):
    """Tokens (offset and spread per token) -> norm -> Linear-GELU-Linear -> norm -> mean -> Linear."""

    def __init__(self, norm: Callable[[int], nn.Module], tokens: int = 16, dim: int = 32) -> None:
        super().__init__()
        self.tokens = _TokenScales(tokens, dim)
        self.norm1, self.norm2 = norm(dim), norm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tokens(x)
        h = h + self.ffn(self.norm1(h))
        return self.head(self.norm2(h).mean(dim=1))


def _token_model(norm: Callable[[int], nn.Module], seed: int) -> onnx.ModelProto:
    with _seeded(seed):
        net = _NormedTokenMLP(norm)
        for m in net.modules():
            if isinstance(m, nn.LayerNorm):
                nn.init.uniform_(m.weight, 0.5, 1.5)
                nn.init.uniform_(m.bias, -0.2, 0.2)
        x = torch.randn(2, 16, 32)
    return exported(net, (x,), opset=13, input_names=["tokens"], output_names=["logits"])


def torch_layernorm() -> onnx.ModelProto:
    """[N,16,32] tokens -> two nn.LayerNorm (decomposed at opset 13) in a pre-norm token MLP."""
    return _token_model(nn.LayerNorm, 41)


def rmsnorm() -> onnx.ModelProto:
    """[N,16,32] tokens -> two RMSNorms (Pow, ReduceMean, Add, Sqrt, Reciprocal, Mul) in a pre-norm token MLP."""
    return _token_model(_RMSNorm, 42)


class _GroupNorm(nn.Module):
    """GroupNorm as exporters of hand-written ones write it: Reshape to [N,G,-1], mean, d = x - mean,
    mean(d * d), d / sqrt(var + eps), Reshape back, per-channel affine."""

    def __init__(self, groups: int, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.groups, self.eps = groups, eps
        self.weight = nn.Parameter(torch.empty(channels, 1, 1).uniform_(0.5, 1.5))
        self.bias = nn.Parameter(torch.empty(channels, 1, 1).uniform_(-0.2, 0.2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        g = x.reshape(n, self.groups, -1)
        d = g - g.mean(dim=-1, keepdim=True)
        y = d / torch.sqrt((d * d).mean(dim=-1, keepdim=True) + self.eps)
        return y.reshape(n, c, h, w) * self.weight + self.bias


class _InstanceNorm(nn.Module):
    """InstanceNorm over H, W as E[x^2] - E[x]^2 with Pow(var + eps, -0.5), then the affine."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(1, channels, 1, 1).uniform_(0.5, 1.5))
        self.bias = nn.Parameter(torch.empty(1, channels, 1, 1).uniform_(-0.2, 0.2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=(2, 3), keepdim=True)
        var = (x * x).mean(dim=(2, 3), keepdim=True) - mean * mean
        return (x - mean) * torch.pow(var + self.eps, -0.5) * self.weight + self.bias


class _NormedCNN(nn.Module):
    """Conv -> norm -> SiLU -> Conv -> norm -> SiLU -> global average pool -> Linear."""

    def __init__(self, norm: Callable[[int], nn.Module], channels: int = 16) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, channels, 3, padding=1), nn.Conv2d(channels, channels, 3, padding=1)
        self.norm1, self.norm2 = norm(channels), norm(channels)
        self.head = nn.Linear(channels, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.silu(self.norm1(self.conv1(x)))
        h = nn.functional.silu(self.norm2(self.conv2(h)))
        return self.head(h.mean(dim=(2, 3)))


def groupnorm() -> onnx.ModelProto:
    """[N,3,16,16] -> Conv -> GroupNorm(4 groups, of spreads 1 : 0.5 : 0.2 : 0.1) -> SiLU -> Conv -> GroupNorm -> ..."""
    with _seeded(43):
        net = _NormedCNN(lambda c: _GroupNorm(4, c))
        spread = torch.tensor(GROUP_SPREADS).repeat_interleave(net.conv1.out_channels // len(GROUP_SPREADS))
        with torch.no_grad():
            for conv in (net.conv1, net.conv2):
                conv.weight.mul_(spread[:, None, None, None])
                conv.bias.mul_(spread)
        x = torch.randn(2, 3, 16, 16)
    return exported(net, (x,), opset=13, input_names=["image"], output_names=["logits"])


def instancenorm() -> onnx.ModelProto:
    """[N,3,16,16] -> Conv (biases ~U(-3,3)) -> InstanceNorm over H,W (E[x^2]-E[x]^2, Pow -0.5) -> SiLU -> ..."""
    with _seeded(44):
        net = _NormedCNN(_InstanceNorm)
        with torch.no_grad():
            for conv in (net.conv1, net.conv2):
                conv.weight.mul_(CHANNEL_GAIN)
                conv.bias.uniform_(-CHANNEL_BIAS, CHANNEL_BIAS)
        x = torch.randn(2, 3, 16, 16)
    return exported(net, (x,), opset=13, input_names=["image"], output_names=["logits"])


# Not in ZOO: the E[x^2] - E[x]^2 statistics of jax2tf_layernorm cancel on purpose (token means 10x their
# spread), which float32 summation order alone moves by more than the zoo-wide torch-vs-onnxruntime
# tolerance; tests/test_norm_blocks.py runs these models end to end.
NORMS: dict[str, Callable[[], onnx.ModelProto]] = {
    "jax2tf_layernorm": jax2tf_layernorm,
    "torch_layernorm": torch_layernorm,
    "rmsnorm": rmsnorm,
    "groupnorm": groupnorm,
    "instancenorm": instancenorm,
}
