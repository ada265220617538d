"""Layer-input sampling for the output-MSE weight init: patches, the streaming reservoir, batch sizing.

References are independent: torch's unfold for the patches, counting for the reservoir's
uniformity, the value_info-free bytes of onnxruntime's own outputs for the batch size.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import helper

from eptq_onnx.graph import runtime
from eptq_onnx.calib.data import CalibrationSet
from eptq_onnx.calib.specs import input_specs
from eptq_onnx.config import CalibOptions
from eptq_onnx.graph.fold_bn import fold_batch_norms
from eptq_onnx.calib.layer_inputs import RowReservoir, _conv_rows, collect_layer_inputs
from eptq_onnx.graph.normalize import normalize_model
from eptq_onnx.plan.qpoints import build_plan
from eptq_onnx.init.quantizers import weight_scales
from eptq_onnx.plan.targets import get_target
from eptq_onnx.graph.tensor_store import tensor_array
from models import zoo


def _unfold_rows(x: np.ndarray, kernel, strides, pads, dilations, groups) -> np.ndarray:
    """im2col rows [N*L, groups, K] by torch's unfold (pads: top, left, bottom, right)."""
    t = torch.nn.functional.pad(torch.from_numpy(x), (pads[1], pads[3], pads[0], pads[2]))
    cols = torch.nn.functional.unfold(t, kernel, dilation=dilations, stride=strides)  # [N, C*k, L]
    rows = cols.permute(0, 2, 1).reshape(-1, cols.shape[1]).numpy()
    return rows.reshape(len(rows), groups, -1)


