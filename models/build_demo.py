"""Train the bundled demo model (a small residual CNN on sklearn digits) and write models/demo/.

Run ``python models/build_demo.py``. Deterministic (fixed seeds, one thread); takes well under two minutes.
Outputs: ``digits_resnet.onnx`` (opset 13, dynamic batch, BatchNorm not folded), ``calib/NNNN.npy``
(256 training images, one [1,32,32] float32 sample each) and ``test.npz`` ("image", "label").
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: make `models` importable

from models import zoo  # noqa: E402
from models.demo.evaluate import accuracy  # noqa: E402

DEMO_DIR = ROOT / "models" / "demo"
SIZE = 32
MEAN, STD = 0.3053, 0.3236  # mean/std of all upscaled digits (pixel values / 16), fixed for reproducibility
N_TEST, N_CALIB = 500, 256
WIDTHS = (32, 64, 128)
EPOCHS, BATCH, LR = 10, 64, 3e-3
TARGET_ACCURACY = 0.97
SEED = 0


def load_images() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits as normalized [N,1,32,32] float32 (bilinear upscale) and int64 labels."""
    digits = load_digits()
    small = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    big = F.interpolate(small, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    return ((big - MEAN) / STD).numpy().astype(np.float32), digits.target.astype(np.int64)


def split(images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Fixed shuffled split: the first N_TEST samples are the test set, the rest (1297) the training set."""
    order = np.random.default_rng(SEED).permutation(len(images))
    test, train = order[:N_TEST], order[N_TEST:]
    return images[train], labels[train], images[test], labels[test]


def evaluate_torch(net: torch.nn.Module, images: np.ndarray, labels: np.ndarray) -> float:
    net.eval()
    with torch.no_grad():
        predicted = net(torch.from_numpy(images)).argmax(1).numpy()
    return float((predicted == labels).mean())


def train(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> torch.nn.Module:
    """A fixed number of Adam epochs with cosine LR decay; fails if the final test accuracy is too low."""
    torch.manual_seed(SEED)
    net = zoo.ResidualCNN(1, WIDTHS, 10)
    optimizer = torch.optim.Adam(net.parameters(), lr=LR)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, EPOCHS)
    x, y = torch.from_numpy(train_x), torch.from_numpy(train_y)
    generator = torch.Generator().manual_seed(SEED)
    for epoch in range(1, EPOCHS + 1):
        net.train()
        for batch in torch.randperm(len(x), generator=generator).split(BATCH):
            optimizer.zero_grad()
            F.cross_entropy(net(x[batch]), y[batch]).backward()
            optimizer.step()
        scheduler.step()
        acc = evaluate_torch(net, test_x, test_y)
        print(f"epoch {epoch:2d}: test accuracy {acc:.4f}")
    if acc < TARGET_ACCURACY:
        raise RuntimeError(f"demo model reached only {acc:.2%} test accuracy (< {TARGET_ACCURACY:.0%})")
    return net


def write_outputs(net: torch.nn.Module, train_x: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> Path:
    """Write the ONNX model, the calibration folder and the test set; return the model path."""
    DEMO_DIR.mkdir(parents=True, exist_ok=True)
    model = zoo.exported(
        net, (torch.from_numpy(train_x[:2]),), opset=13, input_names=["image"], output_names=["logits"]
    )
    model.producer_name, model.doc_string = "eptq_onnx demo", "Residual CNN on sklearn digits (32x32, normalized)"
    return write_bundle(model, DEMO_DIR / "digits_resnet.onnx", train_x[:N_CALIB], test_x, test_y)


def write_bundle(model: onnx.ModelProto, model_path: Path, calib: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> Path:
    """Write the model, a calib/ folder beside it (one .npy sample per file) and test.npz; return the model path."""
    model_path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, model_path)
    calib_dir = model_path.parent / "calib"
    calib_dir.mkdir(exist_ok=True)
    for stale in calib_dir.glob("*.npy"):
        stale.unlink()
    for i, sample in enumerate(calib):
        np.save(calib_dir / f"{i:04d}.npy", sample)
    np.savez_compressed(model_path.parent / "test.npz", image=test_x, label=test_y)
    return model_path


def run_build(load, train_fn, write_fn, test_set: Path) -> None:
    """Load digits, train, write the bundle and print what was written (shared by the build scripts)."""
    start = time.perf_counter()
    torch.set_num_threads(1)
    train_x, train_y, test_x, test_y = split(*load())
    net = train_fn(train_x, train_y, test_x, test_y)
    model_path = write_fn(net, train_x, test_x, test_y)
    params = sum(p.numel() for p in net.parameters())
    print(
        f"wrote {model_path.relative_to(ROOT)}: {params} parameters, onnxruntime test accuracy "
        f"{accuracy(model_path, test_set):.4f} ({time.perf_counter() - start:.0f} s)"
    )


def main() -> None:
    run_build(load_images, train, write_outputs, DEMO_DIR / "test.npz")


if __name__ == "__main__":
    main()
