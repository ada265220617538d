"""A stateful LSTM without batch dim (input [seq, feat], state h/c [1, 1, H]), one whole feed per
calibration file: quantized end to end through the CLI and the API, and optimized by EPTQ."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from eptq_onnx import quantize
from eptq_onnx.cli import main
from eptq_onnx.eptq.batches import Batches
from models.zoo_recurrent import stateful_feeds, stateful_lstm, write_feeds
from tests.helpers import init_only

CALIB, HELD_OUT = 8, 4
MIN_SQNR_DB = 25.0  # W8A8 against the float model, every output, on held-out feeds


def _files(folder: Path, state_batch: bool) -> tuple[Path, Path, list]:
    """(model file, calibration folder, held-out feeds) of one variant of the model."""
    model = stateful_lstm(state_batch=state_batch)
    path = folder / "lstm.onnx"
    onnx.save(model, path)
    feeds = stateful_feeds(model, CALIB + HELD_OUT, seed=3)
    return path, write_feeds(folder / "calib", feeds[:CALIB]), feeds[CALIB:]


@pytest.fixture(scope="module")
def lstm(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list]:
    """The model as the issue has it: h and c [1, 1, H], fixed."""
    return _files(tmp_path_factory.mktemp("lstm"), state_batch=False)


@pytest.fixture(scope="module", params=[False, True], ids=["state-fixed", "state-dynamic"])
def variant(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list]:
    """Both variants: h and c fixed, or with dim 0 declared dynamic (every input has a dynamic dim 0)."""
    return _files(tmp_path_factory.mktemp("lstm"), state_batch=request.param)


def _run(path: Path, feeds: list[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [session.run(None, feed) for feed in feeds]


def _assert_close_to_float(float_path: Path, qdq_path: Path, feeds: list[dict[str, np.ndarray]]) -> None:
    """Output SQNR of the QDQ model against the float model (onnxruntime, default optimizations)."""
    ref, got = _run(float_path, feeds), _run(qdq_path, feeds)
    for k, name in enumerate(("out", "hn", "cn")):
        signal = sum(float(np.sum(r[k].astype(np.float64) ** 2)) for r in ref)
        noise = sum(float(np.sum((r[k].astype(np.float64) - g[k]) ** 2)) for r, g in zip(ref, got))
        assert 10 * np.log10(signal / max(noise, 1e-30)) > MIN_SQNR_DB, name


def _cli_report(path: Path, calib: Path, tmp_path: Path, *options: str) -> tuple[Path, dict]:
    """Run the CLI quietly on the model and calibration folder; the written model's path and the report."""
    out, report = tmp_path / "q.onnx", tmp_path / "r.json"
    result = CliRunner().invoke(main, [str(path), str(out), "--calib", str(calib), *options, "--report", str(report), "-q"])
    assert result.exit_code == 0, result.output
    return out, json.loads(report.read_text())


def test_cli_w8a8_writes_a_validated_model(variant: tuple[Path, Path, list], tmp_path: Path) -> None:
    path, calib, held_out = variant
    out, data = _cli_report(path, calib, tmp_path, "--weight-bits", "8", "--act-bits", "8", "--iters", "0")
    assert data["calibration_samples"] == CALIB and data["validation"]["samples"] == CALIB
    assert any("each file is one whole feed" in w for w in data["warnings"])
    _assert_close_to_float(path, out, held_out)


def test_api_w8a8(lstm: tuple[Path, Path, list], tmp_path: Path) -> None:
    path, calib, held_out = lstm
    out = tmp_path / "q.onnx"
    result = quantize(path, calib, init_only(weight_bits=8, act_bits=8), output=out, progress=False)
    assert result.report.validation["samples"] == CALIB
    # the LSTM's weights stay float; the two MatMul/Gemm weights take ort-cpu's U8S8 range (7 bits where
    # onnxruntime here saturates, targets.with_reduce_range)
    u8s8 = result.report.u8s8_range["weight_bits"]
    assert [t.bits for t in result.report.tensors if t.kind == "weight"] == [u8s8, u8s8]
    _assert_close_to_float(path, out, held_out)


def test_short_eptq_run_takes_one_whole_feed_per_step(lstm: tuple[Path, Path, list], tmp_path: Path) -> None:
    path, calib, _ = lstm
    out, data = _cli_report(path, calib, tmp_path, "--iters", "5", "--hessian-samples", "2", "--validation-samples", "4")
    optimization = data["optimization"]
    assert optimization["iters"] == 5
    # 8 feeds, the last 2 held out for the keep-or-discard check
    assert "each step takes one whole feed of the 6" in optimization["why"]
    assert (optimization["check_samples"], optimization["check_held_out"]) == (2, True)
    assert out.exists()


def test_unstacked_minibatches_are_whole_feeds() -> None:
    """Two feeds of equal shapes are not stacked (h would be [2, 1, 16]); a draw is one of them."""
    feeds = [{"input": np.full((4, 3), i, np.float32), "h": np.full((1, 1, 2), i, np.float32)} for i in range(2)]
    batches = Batches(iter(feeds), "cpu", seed=0, stack=False)
    assert batches.stacked is None and batches.count == 2
    for _ in range(4):
        index, drawn = batches.sample(32)
        assert index is None and tuple(drawn["input"].shape) == (4, 3) and tuple(drawn["h"].shape) == (1, 1, 2)
        assert float(drawn["h"].flatten()[0]) == float(drawn["input"].flatten()[0])
    assert Batches(iter(feeds), "cpu", seed=0).stacked["h"].shape == (2, 1, 2)
