"""onnxruntime CPU latency of the float and the written model (latency.py) and its report entries."""
from __future__ import annotations

from pathlib import Path

import onnx
from onnx import TensorProto, helper

from eptq_onnx import quantize
from eptq_onnx.export.latency import (MAX_RUNS, MIN_RUNS, Latency, WideReaders, latency_note, measure_latency,
                                      sixteen_bit_linear_ops)
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


def _qdq_chain(first_bits: int, last_bits: int) -> onnx.ModelProto:
    """x -> Q/DQ(first_bits) -> Conv -> Q/DQ(8) -> Conv -> Q/DQ(last_bits) -> y, int8 weights."""
    zp_type = {8: TensorProto.UINT8, 16: TensorProto.UINT16}
    inits = [helper.make_tensor("s", TensorProto.FLOAT, [], [0.1]),
             helper.make_tensor("w_q", TensorProto.INT8, [2, 2, 1, 1], [1, 2, 3, 4]),
             helper.make_tensor("w_s", TensorProto.FLOAT, [], [0.05]),
             helper.make_tensor("w_z", TensorProto.INT8, [], [0])]
    nodes = [helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_z"], ["w"])]
    for k, bits in enumerate((first_bits, 8, last_bits)):
        inits.append(helper.make_tensor(f"z{k}", zp_type[bits], [], [0]))
        src = "x" if k == 0 else f"c{k}"
        nodes += [helper.make_node("QuantizeLinear", [src, "s", f"z{k}"], [f"q{k}"]),
                  helper.make_node("DequantizeLinear", [f"q{k}", "s", f"z{k}"], ["y" if k == 2 else f"d{k}"])]
        if k < 2:
            nodes.append(helper.make_node("Conv", [f"d{k}", "w"], [f"c{k + 1}"]))
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 4, 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def test_sixteen_bit_linear_ops_counts_the_convs_next_to_a_16_bit_point() -> None:
    assert sixteen_bit_linear_ops(_qdq_chain(8, 8)) == 0
    assert sixteen_bit_linear_ops(_qdq_chain(16, 8)) == 1  # the first Conv reads 16 bits
    assert sixteen_bit_linear_ops(_qdq_chain(16, 16)) == 2  # and the second writes them
    onnx.checker.check_model(_qdq_chain(16, 16))


def test_latency_note_names_the_16_bit_points_and_their_trade() -> None:
    note = latency_note(_latency(1.6), {"w": 8}, 40, 102, "ort-cpu", WideReaders(59, 9.09, 17.63))
    assert note is not None and "40 of 102" in note
    assert "59 of the rest read or write 16-bit activations" in note
    assert "17.6 dB, against 9.1 dB" in note and "--act16-below 0" in note
    assert "16-bit" not in (latency_note(_latency(1.6), {"w": 8}, 40, 102, "ort-cpu", WideReaders()) or "")
