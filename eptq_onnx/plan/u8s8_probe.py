"""Whether onnxruntime's CPU integer kernels on this machine saturate U8S8 products.

On x86 CPUs without VNNI, onnxruntime's fused uint8 x int8 kernels (QLinearConv, QLinearMatMul,
the depthwise Conv kernel) multiply with vpmaddubsw, which adds pairs of products into int16 with
saturation: full 8-bit weight codes overflow there (2 x 255 x 127 > 32767) and a model loses most
of its accuracy; with VNNI (vpdpbusd), on ARM and elsewhere they are exact. The probe runs tiny QDQ
models whose pair sums overflow int16 through onnxruntime with its default optimizations (so the
QDQ fusions pick the same kernels as a written model's) and checks that the result is exact.
"""
from __future__ import annotations

import functools
from typing import List, NamedTuple

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

X_CODE, W_CODE = 255, 127  # the largest uint8 input and int8 weight codes: every pair sum overflows int16
OUT_CODE = 200  # the exact result's output code (a saturated one lands near half of it)


class Probe(NamedTuple):
    model: onnx.ModelProto
    shape: List[int]  # of its input x (fed all X_CODE)
    y_scale: float  # the output's step: the exact result is OUT_CODE steps
    taps: int  # products summed per output (each X_CODE x W_CODE)


def _qdq_probe(op: str, x_shape: List[int], w: np.ndarray, attrs: dict) -> Probe:
    """x -> Q/DQ (uint8, scale 1) -> op with DQ(int8 weights, scale 1) -> Q/DQ -> y, scaled so that the
    exact result codes to OUT_CODE."""
    taps = int(np.prod(w.shape[1:]) if op == "Conv" else w.shape[0])
    y_scale = float(np.float32(X_CODE * W_CODE * taps / OUT_CODE))
    inits = [
        numpy_helper.from_array(w.astype(np.int8), "w_q"),
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
        numpy_helper.from_array(np.array(0, np.uint8), "zp_u8"),
        numpy_helper.from_array(np.array(0, np.int8), "zp_s8"),
        numpy_helper.from_array(np.array(y_scale, np.float32), "y_scale"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "one", "zp_u8"], ["x_q"]),
        helper.make_node("DequantizeLinear", ["x_q", "one", "zp_u8"], ["x_dq"]),
        helper.make_node("DequantizeLinear", ["w_q", "one", "zp_s8"], ["w_dq"]),
        helper.make_node(op, ["x_dq", "w_dq"], ["y_f"], **attrs),
        helper.make_node("QuantizeLinear", ["y_f", "y_scale", "zp_u8"], ["y_q"]),
        helper.make_node("DequantizeLinear", ["y_q", "y_scale", "zp_u8"], ["y"]),
    ]
    graph = helper.make_graph(nodes, f"u8s8_probe_{op}", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    return Probe(model, x_shape, y_scale, taps)


def _probes() -> List[Probe]:
    """A Conv over 8 channels, a depthwise Conv and a MatMul, all of all-max codes."""
    return [
        _qdq_probe("Conv", [1, 8, 3, 3], np.full((16, 8, 3, 3), W_CODE), {}),
        _qdq_probe("Conv", [1, 16, 3, 3], np.full((16, 1, 3, 3), W_CODE), {"group": 16}),
        _qdq_probe("MatMul", [4, 64], np.full((64, 16), W_CODE), {}),
    ]


@functools.lru_cache(maxsize=None)
def u8s8_saturates() -> bool:
    """True when onnxruntime's CPU runs at least one of the probes inexactly on this machine."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    for probe in _probes():
        sess = ort.InferenceSession(probe.model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        y = sess.run(None, {"x": np.full(probe.shape, float(X_CODE), np.float32)})[0]
        if not np.all(np.abs(y / probe.y_scale - OUT_CODE) <= 1):
            return True
    return False
