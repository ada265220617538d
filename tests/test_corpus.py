"""The real-model corpus (tools/corpus.py).

The unmarked tests check the corpus's metrics and report on tiny hand-made arrays (hand-computed
expectations), so the default suite exercises its logic. The ``corpus`` tests quantize every fetched
corpus model at W8A8 --iters 0 and assert the issue's thresholds; they need ``tools/corpus.py fetch``
first and skip with the reason otherwise (run with ``pytest -m corpus tests/test_corpus.py``).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from tools.corpuslib import metrics as M
from tools.corpuslib import models as corpus
from tools.corpuslib import runner


def test_ctc_greedy_collapses_repeats_then_drops_blanks() -> None:
    assert M.ctc_greedy([0, 3, 3, 0, 3, 5, 5, 0, 0]) == [3, 3, 5]
    assert M.ctc_greedy(np.array([[7, 7, 7]])) == [7]
    assert M.ctc_greedy([]) == []


def test_sequence_scores_exact_and_char() -> None:
    s = M.sequence_scores([[1, 2, 3], [4, 5]], [[1, 2, 3], [4, 6]])
    assert s["exact"] == 0.5
    assert s["char"] == pytest.approx(1 - 1 / 5)  # one substitution over five reference characters
    assert M.edit_distance([1, 2, 3], [2, 3]) == 1 and M.edit_distance([], [1, 1]) == 2


def test_detection_f1_matches_one_to_one_at_iou_half() -> None:
    ref = [[(0, 0, 10, 10), (20, 20, 30, 30)]]
    test = [[(1, 1, 10, 10), (50, 50, 60, 60)]]  # IoU 81/100 with the first, nothing near the second
    assert M.iou(ref[0][0], test[0][0]) == pytest.approx(0.81)
    assert M.detection_f1(ref, test) == pytest.approx(0.5)  # 2 * 1 matched / (2 + 2)
    assert M.detection_f1(ref, test, ref_labels=[[0, 1]], test_labels=[[1, 1]]) == 0.0  # wrong class
    assert M.detection_f1([[(0, 0, 10, 10)]], [[(0, 0, 10, 10), (0, 0, 10, 10)]]) == pytest.approx(2 / 3)
    assert M.detection_f1([[]], [[]]) == 1.0


def test_prob_map_boxes_are_component_bounds_above_min_area() -> None:
    prob = np.zeros((20, 30), np.float32)
    prob[2:6, 3:10] = 0.9  # 4 x 7 = 28 px
    prob[15:17, 20:22] = 0.8  # 4 px: below min_area
    prob[10, 0:30] = 0.2  # under the threshold
    assert M.prob_map_boxes(prob, 0.3, 10) == [(3.0, 2.0, 10.0, 6.0)]


def test_agreement_cosine_sqnr_binary() -> None:
    assert M.agreement([1, 2, 3, 4], [1, 2, 0, 4]) == 0.75
    assert M.cosine(np.array([[1.0, 0.0], [0.0, 0.0]]), np.array([[1.0, 1.0], [0.0, 0.0]])) == pytest.approx(
        [1 / math.sqrt(2), 1.0])
    assert M.sqnr_db(np.ones(100), np.ones(100) * 1.1) == pytest.approx(20.0)
    assert M.binary_agreement(np.array([0.1, 0.6, 0.7]), np.array([0.2, 0.4, 0.9]), 0.5) == pytest.approx(2 / 3)


def test_yolox_decode_grid_stride_exp_and_nms() -> None:
    pred = np.zeros((3549, 6), np.float32)  # 52*52 + 26*26 + 13*13 anchors of a 416 input
    pred[:, 4] = 0.0  # objectness 0: nothing
    row = 3 * 52 + 2  # stride 8, grid x 2, y 3
    pred[row] = [0.5, 0.5, math.log(2), math.log(2), 1.0, 0.9]
    pred[row + 1] = [-0.5, 0.5, math.log(2), math.log(2), 1.0, 0.5]  # same box one grid cell right: suppressed
    boxes = corpus.yolox_decode(pred)
    assert len(boxes) == 1
    assert boxes[0] == pytest.approx((12.0, 20.0, 28.0, 36.0))  # centre (2.5, 3.5) * 8, size 2 * 8


def test_basic_pitch_frame_agreement_is_per_frame_set_equality() -> None:
    note = np.zeros((1, 4, 88), np.float32)
    note[0, 0, 40] = note[0, 1, 41] = 0.9
    other = note.copy()
    other[0, 1, 42] = 0.6  # frame 1 gains a pitch
    ref, test = [{corpus.BP_NOTE: note}], [{corpus.BP_NOTE: other}]
    s = corpus.score_basic_pitch(None, ref, test)
    assert s["frames"] == 0.75 and s["cells"] == pytest.approx(1 - 1 / (4 * 88))


def test_crepe_voiced_frames_keep_voicing_and_pitch_within_two_bins() -> None:
    def frames(peaks: list) -> np.ndarray:
        out = np.full((len(peaks), 360), 1e-3, np.float32)
        for i, (b, p) in enumerate(peaks):
            out[i, b] = p
        return out

    ref = [{"p": frames([(100, 0.9), (100, 0.9), (100, 0.9), (100, 0.9), (50, 0.1)])}]  # the last: unvoiced
    test = [{"p": frames([(100, 0.8), (102, 0.8), (103, 0.8), (100, 0.1), (200, 0.1)])}]
    s = corpus.score_crepe(None, ref, test)
    # kept: same bin, 2 bins off; lost: 3 bins off, no longer voiced; the unvoiced frame does not count
    assert s["voiced"] == 0.5 and s["voiced_share"] == 0.8 and s["frames"] == pytest.approx(2 / 5)


def test_ctc_scores_of_probability_outputs() -> None:
    def onehot(ids: list) -> np.ndarray:
        return np.eye(5, dtype=np.float32)[ids][None]

    ref = [{"y": onehot([0, 2, 2, 0, 3])}, {"y": onehot([1, 0, 1])}]
    test = [{"y": onehot([2, 2, 0, 0, 3])}, {"y": onehot([1, 1, 1])}]  # same string; 'a a' -> 'a'
    s = corpus.score_ctc_probs(None, ref, test)
    assert s["exact"] == 0.5 and s["char"] == pytest.approx(1 - 1 / 4)


def _result(model: str, setting: str, value: float | None, rc: int = 0) -> runner.Result:
    entry = corpus.BY_NAME[model]
    return runner.Result(model, setting, rc=rc, wall_s=1.0, peak_rss_mb=100.0, size_mb=0.5,
                         metrics={} if value is None else {entry.metric: value},
                         error="" if rc == 0 else "error: boom | pipe")


def test_verdicts_and_report() -> None:
    results = {
        "ppocrv5_cls": [_result("ppocrv5_cls", "w8a8", 0.995), _result("ppocrv5_cls", "ort_minmax", 0.97),
                        _result("ppocrv5_cls", "ort_percentile", 0.999)],
        "ppocrv5_det": [_result("ppocrv5_det", "w8a8", None, rc=5), _result("ppocrv5_det", "w8a8_target", 0.96),
                        _result("ppocrv5_det", "ort_minmax", 0.9)],
    }
    assert runner.verdicts(corpus.BY_NAME["ppocrv5_cls"], results["ppocrv5_cls"]) == {
        "meets_w8a8": True, "ours_ge_ort": False, "meets_w8a8_target": None}
    assert runner.verdicts(corpus.BY_NAME["ppocrv5_det"], results["ppocrv5_det"]) == {
        "meets_w8a8": False, "ours_ge_ort": False, "meets_w8a8_target": True}
    meta = {"command": "x", "commit": "abc", "date": "d", "machine": "m", "time_budget": "3",
            "settings": ["w8a8", "ort_minmax", "ort_percentile"]}
    text = runner.render(results, meta, {"resemblyzer": "not fetched"})
    assert "**W8A8 thresholds met by 1 of 2 models** (ppocrv5_cls)" in text
    assert "`--min-sqnr 30`" in text and "**W8A8 thresholds met by 1 of 2** (ppocrv5_det)" in text
    assert "| ppocrv5_det | PaddlePaddle (paddle2onnx) | f1 (0.95) | fail (exit 5) |" in text
    assert "error: boom / pipe" in text and "resemblyzer: not fetched" in text
    js = runner.to_json(results, meta, {})
    assert js["models"]["ppocrv5_det"]["results"][0]["rc"] == 5
    for rows in results.values():
        for r in rows:
            r.commit = "abc"
    assert "another commit" not in runner.render(results, meta, {})
    results["ppocrv5_det"][1].commit = "old1"
    text = runner.render(results, meta, {})
    assert "**Rows run at another commit** (kept by `--rerun`): old1: ppocrv5_det w8a8_target" in text
    assert "| -x | old1 | - |" in text and "| -x | abc | - |" in text


def test_feeds_roundtrip(tmp_path: Path) -> None:
    feeds = [{"x": np.ones((1, 2), np.float32)}, {"x": np.zeros((1, 2), np.float32)}]
    runner.write_feeds(tmp_path / "one", feeds)
    runner.write_feeds(tmp_path / "two", [{"a": np.ones(2, np.int64), "b": np.zeros(1, bool)}])
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["000.npy", "001.npy"]
    back = runner.read_feeds(tmp_path / "one")
    assert np.array_equal(back[0][""], feeds[0]["x"]) and np.array_equal(back[1][""], feeds[1]["x"])
    two = runner.read_feeds(tmp_path / "two")[0]
    assert two["a"].dtype == np.int64 and two["b"].dtype == bool


def test_quantize_commands(tmp_path: Path) -> None:
    ctx = corpus.Ctx(root=tmp_path, model=tmp_path / "m.onnx", cache=tmp_path)
    w8 = runner.quantize_command("w8a8", ctx, tmp_path / "calib", tmp_path / "o.onnx", 3.0)
    assert w8[0] == "eptq_onnx.cli" and w8[-6:] == ["--weight-bits", "8", "--act-bits", "8", "--iters", "0"]
    eptq = runner.quantize_command("eptq", ctx, tmp_path / "calib", tmp_path / "o.onnx", 3.0)
    assert eptq[-2:] == ["--time-budget", "3"] and "--iters" not in eptq and "--weight-bits" not in eptq
    ort_cmd = runner.quantize_command("ort_percentile", ctx, tmp_path / "calib", tmp_path / "o.onnx", 3.0)
    assert ort_cmd[0] == "tools.corpuslib.ort_quant" and ort_cmd[-1] == "Percentile"


CACHE = runner.DEFAULT_CACHE


@pytest.mark.corpus
@pytest.mark.parametrize("name", [e.name for e in corpus.ENTRIES])
def test_corpus_w8a8(name: str, tmp_path: Path) -> None:
    """Ours at W8A8 --iters 0 writes a model that loads and passes onnx.checker, at the issue's threshold."""
    if not (CACHE / "data" / name / "done.json").exists():
        pytest.skip(f"corpus model {name} is not in {CACHE}: run `python tools/corpus.py fetch` first "
                    "(or set EPTQ_CORPUS_CACHE)")
    entry = corpus.BY_NAME[name]
    ctx = runner.context(entry, CACHE)
    test = runner._named(runner.read_feeds(CACHE / "data" / name / "test"), ctx)
    ref = runner.run_outputs(ctx.model, test)
    res = runner.run_setting(entry, ctx, "w8a8", test, ref, runner.RunOptions(CACHE, ["w8a8"], runs=tmp_path))
    assert res.rc == 0 and not res.error, f"{name}: exit {res.rc}: {res.error}"
    written = tmp_path / name / "w8a8" / "model.onnx"
    onnx.checker.check_model(str(written))
    ort.InferenceSession(str(written), providers=["CPUExecutionProvider"])
    value, threshold = res.metrics[entry.metric], corpus.THRESHOLDS[entry.task]
    assert value >= threshold, f"{name}: {entry.metric} {value:.4f} < {threshold} at W8A8 ({res.metrics})"
