"""Fidelity metrics of a quantized model against its float model, shared by every corpus entry.

Every metric compares the quantized model's outputs with the float model's outputs on the same
held-out inputs (the float model is the reference, no labels are needed). Each function takes
plain numpy arrays and returns floats, so that the tests can check them on tiny hand-made arrays.
"""
from __future__ import annotations

from typing import Iterable, List, Sequence, Tuple

import numpy as np

Box = Tuple[float, float, float, float]  # x1, y1, x2, y2


def agreement(a: Sequence[int] | np.ndarray, b: Sequence[int] | np.ndarray) -> float:
    """Fraction of positions where two label arrays are equal (1.0 for two empty arrays)."""
    a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
    if a.shape != b.shape:
        raise ValueError(f"label arrays differ in size: {a.shape} vs {b.shape}")
    return 1.0 if a.size == 0 else float(np.mean(a == b))


def top1(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Arg-max labels along ``axis``."""
    return np.argmax(np.asarray(logits), axis=axis)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of the rows of two arrays (last axis is the vector); 1.0 where both are zero."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    num = np.sum(a * b, axis=-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    both_zero = den == 0
    return np.where(both_zero, 1.0, num / np.where(both_zero, 1.0, den))


def sqnr_db(reference: np.ndarray, test: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio of ``test`` against ``reference`` in dB (inf when equal)."""
    ref, err = np.asarray(reference, np.float64), np.asarray(test, np.float64) - np.asarray(reference, np.float64)
    noise = float(np.sum(err * err))
    if noise == 0.0:
        return float("inf")
    return float(10.0 * np.log10(max(float(np.sum(ref * ref)), 1e-30) / noise))


def ctc_greedy(ids: Sequence[int] | np.ndarray, blank: int | None = 0) -> List[int]:
    """Greedy CTC decoding of per-frame arg-max ids: collapse repeats, then drop the blank."""
    out: List[int] = []
    prev = None
    for idx in np.asarray(ids).ravel().tolist():
        idx = int(idx)
        if idx != prev and idx != blank:
            out.append(idx)
        prev = idx
    return out


def edit_distance(a: Sequence[int], b: Sequence[int]) -> int:
    """Levenshtein distance between two sequences."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def sequence_scores(reference: Iterable[Sequence[int]], test: Iterable[Sequence[int]]) -> dict:
    """Exact agreement of decoded sequences, and character agreement 1 - edits / reference length."""
    ref, tst = list(map(list, reference)), list(map(list, test))
    exact = float(np.mean([r == t for r, t in zip(ref, tst)])) if ref else 1.0
    edits = sum(edit_distance(r, t) for r, t in zip(ref, tst))
    chars = sum(max(len(r), 1) for r in ref)
    return {"exact": exact, "char": 1.0 - edits / chars if chars else 1.0}


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two x1, y1, x2, y2 boxes."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def match_count(reference: Sequence[Box], test: Sequence[Box], threshold: float = 0.5,
                ref_labels: Sequence[int] | None = None, test_labels: Sequence[int] | None = None) -> int:
    """Greedy one-to-one matching (highest IoU first) of boxes with IoU >= threshold (and equal labels)."""
    pairs = []
    for i, r in enumerate(reference):
        for j, t in enumerate(test):
            if ref_labels is not None and test_labels is not None and ref_labels[i] != test_labels[j]:
                continue
            overlap = iou(r, t)
            if overlap >= threshold:
                pairs.append((overlap, i, j))
    used_r, used_t, matched = set(), set(), 0
    for _, i, j in sorted(pairs, reverse=True):
        if i not in used_r and j not in used_t:
            used_r.add(i)
            used_t.add(j)
            matched += 1
    return matched


def detection_f1(reference: Sequence[Sequence[Box]], test: Sequence[Sequence[Box]], threshold: float = 0.5,
                 ref_labels: Sequence[Sequence[int]] | None = None,
                 test_labels: Sequence[Sequence[int]] | None = None) -> float:
    """F1 of ``test``'s boxes against ``reference``'s over all images, micro-averaged (1.0 if both empty)."""
    matched = n_ref = n_test = 0
    for k, (r, t) in enumerate(zip(reference, test)):
        rl = None if ref_labels is None else ref_labels[k]
        tl = None if test_labels is None else test_labels[k]
        matched += match_count(r, t, threshold, rl, tl)
        n_ref += len(r)
        n_test += len(t)
    if n_ref + n_test == 0:
        return 1.0
    return 2.0 * matched / (n_ref + n_test)


def prob_map_boxes(prob: np.ndarray, threshold: float = 0.3, min_area: int = 10) -> List[Box]:
    """Bounding boxes of the connected components of ``prob > threshold`` (a 2-D map) with >= min_area pixels."""
    from scipy import ndimage

    labels, count = ndimage.label(np.asarray(prob) > threshold)
    boxes: List[Box] = []
    if count == 0:
        return boxes
    areas = ndimage.sum_labels(np.ones_like(labels), labels, index=np.arange(1, count + 1))
    for k, region in enumerate(ndimage.find_objects(labels)):
        if region is not None and areas[k] >= min_area:
            ys, xs = region
            boxes.append((float(xs.start), float(ys.start), float(xs.stop), float(ys.stop)))
    return boxes


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> List[int]:
    """Indices kept by greedy non-maximum suppression (highest score first, IoU > threshold suppressed)."""
    order = np.argsort(-np.asarray(scores), kind="stable")
    keep: List[int] = []
    while order.size:
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        xx1 = np.maximum(boxes[i, 0], boxes[rest, 0])
        yy1 = np.maximum(boxes[i, 1], boxes[rest, 1])
        xx2 = np.minimum(boxes[i, 2], boxes[rest, 2])
        yy2 = np.minimum(boxes[i, 3], boxes[rest, 3])
        inter = np.maximum(0.0, xx2 - xx1) * np.maximum(0.0, yy2 - yy1)
        area = lambda b: np.maximum(0.0, b[..., 2] - b[..., 0]) * np.maximum(0.0, b[..., 3] - b[..., 1])  # noqa: E731
        overlap = inter / np.maximum(area(boxes[i]) + area(boxes[rest]) - inter, 1e-9)
        order = rest[overlap <= threshold]
    return keep


def binary_agreement(reference: np.ndarray, test: np.ndarray, threshold: float) -> float:
    """Fraction of elements on the same side of ``threshold`` in both arrays (frame x pitch activations)."""
    return agreement(np.asarray(reference) > threshold, np.asarray(test) > threshold)
