"""The zoo's YOLOv8-style detector (models/yolo_det/, built by models/build_yolo_det.py) at W8A8.

Its float model finds the objects of synthetic scenes; the W8A8 model (--iters 0, default target
ort-cpu) must find the same ones: detection F1 against the float model's own detections at IoU 0.5
(models/detection.py, numpy decode and NMS, onnxruntime with default options), and compute the head
after its last quantized layer (box decode, Sigmoid scores, their output Concat) in float.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from eptq_onnx import quantize
from models import detection
from tests.helpers import init_only

DETECTOR = Path(__file__).resolve().parents[1] / "models" / "yolo_det" / "yolo_det.onnx"
MIN_F1_VS_FLOAT = 0.95
CALIB_SEED, TEST_SEED = 101, 202


@pytest.fixture(scope="module")
def test_images() -> np.ndarray:
    return detection.scenes(TEST_SEED, 48)


def _truth(seed: int, n: int) -> list:
    rng = np.random.default_rng(seed)
    return [detection.scene(rng)[1:] for _ in range(n)]


def test_float_detector_finds_the_objects() -> None:
    found = detection.detect(DETECTOR, detection.scenes(TEST_SEED, 48))
    assert detection.f1(_truth(TEST_SEED, 48), found) >= 0.7
    assert sum(len(b) for b, _ in found) >= 48


def test_decode_keeps_the_best_box_per_object() -> None:
    # anchors (columns): two on one object of class 1 (the better one wins), one of class 0, one below the threshold
    pred = np.array([[50, 50, 150, 20], [52, 50, 150, 20], [30, 30, 30, 10], [30, 30, 30, 10],  # cx, cy, w, h
                     [0.1, 0.05, 0.9, 0.1], [0.8, 0.9, 0.0, 0.2], [0.0, 0.0, 0.0, 0.0]], np.float32)
    boxes, labels = detection.decode(pred)
    assert sorted(labels.tolist()) == [0, 1]
    np.testing.assert_allclose(boxes[labels == 1][0], [35, 35, 65, 65])
    np.testing.assert_allclose(boxes[labels == 0][0], [135, 135, 165, 165])


def test_w8a8_detections_match_the_float_model(tmp_path: Path, test_images: np.ndarray) -> None:
    calib = tmp_path / "calib"
    calib.mkdir()
    for i, img in enumerate(detection.scenes(CALIB_SEED, 32)):
        np.save(calib / f"{i:03d}.npy", img)
    result = quantize(DETECTOR, calib, init_only(weight_bits=8, act_bits=8), output=tmp_path / "q.onnx", progress=False)
    f1 = detection.f1_against_float(DETECTOR, tmp_path / "q.onnx", test_images)
    assert f1 >= MIN_F1_VS_FLOAT, f"W8A8 detection F1 against the float model {f1:.3f}"
    written = onnx.load(tmp_path / "q.onnx")
    producer = {o: n for n in written.graph.node for o in n.output}
    # the head after the last quantized layer stays float: box decode, Sigmoid scores and their Concat
    assert producer["output0"].op_type == "Concat"
    assert [producer[i].op_type for i in producer["output0"].input] == ["Mul", "Sigmoid"]
    assert not result.report.validation.get("failed")
