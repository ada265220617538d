"""Train a second real-label model, a tiny ViT-style transformer on sklearn digits, and write models/digits_vit/.

Run ``python models/build_digits_vit.py``. Deterministic (fixed seeds, one thread); takes well under two minutes.
The 8x8 digit becomes 16 patches of 2x2 (a stride-2 Conv), plus learned position embeddings, two pre-norm
encoder blocks (LayerNorm, 4-head self-attention, GELU MLP; the zoo's transformer block), a final LayerNorm,
mean pooling over tokens and a Linear head. Same train/test split as the demo model (models/build_demo.py).
Outputs: ``digits_vit.onnx`` (opset 17, IR version 8, dynamic batch, input "image" [N,1,8,8], output "logits"),
``calib/NNNN.npy`` (256 training images, one [1,8,8] float32 sample each) and ``test.npz`` ("image", "label").
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: make `models` importable

from models import zoo  # noqa: E402
from models.build_demo import N_CALIB, evaluate_torch, run_build, write_bundle  # noqa: E402

VIT_DIR = ROOT / "models" / "digits_vit"
MEAN, STD = 0.3053, 0.3760  # mean/std of all 8x8 digits (pixel values / 16), fixed for reproducibility
PATCH, DIM, HEADS, HIDDEN, DEPTH = 2, 32, 4, 64, 2
TOKENS = (8 // PATCH) ** 2
EPOCHS, BATCH, LR, WEIGHT_DECAY = 200, 64, 3e-3, 0.05
TARGET_ACCURACY = 0.95
OPSET, IR_VERSION = 17, 8
SEED = 0


class DigitsViT(nn.Module):
    """Patch embedding (Conv, stride = patch) + position embedding -> pre-norm blocks -> LayerNorm -> mean -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(1, DIM, PATCH, stride=PATCH)
        self.position = nn.Parameter(0.02 * torch.randn(1, TOKENS, DIM))
        self.blocks = nn.Sequential(*(zoo._TransformerBlock(TOKENS, DIM, HEADS, HIDDEN) for _ in range(DEPTH)))
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2) + self.position  # [N, TOKENS, DIM]
        return self.head(self.norm(self.blocks(tokens)).mean(dim=1))


def load_images() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits as normalized [N,1,8,8] float32 and int64 labels."""
    digits = load_digits()
    images = (digits.images[:, None].astype(np.float32) / 16.0 - MEAN) / STD
    return images.astype(np.float32), digits.target.astype(np.int64)


def train(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> nn.Module:
    """AdamW with cosine decay and light augmentation (random 1-pixel shifts); fails if the test accuracy is too low."""
    torch.manual_seed(SEED)
    net = DigitsViT()
    optimizer = torch.optim.AdamW(net.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, EPOCHS)
    x, y = torch.from_numpy(train_x), torch.from_numpy(train_y)
    background = float(-MEAN / STD)  # a blank pixel after normalization
    generator = torch.Generator().manual_seed(SEED)
    for epoch in range(1, EPOCHS + 1):
        net.train()
        for batch in torch.randperm(len(x), generator=generator).split(BATCH):
            dy, dx = (int(v) for v in torch.randint(-1, 2, (2,), generator=generator))
            shifted = F.pad(x[batch], (1, 1, 1, 1), value=background)[:, :, 1 + dy : 9 + dy, 1 + dx : 9 + dx]
            optimizer.zero_grad()
            F.cross_entropy(net(shifted), y[batch], label_smoothing=0.1).backward()
            optimizer.step()
        scheduler.step()
        if epoch % 20 == 0 or epoch == EPOCHS:
            acc = evaluate_torch(net, test_x, test_y)
            print(f"epoch {epoch:2d}: test accuracy {acc:.4f}")
    if acc < TARGET_ACCURACY:
        raise RuntimeError(f"digits ViT reached only {acc:.2%} test accuracy (< {TARGET_ACCURACY:.0%})")
    return net


def write_outputs(net: nn.Module, train_x: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> Path:
    """Write the ONNX model, the calibration folder and the test set; return the model path."""
    model = zoo.exported(net, (torch.from_numpy(train_x[:2]),), opset=OPSET, input_names=["image"], output_names=["logits"])
    model.ir_version = IR_VERSION
    model.producer_name, model.doc_string = "eptq_onnx digits ViT", "Tiny ViT on sklearn digits (8x8, normalized)"
    onnx.checker.check_model(model)
    return write_bundle(model, VIT_DIR / "digits_vit.onnx", train_x[:N_CALIB], test_x, test_y)


def main() -> None:
    run_build(load_images, train, write_outputs, VIT_DIR / "test.npz")


if __name__ == "__main__":
    main()
