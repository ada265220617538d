"""The QDQ writer against onnx's reference evaluator and numpy decoding of what it stored."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from eptq_onnx import quantize
from eptq_onnx.config import OptimizeOptions, QuantConfig
from eptq_onnx.graph.model_io import ir_version_for
from eptq_onnx.export.writer import required_opset, write_qdq
from eptq_onnx.plan.qpoints import build_plan
from eptq_onnx.init.quantizers import params_for_range
from eptq_onnx.graph.runtime import make_session
from eptq_onnx.plan.targets import TARGETS
from eptq_onnx.init.weights import init_weights

RNG = np.random.default_rng(0)


def _float_model(opset: int) -> onnx.ModelProto:
    """input -> Conv(+bias) -> Relu -> depthwise Conv -> Add(residual) -> GAP -> Flatten -> Gemm."""
    init = {
        "w1": RNG.normal(0, 0.3, (8, 3, 3, 3)),
        "b1": RNG.normal(0, 0.1, 8),
        "w2": RNG.normal(0, 0.3, (8, 1, 3, 3)),
        "b2": RNG.normal(0, 0.1, 8),
        "fw": RNG.normal(0, 0.3, (5, 8)),
        "fb": RNG.normal(0, 0.1, 5),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="dw", group=8, pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "r1"], ["s"], name="add"),
        helper.make_node("GlobalAveragePool", ["s"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fw", "fb"], ["y"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
        initializer=[numpy_helper.from_array(v.astype(np.float32), k) for k, v in init.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version_for(opset)
    return onnx.shape_inference.infer_shapes(model)


def _write(bits: int, storage: str = "native", quantize_outputs: bool = False, symmetric: bool = False, opset: int = 13,
           target: str = "ort-cpu"):
    model = _float_model(max(opset, required_opset([bits], 8, storage, TARGETS[target])))
    plan = build_plan(model, quantize_outputs)
    weights = init_weights(model, plan, bits, "mse")
    acts = {g.id: params_for_range(-1.0 - g.id, 2.0 + g.id, 8, symmetric) for g in plan.groups}
    qdq, summary = write_qdq(model, plan, weights, acts, weight_storage=storage, quantize_outputs=quantize_outputs,
                             target=TARGETS[target])
    return model, plan, weights, acts, qdq, summary


def _decode(qdq: onnx.ModelProto, name: str) -> np.ndarray:
    """Dequantize a weight from the stored initializers with numpy (independent of the writer)."""
    inits = {t.name: numpy_helper.to_array(t) for t in qdq.graph.initializer}
    node = next(n for n in qdq.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == f"{name}_quantized")
    axis = next(a.i for a in node.attribute if a.name == "axis")
    codes = inits[node.input[0]].astype(np.float32)
    shape = [1] * codes.ndim
    shape[axis] = -1
    return codes * inits[node.input[1]].reshape(shape)


@pytest.mark.parametrize("bits,storage,onnx_type,target", [
    (8, "native", TensorProto.INT8, "ort-cpu"), (4, "native", TensorProto.INT4, "ort-cpu"),
    (2, "native", TensorProto.INT4, "ort-cpu"),  # onnxruntime's fused kernels refuse INT2: 2-bit codes in INT4
    (2, "native", TensorProto.INT2, "generic"), (4, "int8", TensorProto.INT8, "ort-cpu"),
    (3, "native", TensorProto.INT4, "ort-cpu"),
])
def test_weights_stored_in_native_types_and_decode_to_the_quantized_values(bits, storage, onnx_type, target) -> None:
    model, plan, weights, _, qdq, _ = _write(bits, storage, target=target)
    onnx.checker.check_model(qdq, full_check=True)
    inits = {t.name: t for t in qdq.graph.initializer}
    float_inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for name, wq in weights.items():
        assert wq.bits in ({7, 8} if bits == 8 else {bits})  # 7: ort-cpu's U8S8 range (targets.integer_kernel_bits)
        lo, hi = -(1 << (wq.bits - 1)), (1 << (wq.bits - 1)) - 1
        assert inits[f"{name}_quantized"].data_type == onnx_type
        codes = numpy_helper.to_array(inits[f"{name}_quantized"]).astype(np.int32)
        assert codes.min() >= lo and codes.max() <= hi
        decoded = _decode(qdq, name)
        np.testing.assert_array_equal(decoded, wq.dequantized())
        scale = wq.scale.reshape([-1] + [1] * (decoded.ndim - 1)) if wq.axis == 0 else wq.scale
        w = float_inits[name]
        inside = np.abs(w) <= hi * scale  # not clipped: rounding error at most half a step
        assert np.all(np.abs(decoded - w)[inside] <= (scale / 2 * np.ones_like(w))[inside] * (1 + 1e-6))
        assert name not in inits  # the float weight is gone


def test_bias_is_int32_with_input_times_weight_scale() -> None:
    model, plan, weights, acts, qdq, summary = _write(8)
    inits = {t.name: numpy_helper.to_array(t) for t in qdq.graph.initializer}
    float_inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    group_of = plan.group_of()
    for point in plan.weights:
        key = f"{point.bias}__{point.node}"
        assert inits[f"{key}_quantized"].dtype == np.int32
        expected_scale = np.float32(acts[group_of[point.input].id].scale) * weights[point.weight].scale
        np.testing.assert_allclose(inits[f"{key}_scale"], expected_scale, rtol=1e-6)
        decoded = inits[f"{key}_quantized"] * inits[f"{key}_scale"]
        assert np.all(np.abs(decoded - float_inits[point.bias]) <= expected_scale / 2 + 1e-9)
    assert summary.float_biases == []


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("symmetric", [False, True])
def test_onnxruntime_matches_reference_evaluator(bits: int, symmetric: bool) -> None:
    *_, qdq, _ = _write(bits, symmetric=symmetric, opset=21)  # the reference evaluator's DequantizeLinear starts at 19
    x = RNG.normal(0, 1, (3, 3, 8, 8)).astype(np.float32)
    ours = make_session(qdq, optimize=False).run(None, {"x": x})[0]
    reference = ReferenceEvaluator(qdq).run(None, {"x": x})[0]
    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-5)


def test_graph_keeps_names_and_quantized_outputs_come_from_dequantize() -> None:
    model, *_, qdq, _ = _write(8)
    names = {n.name for n in qdq.graph.node}
    assert {n.name for n in model.graph.node} <= names
    assert [i.name for i in qdq.graph.input] == ["x"] and [o.name for o in qdq.graph.output] == ["y"]
    assert next(n for n in qdq.graph.node if "y" in n.output).op_type == "Gemm"
    *_, qdq_out, _ = _write(8, quantize_outputs=True)
    assert next(n for n in qdq_out.graph.node if "y" in n.output).op_type == "DequantizeLinear"
    x = RNG.normal(0, 1, (2, 3, 8, 8)).astype(np.float32)
    assert make_session(qdq_out).run(None, {"x": x})[0].shape == (2, 5)


def test_activation_pairs_sit_on_every_group_tensor() -> None:
    _, plan, _, acts, qdq, _ = _write(8)
    q_inputs = {n.input[0]: n for n in qdq.graph.node if n.op_type == "QuantizeLinear"}
    inits = {t.name: numpy_helper.to_array(t) for t in qdq.graph.initializer}
    for g in plan.groups:
        for t in g.tensors:
            q = q_inputs[t]
            assert inits[q.input[1]] == np.float32(acts[g.id].scale)
            assert inits[q.input[2]].dtype == np.uint8
    readers = [i for n in qdq.graph.node if n.op_type not in ("QuantizeLinear",) for i in n.input]
    for g in plan.groups:
        for t in g.tensors:
            assert t not in readers  # every reader takes the DequantizeLinear output


def test_new_constants_never_take_a_name_the_model_has() -> None:
    """A model with a tensor h and its own initializer h_scale (a Mul's constant): the writer's scale of h
    gets another name, so the written model passes onnx.checker and computes the float model's output."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, (8, 16)).astype(np.float32), "w1"),
             numpy_helper.from_array(np.full((16,), 0.5, np.float32), "h_scale"),
             numpy_helper.from_array(rng.normal(0, 0.5, (16, 4)).astype(np.float32), "w2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["m"], name="fc1"), helper.make_node("Relu", ["m"], ["h"], name="relu"),
             helper.make_node("Mul", ["h", "h_scale"], ["hs"], name="scale"),
             helper.make_node("MatMul", ["hs", "w2"], ["y"], name="fc2")]
    graph = helper.make_graph(nodes, "named", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    feeds = [{"x": rng.normal(0, 1, (4, 8)).astype(np.float32)} for _ in range(8)]
    result = quantize(model, feeds, QuantConfig(weight_bits=8, optimize=OptimizeOptions(iters=0)), progress=False)
    onnx.checker.check_model(result.model, full_check=True)
    names = [t.name for t in result.model.graph.initializer]
    assert len(names) == len(set(names)) and "h_scale" in names
    q = next(n for n in result.model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "h")
    assert q.input[1] != "h_scale"
    x = feeds[0]["x"]
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.abs(run(result.model) - run(model)).max() < 0.1 * np.abs(run(model)).max()
