"""Real-world quantization traps, each a tiny model (random weights) that breaks naive 8-bit PTQ.

- :func:`bert_attention_mask`: an attention mask added as ``(1 - mask) * float32 min`` before
  Softmax (a min/max range of ~3.4e38 leaves every attention score on one code);
- :func:`layernorm_reciprocal`: LayerNorm written as ReduceMean/Sub/Pow/Sqrt/Reciprocal over tokens
  of tiny variance (a variance quantized to 0 before Reciprocal gives inf);
- :func:`detection_concat`: one output Concat of box pixel coordinates (0..640) and class
  probabilities (0..1) (one shared scale rounds every probability to 0);
- :func:`log_spectrum`: a squared magnitude spectrum (power over more than 8 bits of dynamic range)
  followed by Log (quantized power 0 gives log(eps)); :func:`stacked_spectrum` the same with the real and
  imaginary parts as two Convs joined by a Concat (a TensorFlow constant-Q front end);
- :func:`conv_lstm`: an LSTM inside a convolutional model (must stay float).
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import torch
from torch import nn

from models.zoo import ZOO, _perturb_norms, _seeded, conv_bn, exported
from models import zoo_families  # attributes read at call time: zoo_families may still be importing

SMALL_TOKEN_SCALE = 1e-3  # the scale of the "padding" tokens of layernorm_reciprocal
BOX_PIXELS = 640.0  # image size the detection_concat boxes are decoded to
POWER_FLOOR = 0.1  # log(power + floor): power peaks near 1e2, so resolving the floor takes > 8 bits (amplitude: < 8)

__all__ = ["TRAPS", "bert_attention_mask", "conv_lstm", "detection_concat", "layernorm_reciprocal", "log_spectrum",
           "stacked_spectrum"]


def bert_attention_mask(opset: int = 17, *, dynamo: bool = False) -> onnx.ModelProto:
    """BERT-style encoder with inputs "ids" and int64 "attention_mask" (0/1): the mask enters the
    attention scores as ``(1 - mask) * torch.finfo(float32).min``, as Hugging Face BERT does."""
    return zoo_families.bert_encoder(opset, dynamo=dynamo, masked=True)


class _DecomposedLayerNorm(nn.Module):
    """LayerNorm as ReduceMean, Sub, Pow, ReduceMean, Add eps, Sqrt, Reciprocal, Mul, Mul, Add."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim).uniform_(0.5, 1.5))
        self.bias = nn.Parameter(torch.empty(dim).uniform_(-0.2, 0.2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x - x.mean(dim=-1, keepdim=True)
        inv = torch.reciprocal(torch.sqrt(d.pow(2).mean(dim=-1, keepdim=True) + self.eps))
        return d * inv * self.weight + self.bias


class _TinyVarianceTokens(nn.Module):
    """Linear, then every other token scaled by 1e-3 (padding-like), decomposed LayerNorm, Linear."""

    def __init__(self, tokens: int = 8, dim: int = 16) -> None:
        super().__init__()
        scale = torch.ones(1, tokens, 1)
        scale[:, 1::2] = SMALL_TOKEN_SCALE
        self.register_buffer("token_scale", scale)
        self.embed, self.norm, self.head = nn.Linear(dim, dim), _DecomposedLayerNorm(dim), nn.Linear(dim, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.embed(x) * self.token_scale))


def layernorm_reciprocal(opset: int = 13, *, dynamo: bool = False) -> onnx.ModelProto:
    """[N,8,16] tokens -> Linear -> x1e-3 on odd tokens -> decomposed LayerNorm (Reciprocal) -> Linear."""
    with _seeded(30):
        net = _TinyVarianceTokens()
        x = torch.randn(2, 8, 16)
    return exported(net, (x,), opset=opset, dynamo=dynamo, input_names=["tokens"], output_names=["output"])


class _DecodedDetector(nn.Module):
    """The detection head with boxes decoded to pixels (sigmoid x 640) and one output Concat
    [boxes | class probabilities]: [N,16,7]."""

    def __init__(self) -> None:
        super().__init__()
        self.detector = zoo_families._Detector()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        boxes, scores = self.detector.features(x)
        return torch.cat([torch.sigmoid(boxes) * BOX_PIXELS, scores], dim=-1)


def detection_concat(opset: int = 13, *, dynamo: bool = False) -> onnx.ModelProto:
    """Detector on [N,3,16,16] whose output "detections" [N,16,7] joins pixels and probabilities."""
    with _seeded(31):
        net = _DecodedDetector()
        _perturb_norms(net)
        x = torch.randn(2, 3, 16, 16)
    return exported(net, (x,), opset=opset, dynamo=dynamo, input_names=["image"], output_names=["detections"])


class _LogSpectrum(nn.Module):
    """DFT as a strided Conv1d (fixed cos/sin weights, 32 bins), power re^2 + im^2, log(power + 0.1),
    then a Conv1d + Linear classifier over frames."""

    def __init__(self, window: int = 64, hop: int = 32, bins: int = 32) -> None:
        super().__init__()
        t = np.arange(window)[None, :]
        k = np.arange(bins)[:, None]
        hann = np.hanning(window)[None, :]
        basis = np.concatenate([np.cos(2 * np.pi * k * t / window), -np.sin(2 * np.pi * k * t / window)]) * hann
        self.bins = bins
        self.dft = nn.Conv1d(1, 2 * bins, window, hop, bias=False)
        with torch.no_grad():
            self.dft.weight.copy_(torch.from_numpy(basis[:, None, :].astype(np.float32)))
        self.classifier = nn.Sequential(nn.Conv1d(bins, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool1d(1),
                                        nn.Flatten(), nn.Linear(16, 5))

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        spec = self.dft(wave)
        re, im = spec[:, : self.bins], spec[:, self.bins:]
        return self.classifier(torch.log(re * re + im * im + POWER_FLOOR))


def log_spectrum(opset: int = 13, *, dynamo: bool = False) -> onnx.ModelProto:
    """Waveform [N,1,512] -> power spectrum (15 frames x 32 bins) -> log -> classifier (5 classes)."""
    with _seeded(32):
        net = _LogSpectrum()
        x = torch.randn(2, 1, 512)
    return exported(net, (x,), opset=opset, dynamo=dynamo, input_names=["wave"], output_names=["logits"])


class _StackedSpectrum(_LogSpectrum):
    """The spectrum as TensorFlow front ends (constant-Q transforms) write it: real and imaginary filter banks
    as two Convs, stacked by a Concat, then the power summed over the stack and the log of it."""

    def __init__(self) -> None:
        super().__init__()
        self.real = nn.Conv1d(1, self.bins, self.dft.kernel_size[0], self.dft.stride[0], bias=False)
        self.imag = nn.Conv1d(1, self.bins, self.dft.kernel_size[0], self.dft.stride[0], bias=False)
        with torch.no_grad():
            self.real.weight.copy_(self.dft.weight[: self.bins])
            self.imag.weight.copy_(self.dft.weight[self.bins:])

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        spec = torch.stack([self.real(wave), self.imag(wave)], dim=-1)
        return self.classifier(torch.log((spec * spec).sum(dim=-1) + POWER_FLOOR))


def stacked_spectrum(opset: int = 13, *, dynamo: bool = False) -> onnx.ModelProto:
    """Waveform [N,1,512] -> real and imaginary Convs -> Concat (stack) -> power -> log -> classifier."""
    with _seeded(33):
        net = _StackedSpectrum()
        x = torch.randn(2, 1, 512)
    return exported(net, (x,), opset=opset, dynamo=dynamo, input_names=["wave"], output_names=["logits"])


class _ConvLSTM(nn.Module):
    """Conv features over time (width = time), an LSTM over the 8 steps, Linear on the last state."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(conv_bn(3, 8, 3, 2), nn.ReLU(), conv_bn(8, 16, 3, (4, 1)), nn.ReLU())
        self.lstm = nn.LSTM(16 * 2, 16, batch_first=True)
        self.head = nn.Linear(16, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)  # [N, 16, 2, 8]
        seq = f.permute(0, 3, 1, 2).flatten(2)  # [N, 8, 32]
        out, _ = self.lstm(seq)
        return self.head(out[:, -1])


def conv_lstm(opset: int = 13, *, dynamo: bool = False) -> onnx.ModelProto:
    """CNN + LSTM on [N,3,16,16]: convolutions quantized, the LSTM left float."""
    with _seeded(33):
        net = _ConvLSTM()
        _perturb_norms(net)
        x = torch.randn(2, 3, 16, 16)
    return exported(net, (x,), opset=opset, dynamo=dynamo, input_names=["image"], output_names=["logits"])


TRAPS: dict[str, Callable[..., onnx.ModelProto]] = {
    "bert_attention_mask": bert_attention_mask,
    "layernorm_reciprocal": layernorm_reciprocal,
    "detection_concat": detection_concat,
    "log_spectrum": log_spectrum,
    "stacked_spectrum": stacked_spectrum,
    "conv_lstm": conv_lstm,
}
ZOO.update(TRAPS)
