"""Evaluate demo models on the bundled digits test set with onnxruntime CPU.

Usage: ``python models/demo/evaluate.py [--test-set TEST.npz] FLOAT.onnx [QUANTIZED.onnx ...]`` prints, per model,
top-1 accuracy on the test set (default: the demo's ``test.npz``; e.g. ``models/digits_vit/test.npz`` for the digits
ViT) and agreement of its predictions with the first (float) model's.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

TEST_SET = Path(__file__).resolve().parent / "test.npz"


def load_test_set(path: str | Path = TEST_SET) -> tuple[np.ndarray, np.ndarray]:
    """Test images (demo: [500,1,32,32]) float32 and labels [500] int64 of an .npz with "image" and "label"."""
    with np.load(path) as data:
        return data["image"], data["label"]


def predictions(model_path: str | Path, images: np.ndarray) -> np.ndarray:
    """Arg-max class of the model's first output for every image (chunked if the batch dim is fixed)."""
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    feed = session.get_inputs()[0]
    batch = feed.shape[0] if isinstance(feed.shape[0], int) and feed.shape[0] > 0 else len(images)
    chunks = [
        session.run(None, {feed.name: images[i : i + batch]})[0].argmax(axis=1)
        for i in range(0, len(images), batch)
    ]
    return np.concatenate(chunks)


def accuracy(model_path: str | Path, test_set: str | Path = TEST_SET) -> float:
    """Top-1 accuracy of an ONNX model on a test set (default: the bundled demo test set)."""
    images, labels = load_test_set(test_set)
    return float((predictions(model_path, images) == labels).mean())


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    test_set: str | Path = TEST_SET
    if argv[0] == "--test-set":
        if len(argv) < 3:
            print("evaluate.py: --test-set needs a path and at least one model", file=sys.stderr)
            return 2
        test_set, argv = argv[1], argv[2:]
    for path in (*argv, test_set):
        if not Path(path).is_file():
            print(f"evaluate.py: no such file: {path}", file=sys.stderr)
            return 1
    images, labels = load_test_set(test_set)
    reference = predictions(argv[0], images)
    width = max(len("model"), *(len(p) for p in argv))
    print(f"{'model':<{width}}  top-1   agree")
    for path in argv:
        predicted = reference if path == argv[0] else predictions(path, images)
        top1, agree = (predicted == labels).mean(), (predicted == reference).mean()
        print(f"{path:<{width}}  {top1:6.2%}  {agree:6.2%}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
