"""Train the zoo's YOLOv8-style detector on synthetic scenes (models/detection.py) and write models/yolo_det/.

Run ``python models/build_yolo_det.py``. Deterministic (fixed seeds, one thread); a few minutes on one core.
The network follows ultralytics' YOLOv8 at a small width: Conv+BN+SiLU blocks, C2f blocks (Split, bottlenecks,
Concat), SPPF, a top-down and bottom-up neck (nearest Upsample, Concat), and the anchor-free head at strides
8/16/32: per level a box branch (4 x 16 DFL bins) and a class branch, Concat per level and over levels, Split,
DFL (Softmax over the 16 bins and a 1x1 Conv with arange weights), box decode with the anchor grid and strides
(centre x, y, width, height in pixels) and a final Concat of the boxes with the Sigmoid class probabilities:
output ``[N, 7, 525]``. Training uses FCOS-style assignment (anchor centres near a box centre, one level per
box size), BCE on classes, DFL cross-entropy and L1 on the distances.
Output: ``yolo_det.onnx`` (opset 17, torch legacy export, BatchNorm folded as ultralytics exports it).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import List, Tuple

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: make `models` importable

from models import detection  # noqa: E402
from models import zoo  # noqa: E402

OUT = ROOT / "models" / "yolo_det" / "yolo_det.onnx"
WIDTHS = (8, 16, 24, 32, 48)  # stem, stride 4, P3 (8), P4 (16), P5 (32)
STRIDES = (8, 16, 32)
REG_MAX = 16
HEAD_BOX, HEAD_CLS = 24, 24
LEVEL_LIMITS = (32.0, 64.0, float("inf"))  # a box goes to the first level whose limit holds its largest side / 2
CENTER_RADIUS = 2.5  # positives: anchor centres within this many strides of a box centre (and inside it)
STEPS, BATCH, LR = 400, 12, 4e-3
SEED = 0
MIN_F1_VS_TRUTH = 0.7


class ConvBlock(nn.Module):
    """Conv + BatchNorm + SiLU (ultralytics ``Conv``)."""

    def __init__(self, cin: int, cout: int, k: int = 1, s: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, s, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    def __init__(self, c: int, shortcut: bool) -> None:
        super().__init__()
        self.cv1, self.cv2, self.add = ConvBlock(c, c, 3), ConvBlock(c, c, 3), shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    """1x1 conv, Split in two halves, bottlenecks on the last half, Concat of all, 1x1 conv."""

    def __init__(self, cin: int, cout: int, n: int = 1, shortcut: bool = True) -> None:
        super().__init__()
        self.c = cout // 2
        self.cv1 = ConvBlock(cin, 2 * self.c)
        self.cv2 = ConvBlock((2 + n) * self.c, cout)
        self.m = nn.ModuleList(Bottleneck(self.c, shortcut) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.cv1, self.cv2 = ConvBlock(c, c // 2), ConvBlock(c * 2, c)
        self.pool = nn.MaxPool2d(5, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = [self.cv1(x)]
        y.extend(self.pool(y[-1]) for _ in range(3))
        return self.cv2(torch.cat(y, 1))


class DFL(nn.Module):
    """Expected distance over REG_MAX bins: Softmax, then a fixed 1x1 Conv with weights 0..REG_MAX-1."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(REG_MAX, 1, 1, bias=False).requires_grad_(False)
        self.conv.weight.data[:] = torch.arange(REG_MAX, dtype=torch.float32).view(1, REG_MAX, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, a = x.shape
        return self.conv(x.view(b, 4, REG_MAX, a).transpose(2, 1).softmax(1)).view(b, 4, a)


def anchor_grid(size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Anchor centres [2, A] (grid cell centres, in stride units) and strides [1, A] over all levels."""
    points, strides = [], []
    for s in STRIDES:
        g = size // s
        ys, xs = torch.meshgrid(torch.arange(g) + 0.5, torch.arange(g) + 0.5, indexing="ij")
        points.append(torch.stack((xs.flatten(), ys.flatten())))
        strides.append(torch.full((1, g * g), float(s)))
    return torch.cat(points, 1), torch.cat(strides, 1)


class YoloDetector(nn.Module):
    """Backbone, PAN neck and anchor-free DFL head; ``raw`` returns the per-anchor logits for training."""

    def __init__(self, classes: int = len(detection.CLASSES), size: int = detection.SIZE) -> None:
        super().__init__()
        w = WIDTHS
        self.nc, self.no = classes, 4 * REG_MAX + classes
        self.stem = nn.Sequential(ConvBlock(3, w[0], 3, 2), ConvBlock(w[0], w[1], 3, 2), C2f(w[1], w[1]))
        self.p3 = nn.Sequential(ConvBlock(w[1], w[2], 3, 2), C2f(w[2], w[2], 2))
        self.p4 = nn.Sequential(ConvBlock(w[2], w[3], 3, 2), C2f(w[3], w[3], 2))
        self.p5 = nn.Sequential(ConvBlock(w[3], w[4], 3, 2), C2f(w[4], w[4]), SPPF(w[4]))
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.td4, self.td3 = C2f(w[4] + w[3], w[3], shortcut=False), C2f(w[3] + w[2], w[2], shortcut=False)
        self.down3, self.bu4 = ConvBlock(w[2], w[2], 3, 2), C2f(w[2] + w[3], w[3], shortcut=False)
        self.down4, self.bu5 = ConvBlock(w[3], w[3], 3, 2), C2f(w[3] + w[4], w[4], shortcut=False)
        chans = (w[2], w[3], w[4])
        self.box = nn.ModuleList(nn.Sequential(ConvBlock(c, HEAD_BOX, 3), ConvBlock(HEAD_BOX, HEAD_BOX, 3),
                                               nn.Conv2d(HEAD_BOX, 4 * REG_MAX, 1)) for c in chans)
        self.cls = nn.ModuleList(nn.Sequential(ConvBlock(c, HEAD_CLS, 3), ConvBlock(HEAD_CLS, HEAD_CLS, 3),
                                               nn.Conv2d(HEAD_CLS, classes, 1)) for c in chans)
        for head in self.cls:
            nn.init.constant_(head[-1].bias, -4.0)  # start from a low object prior
        self.dfl = DFL()
        anchors, strides = anchor_grid(size)
        self.register_buffer("anchors", anchors, persistent=False)
        self.register_buffer("strides", strides, persistent=False)

    def raw(self, x: torch.Tensor) -> torch.Tensor:
        """Per-level Concat of box and class logits, flattened and concatenated over levels: [N, no, A]."""
        p3 = self.p3(self.stem(x))
        p4 = self.p4(p3)
        p5 = self.p5(p4)
        t4 = self.td4(torch.cat((self.up(p5), p4), 1))
        n3 = self.td3(torch.cat((self.up(t4), p3), 1))
        n4 = self.bu4(torch.cat((self.down3(n3), t4), 1))
        n5 = self.bu5(torch.cat((self.down4(n4), p5), 1))
        levels = [torch.cat((self.box[i](f), self.cls[i](f)), 1) for i, f in enumerate((n3, n4, n5))]
        return torch.cat([lv.view(x.shape[0], self.no, -1) for lv in levels], 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        box, cls = self.raw(x).split((4 * REG_MAX, self.nc), 1)
        lt, rb = self.dfl(box).chunk(2, 1)
        x1y1, x2y2 = self.anchors.unsqueeze(0) - lt, self.anchors.unsqueeze(0) + rb
        xywh = torch.cat(((x1y1 + x2y2) / 2, x2y2 - x1y1), 1) * self.strides
        return torch.cat((xywh, cls.sigmoid()), 1)


def assign(boxes: np.ndarray, labels: np.ndarray, anchors: torch.Tensor, strides: torch.Tensor, nc: int
           ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Class targets [A, nc], distance targets [A, 4] (l, t, r, b in stride units) and the positive mask [A]."""
    a = anchors.shape[1]
    centres = (anchors * strides).T.numpy()  # [A, 2] pixels
    stride = strides[0].numpy()
    level_limit = np.select([stride == s for s in STRIDES], LEVEL_LIMITS)
    level_low = np.select([stride == s for s in STRIDES], (0.0,) + LEVEL_LIMITS[:-1])
    cls_t, dist_t = np.zeros((a, nc), np.float32), np.zeros((a, 4), np.float32)
    best_area = np.full(a, np.inf)
    for box, label in zip(boxes, labels):
        d = np.stack([centres[:, 0] - box[0], centres[:, 1] - box[1], box[2] - centres[:, 0], box[3] - centres[:, 1]], 1)
        half = max(box[2] - box[0], box[3] - box[1]) / 2
        near = np.abs(centres - (box[:2] + box[2:]) / 2).max(1) <= CENTER_RADIUS * stride
        pos = (d.min(1) > 0) & near & (half > level_low) & (half <= level_limit)
        area = (box[2] - box[0]) * (box[3] - box[1])
        pos &= area < best_area
        best_area[pos] = area
        cls_t[pos] = 0.0
        cls_t[pos, label] = 1.0
        dist_t[pos] = d[pos] / stride[pos, None]
    mask = np.isfinite(best_area)
    return torch.from_numpy(cls_t), torch.from_numpy(dist_t), torch.from_numpy(mask)


def loss_fn(net: YoloDetector, x: torch.Tensor, targets: List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    raw = net.raw(x)
    box, cls = raw.split((4 * REG_MAX, net.nc), 1)
    cls_t = torch.stack([t[0] for t in targets]).transpose(1, 2)
    dist_t = torch.stack([t[1] for t in targets])  # [B, A, 4]
    mask = torch.stack([t[2] for t in targets])  # [B, A]
    n_pos = mask.sum().clamp(min=1)
    cls_loss = F.binary_cross_entropy_with_logits(cls, cls_t, reduction="sum") / n_pos
    logits = box.view(box.shape[0], 4, REG_MAX, -1).permute(0, 3, 1, 2)[mask]  # [P, 4, REG_MAX]
    target = dist_t[mask].clamp(0, REG_MAX - 1.01)
    lo = target.floor().long()
    w_hi = target - lo
    logp = logits.log_softmax(-1)
    dfl = -(logp.gather(-1, lo[..., None])[..., 0] * (1 - w_hi) + logp.gather(-1, lo[..., None] + 1)[..., 0] * w_hi)
    expected = (logp.exp() * torch.arange(REG_MAX, dtype=torch.float32)).sum(-1)
    return cls_loss + dfl.mean() * 4 + (expected - target).abs().mean()


def batch(rng: np.random.Generator, net: YoloDetector) -> Tuple[torch.Tensor, list]:
    images, targets = [], []
    for _ in range(BATCH):
        img, boxes, labels = detection.scene(rng)
        if rng.uniform() < 0.5:  # horizontal flip
            img = img[:, :, ::-1].copy()
            boxes = np.stack([detection.SIZE - boxes[:, 2], boxes[:, 1], detection.SIZE - boxes[:, 0], boxes[:, 3]], 1)
        images.append(img)
        targets.append(assign(boxes, labels, net.anchors, net.strides, net.nc))
    return torch.from_numpy(np.stack(images)), targets


def train() -> YoloDetector:
    torch.manual_seed(SEED)
    rng = np.random.default_rng(SEED)
    net = YoloDetector()
    optimizer = torch.optim.AdamW(net.parameters(), lr=LR, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, LR, total_steps=STEPS, pct_start=0.1)
    start = time.perf_counter()
    for step in range(1, STEPS + 1):
        net.train()
        x, targets = batch(rng, net)
        optimizer.zero_grad()
        loss = loss_fn(net, x, targets)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step % 50 == 0:
            print(f"step {step}: loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
    return net


def f1_vs_truth(model: onnx.ModelProto, seed: int, n: int) -> float:
    """F1 (IoU 0.5, same class) of the exported model's detections against the scenes' true boxes."""
    rng = np.random.default_rng(seed)
    drawn = [detection.scene(rng) for _ in range(n)]
    found = detection.detect(model, np.stack([d[0] for d in drawn]))
    return detection.f1([(d[1], d[2]) for d in drawn], found)


def fuse_batch_norms(net: nn.Module) -> None:
    """Fold every ConvBlock's BatchNorm into its Conv (as ultralytics does before exporting)."""
    for m in net.modules():
        if isinstance(m, ConvBlock) and isinstance(m.bn, nn.BatchNorm2d):
            m.conv, m.bn = torch.nn.utils.fusion.fuse_conv_bn_eval(m.conv, m.bn), nn.Identity()


def main() -> None:
    torch.set_num_threads(1)
    net = train().eval()
    fuse_batch_norms(net)
    example = torch.from_numpy(detection.scenes(SEED + 1, 1))
    model = zoo.exported(net, (example,), opset=17, dynamic_batch=False, input_names=["images"], output_names=["output0"])
    model.producer_name, model.doc_string = "eptq_onnx zoo", "YOLOv8-style detector on synthetic scenes (160x160, 0..1)"
    score = f1_vs_truth(model, 12345, 64)
    if score < MIN_F1_VS_TRUTH:
        raise RuntimeError(f"detector reached only F1 {score:.3f} against the true boxes (< {MIN_F1_VS_TRUTH})")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, OUT)
    params = sum(p.numel() for p in net.parameters())
    print(f"wrote {OUT.relative_to(ROOT)}: {params} parameters, F1 vs true boxes {score:.3f}")


if __name__ == "__main__":
    main()
