"""Architecture families of the paper (and of users' models), tiny and with random weights.

Each builder returns an ``onnx.ModelProto`` exported from a small torch module by
:func:`models.zoo.exported` (legacy or dynamo exporter, any opset). The families:
ResNet-style (``models.zoo.residual_cnn``), MobileNetV2 (inverted residuals, ReLU6), MobileNetV3
(depthwise, HardSwish, squeeze-excite), EfficientNet (MBConv, SiLU, SE), RegNet (grouped conv),
DeiT (patch embed, class and distillation tokens, LayerNorm, attention, GELU), MobileViT (conv +
unfold/transformer/fold), MLP-Mixer (patch embed + mixer), a BERT-style encoder (int64 token ids,
word/position/type embedding Gathers), a detection head (two outputs), a segmentation head
(ConvTranspose + Resize) and a DB-style text detector (dynamic spatial dims, FPN, ConvTranspose head). :data:`FAMILIES` maps names to builders taking ``opset`` and ``dynamo``.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from onnx import helper
from torch import nn

from models.zoo import ZOO, _perturb_norms, _seeded, _TransformerBlock, _MixerBlock, conv_bn, exported
from models.zoo import MIN_DYNAMO_OPSET

LEGACY_MAX_OPSET = 20  # torch's TorchScript exporter (torch.onnx._constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET)
ATTENTION_SHARPNESS = 4.0  # factor on the BERT query weights
DYNAMO_MAX_OPSET = 23  # torch's dynamo exporter (torch.onnx._constants.ONNX_MAX_OPSET)

__all__ = ["FAMILIES", "EXPORT_OPSETS", "newest_ort_opset", "export_opsets"]


@functools.lru_cache(maxsize=None)
def newest_ort_opset() -> int:
    """The newest default-domain opset the installed onnxruntime loads (probed, not hard-coded)."""
    for opset in range(onnx.defs.onnx_opset_version(), 12, -1):
        x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
        y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
        graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe", [x], [y])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        model.ir_version = helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
        try:
            ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        except Exception:  # noqa: BLE001 - onnxruntime raises several types for an unknown opset/IR
            continue
        return opset
    raise RuntimeError("onnxruntime loads no opset >= 13")


def export_opsets(dynamo: bool) -> list[int]:
    """Opsets 13, 17 and the newest both onnxruntime and the exporter support (dynamo: from 18)."""
    newest = min(newest_ort_opset(), DYNAMO_MAX_OPSET if dynamo else LEGACY_MAX_OPSET)
    requested = [13, 17, newest]
    return sorted({max(o, MIN_DYNAMO_OPSET) if dynamo else o for o in requested})


EXPORT_OPSETS = {"legacy": export_opsets(False), "dynamo": export_opsets(True)}


# ----------------------------------------------------------------------------------------------------------
# CNN families
# ----------------------------------------------------------------------------------------------------------


class SqueezeExcite(nn.Module):
    """GAP -> 1x1 conv -> ReLU/SiLU -> 1x1 conv -> Hardsigmoid/Sigmoid -> channel scale."""

    def __init__(self, channels: int, squeeze: int, act: type[nn.Module], gate: type[nn.Module]) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, squeeze, 1), act(), nn.Conv2d(squeeze, channels, 1), gate()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.body(x)


class InvertedResidual(nn.Module):
    """MobileNetV2/V3 and EfficientNet MBConv: expand 1x1, depthwise kxk, optional SE, project 1x1."""

    def __init__(self, cin: int, cout: int, expand: int, stride: int, act: type[nn.Module],
                 se: Callable[[int], nn.Module] | None = None, kernel: int = 3) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = [conv_bn(cin, hidden, 1), act(), conv_bn(hidden, hidden, kernel, stride, hidden), act()]
        if se is not None:
            layers.append(se(hidden))
        layers.append(conv_bn(hidden, cout, 1))
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x + y if self.residual else y


def _classifier(stem: list[nn.Module], blocks: list[nn.Module], width: int, act: type[nn.Module],
                classes: int = 10) -> nn.Module:
    return nn.Sequential(*stem, *blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 32), act(),
                         nn.Linear(32, classes))


def _cnn(net_factory: Callable[[], nn.Module], seed: int, opset: int, dynamo: bool, size: int = 32) -> onnx.ModelProto:
    with _seeded(seed):
        net = net_factory()
        _perturb_norms(net)
        x = torch.randn(2, 3, size, size)
    return exported(net, (x,), opset=opset, dynamo=dynamo, input_names=["image"], output_names=["logits"])


def mobilenet_v2(opset: int = 13, *, dynamo: bool = False) -> onnx.ModelProto:
    """MobileNetV2-style: ReLU6 inverted residuals with a linear bottleneck."""
    def net() -> nn.Module:
        blocks = [InvertedResidual(8, 8, 4, 1, nn.ReLU6), InvertedResidual(8, 16, 4, 2, nn.ReLU6),
                  InvertedResidual(16, 16, 4, 1, nn.ReLU6)]
        return _classifier([conv_bn(3, 8, 3, 2), nn.ReLU6()], blocks, 16, nn.ReLU6)
    return _cnn(net, 20, opset, dynamo)


def mobilenet_v3(opset: int = 13, *, dynamo: bool = False) -> onnx.ModelProto:
    """MobileNetV3-style: HardSwish, depthwise 5x5, squeeze-excite with Hardsigmoid gates."""
    def se(c: int) -> nn.Module:
        return SqueezeExcite(c, max(c // 4, 4), nn.ReLU, nn.Hardsigmoid)

    def net() -> nn.Module:
        blocks = [InvertedResidual(8, 8, 3, 1, nn.Hardswish, se, kernel=5),
                  InvertedResidual(8, 16, 3, 2, nn.Hardswish, se)]
        return _classifier([conv_bn(3, 8, 3, 2), nn.Hardswish()], blocks, 16, nn.Hardswish)
    return _cnn(net, 21, opset, dynamo)


def efficientnet(opset: int = 13, *, dynamo: bool = False) -> onnx.ModelProto:
    """EfficientNet-style MBConv: SiLU everywhere, squeeze-excite with a Sigmoid gate."""
    def se(c: int) -> nn.Module:
        return SqueezeExcite(c, max(c // 4, 4), nn.SiLU, nn.Sigmoid)

    def net() -> nn.Module:
        blocks = [InvertedResidual(8, 8, 1, 1, nn.SiLU, se), InvertedResidual(8, 16, 4, 2, nn.SiLU, se),
                  InvertedResidual(16, 16, 4, 1, nn.SiLU, se)]
        return _classifier([conv_bn(3, 8, 3, 2), nn.SiLU()], blocks, 16, nn.SiLU)
    return _cnn(net, 22, opset, dynamo)


class _RegNetBlock(nn.Module):
    """RegNet X block: 1x1, grouped 3x3 (group width 4), 1x1, with a projection shortcut when striding."""

    def __init__(self, cin: int, cout: int, stride: int, group_width: int = 4) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_bn(cin, cout, 1), nn.ReLU(), conv_bn(cout, cout, 3, stride, cout // group_width),
                                  nn.ReLU(), conv_bn(cout, cout, 1))
        self.proj = conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else nn.Identity()
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.proj(x) + self.body(x))


def regnet(opset: int = 13, *, dynamo: bool = False) -> onnx.ModelProto:
    """RegNetX-style: grouped 3x3 convolutions in residual bottlenecks."""
    def net() -> nn.Module:
        return _classifier([conv_bn(3, 8, 3, 2), nn.ReLU()], [_RegNetBlock(8, 16, 2), _RegNetBlock(16, 16, 1)], 16, nn.ReLU)
    return _cnn(net, 23, opset, dynamo)


# ----------------------------------------------------------------------------------------------------------
# Transformer and hybrid families
# ----------------------------------------------------------------------------------------------------------


class _DeiT(nn.Module):
    """Patch embed (4x4 conv), class + distillation tokens, position embedding, one encoder block,
    final LayerNorm, two heads (class and distillation) averaged."""

    def __init__(self, dim: int = 32, patch: int = 4, image: int = 16, classes: int = 10) -> None:
        super().__init__()
        tokens = (image // patch) ** 2
        self.embed = nn.Conv2d(3, dim, patch, patch)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))  # trained tokens have norms like the patches
        self.dist = nn.Parameter(torch.randn(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, tokens + 2, dim) * 0.5)
        self.block = _TransformerBlock(tokens + 2, dim, heads=2, hidden=2 * dim)
        self.norm = nn.LayerNorm(dim)
        self.head, self.head_dist = nn.Linear(dim, classes), nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = self.embed(x).flatten(2).transpose(1, 2)
        n = patches.shape[0]
        x = torch.cat([self.cls.expand(n, -1, -1), self.dist.expand(n, -1, -1), patches], dim=1) + self.pos
        x = self.norm(self.block(x))
        return (self.head(x[:, 0]) + self.head_dist(x[:, 1])) / 2


def deit(opset: int = 17, *, dynamo: bool = False) -> onnx.ModelProto:
    """DeiT-style ViT on [N,3,16,16]: 16 patches + class + distillation token, attention, GELU."""
    return _cnn(_DeiT, 24, opset, dynamo, size=16)


class _MobileViTBlock(nn.Module):
    """Local 3x3 conv, 1x1 to the transformer width, unfold into 2x2 patches, transformer, fold,
    1x1 back, concat with the input, 3x3 fusion conv (MobileViT v1)."""

    def __init__(self, channels: int, dim: int, size: int, patch: int = 2) -> None:
        super().__init__()
        self.patch, self.size, self.dim = patch, size, dim
        self.local = nn.Sequential(conv_bn(channels, channels, 3), nn.SiLU(), nn.Conv2d(channels, dim, 1, bias=False))
        self.transformer = _TransformerBlock((size // patch) ** 2, dim, heads=2, hidden=2 * dim)
        self.project = nn.Sequential(conv_bn(dim, channels, 1), nn.SiLU())
        self.fuse = nn.Sequential(conv_bn(2 * channels, channels, 3), nn.SiLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p, h, d = self.patch, self.size // self.patch, self.dim
        y = self.local(x)  # [N, d, H, W]
        y = y.reshape(-1, d, h, p, h, p).permute(0, 3, 5, 2, 4, 1).reshape(-1, h * h, d)  # [N*p*p, h*h, d]
        y = self.transformer(y)
        y = y.reshape(-1, p, p, h, h, d).permute(0, 5, 3, 1, 4, 2).reshape(-1, d, self.size, self.size)
        return self.fuse(torch.cat([x, self.project(y)], dim=1))


def mobilevit(opset: int = 17, *, dynamo: bool = False) -> onnx.ModelProto:
    """MobileViT-style hybrid on [N,3,16,16]: MobileNetV2 block, MobileViT block, classifier."""
    def net() -> nn.Module:
        blocks = [InvertedResidual(8, 8, 2, 1, nn.SiLU), _MobileViTBlock(8, 16, size=8)]
        return _classifier([conv_bn(3, 8, 3, 2), nn.SiLU()], blocks, 8, nn.SiLU)
    return _cnn(net, 25, opset, dynamo, size=16)


class _Mixer(nn.Module):
    """4x4 patch embed conv, tokens x channels, one mixer block with a mean-over-tokens head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 32, 4, 4)
        self.mixer = _MixerBlock(tokens=16, dim=32, num_classes=10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mixer(self.embed(x).flatten(2).transpose(1, 2))


def mlp_mixer(opset: int = 17, *, dynamo: bool = False) -> onnx.ModelProto:
    """MLP-Mixer on [N,3,16,16]: patch embed + token-mixing and channel-mixing MLPs."""
    return _cnn(_Mixer, 26, opset, dynamo, size=16)


# ----------------------------------------------------------------------------------------------------------
# BERT-style encoder
# ----------------------------------------------------------------------------------------------------------


class _BertAttention(nn.Module):
    """Multi-head attention with an optional additive mask: (1 - mask) * float32 min, as HF BERT does."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))

    def _split(self, y: torch.Tensor) -> torch.Tensor:
        return y.reshape(y.shape[0], y.shape[1], self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, additive_mask: torch.Tensor | None) -> torch.Tensor:
        q, k, v = self._split(self.q(x)), self._split(self.k(x)), self._split(self.v(x))
        scores = (q @ k.transpose(-2, -1)) / float(np.sqrt(self.head_dim))
        if additive_mask is not None:
            scores = scores + additive_mask
        merged = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2)
        return self.out(merged.reshape(x.shape[0], x.shape[1], -1))


class _Bert(nn.Module):
    """Word + position + token-type embeddings, LayerNorm, one post-norm encoder layer, tanh pooler
    on the first token, classifier. With ``masked`` a second int64 input ``attention_mask``."""

    def __init__(self, vocab: int = 64, seq: int = 12, dim: int = 32, classes: int = 3, masked: bool = False) -> None:
        super().__init__()
        self.masked = masked
        self.word, self.position, self.token_type = nn.Embedding(vocab, dim), nn.Embedding(seq, dim), nn.Embedding(2, dim)
        self.register_buffer("positions", torch.arange(seq).unsqueeze(0), persistent=False)
        self.ln_embed, self.ln_attn, self.ln_ffn = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = _BertAttention(dim, heads=2)
        self.ffn = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.pooler, self.classifier = nn.Linear(dim, dim), nn.Linear(dim, classes)
        with torch.no_grad():  # peaked attention (as in trained models): a flattened one is an error
            self.attn.q.weight.mul_(ATTENTION_SHARPNESS)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.word(ids) + self.position(self.positions) + self.token_type(torch.zeros_like(ids))
        x = self.ln_embed(x)
        additive = None
        if self.masked and mask is not None:
            additive = (1.0 - mask[:, None, None, :].to(x.dtype)) * torch.finfo(torch.float32).min
        x = self.ln_attn(x + self.attn(x, additive))
        x = self.ln_ffn(x + self.ffn(x))
        return self.classifier(torch.tanh(self.pooler(x[:, 0])))


def bert_encoder(opset: int = 17, *, dynamo: bool = False, masked: bool = False) -> onnx.ModelProto:
    """BERT-style encoder on int64 ids [N,12] (vocab 64): embedding Gathers, attention, GELU, pooler."""
    with _seeded(27):
        net = _Bert(masked=masked)
        _perturb_norms(net)
        ids = torch.randint(0, 64, (2, 12), dtype=torch.int64)
        mask = torch.ones(2, 12, dtype=torch.int64)
    args, names = ((ids, mask), ["ids", "attention_mask"]) if masked else ((ids,), ["ids"])
    return exported(net, args, opset=opset, dynamo=dynamo, input_names=names, output_names=["logits"])


# ----------------------------------------------------------------------------------------------------------
# Detection and segmentation heads
# ----------------------------------------------------------------------------------------------------------


class _Detector(nn.Module):
    """Conv backbone (stride 4) and an anchor-free head with two outputs: boxes [N,16,4] (raw
    offsets) and class scores [N,16,3] (sigmoid)."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.classes = classes
        self.backbone = nn.Sequential(conv_bn(3, 8, 3, 2), nn.ReLU(), conv_bn(8, 16, 3, 2), nn.ReLU())
        self.box, self.cls = nn.Conv2d(16, 4, 1), nn.Conv2d(16, classes, 1)

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.backbone(x)
        return self.box(f).flatten(2).transpose(1, 2), torch.sigmoid(self.cls(f)).flatten(2).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.features(x)


def detection_head(opset: int = 13, *, dynamo: bool = False) -> onnx.ModelProto:
    """Detector on [N,3,16,16] with outputs "boxes" [N,16,4] and "scores" [N,16,3]."""
    with _seeded(28):
        net = _Detector()
        _perturb_norms(net)
        x = torch.randn(2, 3, 16, 16)
    return exported(net, (x,), opset=opset, dynamo=dynamo, input_names=["image"], output_names=["boxes", "scores"])


class _Segmenter(nn.Module):
    """Encoder (stride 4), ConvTranspose x2 up, nearest and bilinear Resize x2, 1x1 to 4 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(conv_bn(3, 8, 3, 2), nn.ReLU(), conv_bn(8, 16, 3, 2), nn.ReLU())
        self.up = nn.Sequential(nn.ConvTranspose2d(16, 8, 2, 2), nn.BatchNorm2d(8), nn.ReLU())
        self.refine = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.refine(F.interpolate(self.up(self.encoder(x)), scale_factor=2.0, mode="nearest"))
        return F.interpolate(self.head(y), scale_factor=2.0, mode="bilinear", align_corners=False)


def segmentation_head(opset: int = 13, *, dynamo: bool = False) -> onnx.ModelProto:
    """Segmenter on [N,3,16,16] -> per-pixel logits [N,4,32,32]."""
    with _seeded(29):
        net = _Segmenter()
        _perturb_norms(net)
        x = torch.randn(2, 3, 16, 16)
    return exported(net, (x,), opset=opset, dynamo=dynamo, input_names=["image"], output_names=["masks"])


class _DBDetector(nn.Module):
    """DB-style text detector (as PaddleOCR's are exported): a HardSwish backbone of four stride-2 stages,
    an FPN (1x1 laterals, nearest x2 upsampling Adds, 3x3 smoothing, levels resized to 1/4 and concatenated)
    and a probability head (3x3 conv, two ConvTranspose x2, Sigmoid) at the input's resolution."""

    def __init__(self, widths: tuple[int, ...] = (8, 16, 24, 32)) -> None:
        super().__init__()
        stages, cin = [], 3
        for w in widths:
            stages.append(nn.Sequential(conv_bn(cin, w, 3, 2), nn.Hardswish(), conv_bn(w, w, 3, groups=w), nn.Hardswish()))
            cin = w
        self.stages = nn.ModuleList(stages)
        self.lateral = nn.ModuleList(nn.Conv2d(w, 16, 1) for w in widths[1:])
        self.smooth = nn.ModuleList(nn.Conv2d(16, 4, 3, padding=1) for _ in widths[1:])
        self.head = nn.Sequential(conv_bn(12, 8, 3), nn.ReLU(), nn.ConvTranspose2d(8, 8, 2, 2), nn.BatchNorm2d(8),
                                  nn.ReLU(), nn.ConvTranspose2d(8, 1, 2, 2), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        c2, c3, c4 = (lateral(f) for lateral, f in zip(self.lateral, feats[1:]))  # strides 4, 8, 16
        p3 = c3 + F.interpolate(c4, scale_factor=2.0, mode="nearest")
        p2 = c2 + F.interpolate(p3, scale_factor=2.0, mode="nearest")
        levels = [smooth(p) for smooth, p in zip(self.smooth, (p2, p3, c4))]
        levels = [levels[0]] + [F.interpolate(p, scale_factor=float(2 ** (i + 1)), mode="nearest")
                                for i, p in enumerate(levels[1:])]
        return self.head(torch.cat(levels, 1))


def db_text_detector(opset: int = 13, *, dynamo: bool = False) -> onnx.ModelProto:
    """DB-style text detector on [N,3,H,W] (H, W symbolic, multiples of 16) -> probability map [N,1,H,W]."""
    with _seeded(30):
        net = _DBDetector()
        _perturb_norms(net)
        x = torch.randn(2, 3, 32, 48)
    return exported(net, (x,), opset=opset, dynamo=dynamo, input_names=["x"], output_names=["maps"],
                    dynamic_axes={"x": {2: "H", 3: "W"}, "maps": {2: "H", 3: "W"}})


# Every family by name; each builder takes ``opset`` and ``dynamo``.
FAMILIES: dict[str, Callable[..., onnx.ModelProto]] = {
    "mobilenet_v2": mobilenet_v2,
    "mobilenet_v3": mobilenet_v3,
    "efficientnet": efficientnet,
    "regnet": regnet,
    "deit": deit,
    "mobilevit": mobilevit,
    "mlp_mixer": mlp_mixer,
    "bert_encoder": bert_encoder,
    "detection_head": detection_head,
    "segmentation_head": segmentation_head,
    "db_text_detector": db_text_detector,
}
ZOO.update(FAMILIES)