@pytest.mark.parametrize("kernel,strides,pads,dilations,groups", [
    ((3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1),
    ((3, 3), (2, 2), (0, 1, 2, 0), (1, 1), 2),
    ((3, 2), (2, 1), (2, 1, 1, 0), (2, 2), 4),
    ((1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1),
    ((5, 5), (3, 3), (2, 2, 2, 2), (1, 1), 1),
])
def test_conv_rows_are_unfold_rows(kernel, strides, pads, dilations, groups) -> None:
    x = np.random.default_rng(0).normal(size=(3, 8, 9, 11)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=list(kernel), strides=list(strides),
                            pads=[pads[0], pads[1], pads[2], pads[3]], dilations=list(dilations), group=groups)
    count, gather = _conv_rows(x, node, list(kernel))
    ref = _unfold_rows(x, kernel, strides, pads, dilations, groups)
    assert count == len(ref)
    np.testing.assert_array_equal(gather(np.arange(count)), ref)
    pick = np.random.default_rng(1).choice(count, 17, replace=False)
    np.testing.assert_array_equal(gather(pick), ref[pick])


def test_conv1d_rows_are_unfold_rows() -> None:
    x = np.random.default_rng(2).normal(size=(2, 4, 13)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[3], strides=[2], pads=[1, 2])
    count, gather = _conv_rows(x, node, [3])
    ref = _unfold_rows(x[:, :, None, :], (1, 3), (1, 2), (0, 1, 0, 2), (1, 1), 1)
    np.testing.assert_array_equal(gather(np.arange(count)), ref)


def _stream(reservoir: RowReservoir, sizes) -> None:
    start = 0
    for n in sizes:
        rows = np.arange(start, start + n, dtype=np.float32).reshape(-1, 1, 1)
        reservoir.offer(n, lambda idx, rows=rows: rows[idx])
        start += n


def test_reservoir_keeps_everything_that_fits() -> None:
    reservoir = RowReservoir(100, np.random.default_rng(0))
    _stream(reservoir, [30, 0, 40, 30])
    assert sorted(reservoir.rows.ravel().tolist()) == list(range(100))


def test_reservoir_is_a_uniform_sample_of_the_stream() -> None:
    """Every row of the stream is kept with probability capacity / rows, whichever batch it came in."""
    sizes, capacity, trials = [5, 200, 40, 1, 300, 54], 60, 600
    total = sum(sizes)
    hits = np.zeros(total)
    for seed in range(trials):
        reservoir = RowReservoir(capacity, np.random.default_rng(seed))
        _stream(reservoir, sizes)
        kept = reservoir.rows.ravel().astype(int)
        assert len(kept) == capacity and len(set(kept.tolist())) == capacity
        hits[kept] += 1
    p = capacity / total
    freq = hits / trials
    bounds = np.cumsum([0, *sizes])
    for lo, hi in zip(bounds[:-1], bounds[1:]):  # per batch: the mean inclusion frequency
        sd = np.sqrt(p * (1 - p) / (trials * (hi - lo)))
        assert abs(freq[lo:hi].mean() - p) < 5 * sd + 1e-3, (lo, hi, freq[lo:hi].mean(), p)
    assert np.abs(freq - p).max() < 6 * np.sqrt(p * (1 - p) / trials)


def _calib(folder: Path, model: onnx.ModelProto, n: int, hw: tuple[int, int], batch: int = 16) -> CalibrationSet:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        np.save(folder / f"{i:04d}.npy", rng.normal(size=(3, *hw)).astype(np.float32))
    return CalibrationSet(folder, input_specs(model), CalibOptions(batch_size=batch))


def _prepared(name: str) -> onnx.ModelProto:
    model, _ = fold_batch_norms(normalize_model(zoo.ZOO[name]()))
    return model


def test_tapped_batch_size_counts_dynamic_dims_at_their_real_size(tmp_path: Path, monkeypatch) -> None:
    """Symbolic H and W: the batch is sized from the first sample's real tensors, so one batch of tapped
    tensors stays under the bound (value_info's symbolic dims would count as 1: the whole batch)."""
    model = _prepared("db_text_detector")
    calib = _calib(tmp_path / "c", model, 16, (128, 96))
    names = [vi.name for vi in model.graph.value_info]
    session = runtime.make_session(runtime.with_outputs(model, names))
    (one,) = [sum(v.nbytes for v in session.run(None, f)) for f in calib.batches(1, limit=1)]
    monkeypatch.setattr(runtime, "TAPPED_BATCH_BYTES", 3 * one + one // 2)
    assert runtime.tapped_batch_size(session, calib, 16) == 3
    assert runtime.tapped_batch_size(session, calib, 2) == 2
    assert runtime.tapped_batch_size(session, calib, 16, copies=4) == 1


def test_collect_layer_inputs_bounded_and_near_full_data_steps(tmp_path: Path) -> None:
    """At most ``rows`` rows per layer whatever the number of samples; the steps they choose are those of
    every row of every sample within a few percent (and the output error on all rows within 3%)."""
    model = _prepared("db_text_detector")
    plan = build_plan(model, False, get_target("ort-cpu").fusible)
    calib = _calib(tmp_path / "c", model, 12, (48, 64), batch=4)
    sampled = collect_layer_inputs(model, plan, calib, samples=12, rows=512)
    full = collect_layer_inputs(model, plan, calib, samples=12, rows=10**9)
    weights = {t.name: tensor_array(t) for t in model.graph.initializer}
    axes = {p.weight: p.axis for p in plan.weights}
    assert set(sampled) == set(full) and len(sampled) >= 10
    for name, rows in sampled.items():
        assert len(rows) == min(512, len(full[name]))
        w = weights[name]
        chosen, best = (weight_scales(w, axes[name], 4, "mse", r) for r in (rows, full[name]))
        assert np.median(np.abs(chosen / best - 1)) < 0.05, name
        x = full[name].transpose(1, 0, 2)  # [G, P, K]

        def error(scale: np.ndarray) -> float:
            s = scale.reshape([-1] + [1] * (w.ndim - 1))
            d = (np.clip(np.rint(w / s), -8, 7) * s - w).reshape(x.shape[0], -1, x.shape[2]).astype(np.float64)
            return float((np.matmul(x, d.transpose(0, 2, 1)) ** 2).sum())

        assert error(chosen) <= error(best) * 1.03 + 1e-12, name
