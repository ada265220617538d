"""onnxruntime CPU latency of the float and the written model (latency.py) and its report entries."""
from __future__ import annotations

from pathlib import Path


from eptq_onnx import quantize
from eptq_onnx.export.latency import MAX_RUNS, MIN_RUNS, Latency, latency_note, measure_latency
from models import zoo
from tests.helpers import init_only


def test_measure_latency_interleaves_bounded_runs_of_both_models() -> None:
    model = zoo.residual_cnn()
    feeds = {k: v for k, v in zoo.sample_inputs(model, 1, seed=0).items()}
    latency = measure_latency(model, model, feeds, threads=1, seconds=0.2)
    assert latency.threads == 1
    assert MIN_RUNS <= latency.runs <= MAX_RUNS
    assert len(latency.float_runs_ms) == len(latency.quantized_runs_ms) == latency.runs
    assert latency.float_ms > 0 and latency.quantized_ms > 0
    # the medians are rounded to 1e-4 ms: their ratio may differ from the unrounded one by that much relatively
    rounding = 1e-4 * (1 + latency.ratio) / latency.float_ms
    assert abs(latency.ratio - latency.quantized_ms / latency.float_ms) < 1e-3 + rounding


def _latency(ratio: float) -> Latency:
    return Latency(threads=2, runs=9, float_ms=1.0, quantized_ms=ratio, ratio=ratio)


def test_latency_note_names_the_cause_and_the_alternatives() -> None:
    assert latency_note(_latency(0.6), {"w": 4}, 0, 3, "ort-cpu") is None  # faster than float: nothing to say
    w4 = latency_note(_latency(1.8), {"w": 4, "v": 7}, 0, 3, "ort-cpu")
    assert w4 is not None and w4.startswith("LATENCY:") and "1.80x" in w4
    assert "4-bit weights as DequantizeLinear" in w4 and "--weight-bits 8" in w4
    w8 = latency_note(_latency(1.3), {"w": 7}, 2, 5, "ort-cpu")
    assert w8 is not None and "2 of 5 Conv/MatMul/Gemm" in w8 and "DequantizeLinear then" not in w8
    generic = latency_note(_latency(1.3), {"w": 4}, 0, 5, "generic")  # the 4-bit advice is onnxruntime CPU's
    assert generic is not None and "0 of 5" in generic


def test_report_has_latency_and_no_latency_skips_it(tmp_path: Path, calib_for) -> None:
    model = zoo.residual_cnn()
    calib = calib_for(model, 8)
    measured = quantize(model, calib, init_only(weight_bits=8), progress=False).report
    assert set(measured.latency) >= {"threads", "runs", "float_ms", "quantized_ms", "ratio"}
    assert "latency" in measured.timings_s
    skipped = quantize(model, calib, init_only(weight_bits=8, measure_latency=False), progress=False).report
    assert skipped.latency == {} and "latency" not in skipped.timings_s
