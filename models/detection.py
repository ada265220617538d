"""Synthetic scenes and detection scoring for the zoo's YOLOv8-style detector (models/yolo_det/).

A scene is a 160x160 RGB image in [0, 1] (cluttered gradient background) holding one to four objects of
three classes: a filled rectangle, a hollow rectangle (a frame) and a filled ellipse. The detector's
output is YOLOv8's: ``[N, 4 + classes, anchors]``, box centre x, y, width, height in pixels, then the
class probabilities. :func:`decode` turns one image's output into boxes (score threshold, class-wise
NMS) and :func:`f1_against_float` scores a quantized model by the F1 of its detections against the
float model's own detections at IoU 0.5 (numpy, onnxruntime CPU).
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Sequence, Tuple, Union

import numpy as np
import onnx
import onnxruntime as ort

from tools.corpuslib.metrics import detection_f1, nms

SIZE = 160
CLASSES = ("rectangle", "frame", "ellipse")
MIN_SIDE, MAX_SIDE = 12, 90
MAX_OBJECTS = 4
SCORE_THRESHOLD, NMS_IOU = 0.25, 0.5

Detections = Tuple[np.ndarray, np.ndarray]  # boxes [K, 4] (x1, y1, x2, y2), labels [K]


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A colour gradient with noise and a few thin random lines (clutter that is not an object)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    a, b, c = rng.uniform(0.1, 0.6, (3, 3, 1, 1)).astype(np.float32)
    img = a + (b - a) * xx[None] * rng.uniform(0, 1) + (c - a) * yy[None] * rng.uniform(0, 1)
    img = img + rng.normal(0, 0.03, img.shape).astype(np.float32)
    for _ in range(int(rng.integers(0, 4))):
        colour = rng.uniform(0, 1, (3, 1)).astype(np.float32)
        if rng.uniform() < 0.5:
            img[:, int(rng.integers(0, size)), int(rng.integers(0, size // 2)):int(rng.integers(size // 2, size))] = colour
        else:
            img[:, int(rng.integers(0, size // 2)):int(rng.integers(size // 2, size)), int(rng.integers(0, size))] = colour
    return img


def _overlaps(box: np.ndarray, others: List[np.ndarray]) -> bool:
    return any(min(box[2], o[2]) > max(box[0], o[0]) - 4 and min(box[3], o[3]) > max(box[1], o[1]) - 4 for o in others)


def scene(rng: np.random.Generator, size: int = SIZE) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image [3, size, size] float32 in [0, 1], its boxes [K, 4] (x1, y1, x2, y2) and labels [K]."""
    img = _background(rng, size)
    boxes: List[np.ndarray] = []
    labels: List[int] = []
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    wanted = int(rng.integers(1, MAX_OBJECTS + 1))
    for _ in range(3 * MAX_OBJECTS):
        if len(boxes) == wanted:
            break
        w, h = rng.integers(MIN_SIDE, MAX_SIDE, 2)
        x1, y1 = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
        box = np.array([x1, y1, x1 + w, y1 + h], np.float32)
        if _overlaps(box, boxes):
            continue
        label = int(rng.integers(0, len(CLASSES)))
        colour = rng.uniform(0, 1, (3, 1)).astype(np.float32)
        while np.abs(colour - img[:, y1:y1 + h, x1:x1 + w].mean(axis=(1, 2))[:, None]).max() < 0.3:
            colour = rng.uniform(0, 1, (3, 1)).astype(np.float32)
        if label == 0:
            mask = np.zeros((size, size), bool)
            mask[y1:y1 + h, x1:x1 + w] = True
        elif label == 1:
            t = max(2, int(min(w, h) // 6))
            mask = np.zeros((size, size), bool)
            mask[y1:y1 + h, x1:x1 + w] = True
            mask[y1 + t:y1 + h - t, x1 + t:x1 + w - t] = False
        else:
            cx, cy = x1 + w / 2, y1 + h / 2
            mask = ((xx - cx) / (w / 2)) ** 2 + ((yy - cy) / (h / 2)) ** 2 <= 1.0
        img[:, mask] = colour
        boxes.append(box)
        labels.append(label)
    return np.clip(img, 0, 1).astype(np.float32), np.array(boxes, np.float32).reshape(-1, 4), np.array(labels, np.int64)


def scenes(seed: int, n: int, size: int = SIZE) -> np.ndarray:
    """``n`` scene images [n, 3, size, size] from one seed (the boxes are not needed to compare models)."""
    rng = np.random.default_rng(seed)
    return np.stack([scene(rng, size)[0] for _ in range(n)])


def decode(pred: np.ndarray, score_threshold: float = SCORE_THRESHOLD, iou: float = NMS_IOU) -> Detections:
    """Boxes and labels of one image's output [4 + classes, anchors]: best class over the score threshold,
    class-wise NMS."""
    p = np.asarray(pred, np.float64)
    xywh, probs = p[:4].T, p[4:].T
    labels, scores = probs.argmax(axis=1), probs.max(axis=1)
    keep = scores > score_threshold
    xywh, labels, scores = xywh[keep], labels[keep], scores[keep]
    boxes = np.concatenate([xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2], axis=1)
    kept = [i for c in np.unique(labels) for i in np.flatnonzero(labels == c)[nms(boxes[labels == c], scores[labels == c], iou)]]
    return boxes[kept], labels[kept]


def detect(model: Union[str, Path, onnx.ModelProto], images: np.ndarray) -> List[Detections]:
    """The detections of a detector (path or ModelProto; first input, first output) on every image."""
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return [decode(session.run(None, {name: img[None]})[0][0]) for img in images]


def f1(reference: Sequence[Detections], test: Sequence[Detections], iou: float = 0.5) -> float:
    """Detection F1 of ``test`` against ``reference`` (same class, IoU >= ``iou``), over all images."""
    return detection_f1([[tuple(b) for b in r[0]] for r in reference], [[tuple(b) for b in t[0]] for t in test], iou,
                        [list(r[1]) for r in reference], [list(t[1]) for t in test])


def f1_against_float(float_model: Union[str, Path, onnx.ModelProto], model: Union[str, Path, onnx.ModelProto],
                     images: np.ndarray) -> float:
    """F1 at IoU 0.5 of ``model``'s detections against ``float_model``'s own detections on ``images``."""
    return f1(detect(float_model, images), detect(model, images))
