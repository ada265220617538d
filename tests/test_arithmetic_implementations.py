"""Every implementation of the quantized arithmetic against the reference (eptq_onnx.ops.arithmetic, itself
tested against onnxruntime in test_arithmetic.py): the weight codes the QDQ writer stores, the fake-quant
reference model, the torch twin's quantizers, ClippedRound and the soft rounding of the training
kernels, in Python and fused C++. Rounding ties, saturation, zero points."""
from __future__ import annotations

import shutil
from typing import List, Tuple

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from eptq_onnx.eptq import kernels as training_kernels
from eptq_onnx.eptq.banks import RoundingBank
from eptq_onnx.eptq.kernels import ClippedRound
from eptq_onnx.export.reference import fake_quant_model, fake_quant_name
from eptq_onnx.export.writer import ACT_TYPES, INT32_MAX, STORAGE, write_qdq
from eptq_onnx.graph.model_io import ir_version_for
from eptq_onnx.graph.runtime import make_session, with_outputs
from eptq_onnx.init.quantizers import ActParams
from eptq_onnx.init.weights import WeightQuant, quantize_weight
from eptq_onnx.ops import arithmetic
from eptq_onnx.ops.arithmetic import int_range, qtype
from eptq_onnx.plan.qpoints import build_plan
from eptq_onnx.plan.targets import TARGETS
from eptq_onnx.twin.fake_quant import ActFakeQuant, BiasFakeQuant, WeightFakeQuant, round_bias
from tests.test_arithmetic import tie_values

# activation codings the writer stores: (bits, signed, zero point)
ACT_CASES = [(8, False, 0), (8, False, 131), (8, False, 255), (8, True, 0), (16, False, 30000), (16, True, 0)]
SCALES = (2.0**-5, 0.0123, 3.7)


def _fused_or_skip() -> None:
    status = training_kernels.load(log=lambda message: None)
    if not status.fused:
        if status.failed and any(shutil.which(c) for c in ("c++", "g++", "clang++")):
            pytest.fail(f"a C++ compiler is on PATH but: {status.detail}")
        pytest.skip(status.detail)


def _reference_fq(x: np.ndarray, p: ActParams) -> np.ndarray:
    qmin, qmax = p.qrange
    return arithmetic.fake_quant(x, np.float32(p.scale), p.zero_point, qmin, qmax)


# ------------------------------------------------------------------ the storage tables


def test_the_writers_storage_types_are_the_references() -> None:
    for bits, st in STORAGE.items():
        qt = qtype(bits, True)
        assert (st.onnx_type, st.numpy_type, st.min_opset) == (qt.onnx_type, qt.numpy_type, qt.min_opset)
    for (bits, signed), (onnx_type, numpy_type, opset) in ACT_TYPES.items():
        qt = qtype(bits, signed)
        assert (onnx_type, numpy_type, opset) == (qt.onnx_type, qt.numpy_type, qt.min_opset)


# ------------------------------------------------------------------ weights: codes and the QDQ writer


def _tie_weight(shape: Tuple[int, int], axis: int, bits: int, seed: int) -> np.ndarray:
    """A weight whose min-max step is 2^-(4 + c) in channel c: its values are exact rounding ties
    (k + 0.5) steps, random values and each channel's max |w| = qmax steps."""
    rng = np.random.default_rng(seed)
    qmax = int_range(bits, True)[1]
    channels = shape[axis]
    rows = []
    for c in range(channels):
        step = 2.0 ** -(4 + c)
        n = shape[1 - axis]
        k = rng.integers(-qmax, qmax, n)  # ties inside the grid: the step stays max|w| / qmax
        values = np.where(rng.random(n) < 0.6, (k + 0.5) * step, rng.uniform(-qmax, qmax, n) * step)
        values[0] = qmax * step * (1 if c % 2 else -1)
        rows.append(values)
    w = np.stack(rows).astype(np.float32)
    return w if axis == 0 else np.ascontiguousarray(w.T)


def _model(w1: np.ndarray, w2: np.ndarray, b1: np.ndarray, opset: int) -> onnx.ModelProto:
    """x [N, 6] -> Gemm(w1 [8, 6], b1, transB) -> Relu -> MatMul(w2 [8, 5]) -> y."""
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2"),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
        initializer=[numpy_helper.from_array(v, k) for k, v in (("w1", w1), ("b1", b1), ("w2", w2))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version_for(opset)
    return onnx.shape_inference.infer_shapes(model)


def _quantized(bits: int, method: str, per_tensor: bool, act: Tuple[int, bool, int]):
    """The model, its plan, weights quantized by ``init.weights.quantize_weight`` and activation parameters."""
    w1, w2 = _tie_weight((8, 6), 0, bits, 1), _tie_weight((8, 5), 1, bits, 2)
    b1 = np.concatenate([np.random.default_rng(3).normal(0, 0.5, 6), [3e9, -3e9]]).astype(np.float32)  # two saturate
    model = _model(w1, w2, b1, 25 if bits == 2 else 21)
    plan = build_plan(model)
    weights = {p.weight: quantize_weight(p.weight, numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == p.weight)),
                                         p.axis, bits, method, per_tensor=per_tensor) for p in plan.weights}
    abits, signed, zp = act
    acts = {g.id: ActParams(float(np.float32(0.0123 * (g.id + 1))), zp, abits, signed) for g in plan.groups}
    return model, plan, weights, acts


WEIGHT_CASES = [(8, "minmax", False, "generic"), (8, "mse", False, "generic"), (4, "minmax", False, "generic"),
                (4, "mse", False, "generic"), (2, "minmax", False, "generic"), (8, "minmax", True, "qnn")]


@pytest.mark.parametrize("bits,method,per_tensor,target", WEIGHT_CASES)
def test_weight_codes_and_the_stored_weights_are_the_references(bits: int, method: str, per_tensor: bool, target: str) -> None:
    """quantize_weight's codes (ties, and saturation where the MSE step clips) are the reference's
    QuantizeLinear of the float weight; the writer stores them in the reference's type, and
    onnxruntime's DequantizeLinear of what is stored is the reference's dequantize."""
    model, plan, weights, acts = _quantized(bits, method, per_tensor, (8, False, 131))
    floats = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    qdq, summary = write_qdq(model, plan, weights, acts, target=TARGETS[target])
    stored = {t.name: t for t in qdq.graph.initializer}
    qt = qtype(bits, True)
    ties = saturated = 0
    for name, wq in weights.items():
        w = floats[name]
        scale = wq.scale[:1] if per_tensor else wq.scale
        axis = None if per_tensor else wq.axis
        expected = arithmetic.quantize(w, scale[0] if per_tensor else scale, 0, qt, axis)
        np.testing.assert_array_equal(wq.codes.astype(np.int64), expected.astype(np.int64), err_msg=name)
        assert stored[f"{name}_quantized"].data_type == qt.onnx_type
        codes = numpy_helper.to_array(stored[f"{name}_quantized"])
        np.testing.assert_array_equal(codes.astype(np.int64), expected.astype(np.int64))
        np.testing.assert_array_equal(wq.dequantized(), arithmetic.dequantize(expected, wq.scale, 0, wq.axis))
        s = arithmetic.along(np.float32(scale[0]) if per_tensor else scale, w.ndim, axis)
        ties += int(np.count_nonzero(np.abs(w / s - np.floor(w / s)) == 0.5))
        qmin, qmax = qt.qrange
        saturated += int(np.count_nonzero((np.rint(w / s) > qmax) | (np.rint(w / s) < qmin)))
    if method == "minmax" and not per_tensor:  # steps 2^-(4 + c): exact ties
        assert ties > 5
    assert saturated > 0 or method == "minmax"
    # onnxruntime reads the stored codes back as the reference dequantizes them
    dq_names = [f"{name}_DequantizeLinear_Output" for name in weights]
    outputs = make_session(with_outputs(qdq, dq_names), optimize=False).run(dq_names, {"x": np.zeros((1, 6), np.float32)})
    for name, value in zip(weights, outputs):
        np.testing.assert_array_equal(value, weights[name].dequantized())


@pytest.mark.parametrize("act", ACT_CASES)
def test_stored_activation_parameters_and_biases_are_the_references(act: Tuple[int, bool, int]) -> None:
    """Scale and zero point in the reference's type for the coding; onnxruntime's codes of each
    activation are the reference's; int32 bias codes are the reference's quantization with step
    input scale x weight step, saturated to +-(2^31 - 1)."""
    model, plan, weights, acts = _quantized(8, "minmax", False, act)
    qdq, summary = write_qdq(model, plan, weights, acts, target=TARGETS["generic"])
    stored = {t.name: numpy_helper.to_array(t) for t in qdq.graph.initializer}
    bits, signed, zp = act
    qt = qtype(bits, signed)
    group_of = plan.group_of()
    for g in plan.groups:
        root = g.roots[0]
        assert stored[f"{root}_zero_point"].dtype == np.dtype(qt.numpy_type) and int(stored[f"{root}_zero_point"]) == zp
        assert stored[f"{root}_scale"] == np.float32(acts[g.id].scale)
    point = next(p for p in plan.weights if p.bias is not None)
    step = (np.float32(acts[group_of[point.input].id].scale) * weights[point.weight].scale).astype(np.float32)
    bias = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == point.bias))
    expected = arithmetic.quantize_codes(bias, step, 0, -INT32_MAX, INT32_MAX)
    codes = stored[f"{point.bias}__{point.node}_quantized"]
    np.testing.assert_array_equal(codes.astype(np.float64), expected)
    assert summary.clipped_biases == [point.bias] and np.abs(codes).max() == INT32_MAX
    # onnxruntime's QuantizeLinear codes of every activation, from the float values it quantizes
    x = np.resize(tie_values(float(np.float32(acts[group_of["x"].id].scale)), zp, *qt.qrange), (60, 6)).astype(np.float32)
    x[~np.isfinite(x)] = 0.0
    roots = [g.roots[0] for g in plan.groups]
    q_names = [f"{r}_QuantizeLinear_Output" for r in roots]
    session = make_session(with_outputs(qdq, q_names + roots), optimize=False)
    values = dict(zip(q_names + roots, session.run(q_names + roots, {"x": x})))
    for g, r, qn in zip(plan.groups, roots, q_names):
        p = acts[g.id]
        mine = arithmetic.quantize(values[r], np.float32(p.scale), p.zero_point, qt)
        np.testing.assert_array_equal(mine.astype(np.int64), values[qn].astype(np.int64), err_msg=r)


@pytest.mark.parametrize("act", ACT_CASES)
def test_fake_quant_model_computes_the_reference(act: Tuple[int, bool, int]) -> None:
    """The reference model's Div/Round/Add/Clip/Sub/Mul chain is the reference's fake quantization
    of every group tensor (fed exact ties, saturating values and zeros)."""
    model, plan, weights, acts = _quantized(4, "mse", False, act)
    reference = fake_quant_model(model, plan, weights, acts)
    bits, signed, zp = act
    qmin, qmax = int_range(bits, signed)
    x_group = plan.group_of()["x"]
    x = np.resize(tie_values(acts[x_group.id].scale, zp, qmin, qmax), (60, 6)).astype(np.float32)
    x[~np.isfinite(x)] = 0.0
    tensors = [t for g in plan.groups for t in g.tensors]
    names = tensors + [fake_quant_name(t) for t in tensors]
    values = dict(zip(names, make_session(with_outputs(reference, names), optimize=False).run(names, {"x": x})))
    group_of = plan.group_of()
    for t in tensors:
        np.testing.assert_array_equal(values[fake_quant_name(t)], _reference_fq(values[t], acts[group_of[t].id]), err_msg=t)
    inits = {i.name: numpy_helper.to_array(i) for i in reference.graph.initializer}
    for name, wq in weights.items():
        np.testing.assert_array_equal(inits[name], arithmetic.dequantize(wq.codes, wq.scale, 0, wq.axis))


# ------------------------------------------------------------------ the torch twin and the training kernels


def _act_cases() -> List[Tuple[ActParams, np.ndarray]]:
    cases = []
    for bits, signed, zp in ACT_CASES + [(4, True, 0), (8, True, -3)]:
        for scale in SCALES:
            p = ActParams(float(np.float32(scale)), zp, bits, signed)
            cases.append((p, tie_values(p.scale, zp, *p.qrange)))
    return cases


@pytest.mark.parametrize("fused", [False, True])
def test_activation_fake_quantizers_are_the_reference(fused: bool) -> None:
    """ActFakeQuant (evaluation path, its codes, and the training path with a fixed step: ClippedRound
    or the fused kernel) and quant_tap_loss's values equal the reference's fake quantization."""
    if fused:
        _fused_or_skip()
    for p, x in _act_cases():
        x = x[np.isfinite(x)]  # NaN / inf: the reference's; the training path never sees them
        expected = _reference_fq(x, p)
        fq = ActFakeQuant(p)
        xt = torch.from_numpy(x)
        with torch.no_grad():
            np.testing.assert_array_equal(fq(xt).numpy(), expected)
            qmin, qmax = p.qrange
            np.testing.assert_array_equal(fq.codes(xt).numpy(), arithmetic.quantize_codes(x, np.float32(p.scale), p.zero_point, qmin, qmax))
        for large in (False, True):  # the fused kernel's one pass and ATen's ops beyond SMALL_FORWARD
            xs = xt.repeat(300000 // len(x) + 1) if large else xt
            want = np.tile(expected, 300000 // len(x) + 1) if large else expected
            with (training_kernels.python_kernels() if not fused else _nothing()):
                trained = fq(xs.clone().requires_grad_())
                assert trained.requires_grad
                np.testing.assert_array_equal(trained.detach().numpy(), want, err_msg=f"{p} large={large}")
                y, _ = training_kernels.quant_tap_loss(xs.clone().requires_grad_(), *fq.fixed_step, *p.qrange, xs, 1.0)
                np.testing.assert_array_equal(y.detach().numpy(), want)
        with training_kernels.python_kernels():
            low, high = training_kernels._grid_range(*fq.fixed_step, *p.qrange)
            np.testing.assert_array_equal(ClippedRound.apply(xt, fq.fixed_step[0], low, high).numpy(), expected)


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _weight_quant(bits: int, seed: int) -> Tuple[np.ndarray, WeightQuant]:
    """A tie weight (see ``_tie_weight``) with its min-max steps, and two values per channel beyond its grid."""
    w = _tie_weight((8, 40), 0, bits, seed)
    wq = quantize_weight("w", w, 0, bits, "minmax")
    w[:, 1], w[:, 2] = 1.7 * w[:, 0], -1.7 * w[:, 0]  # saturate
    codes = arithmetic.quantize(w, wq.scale, 0, qtype(bits, True), axis=0).astype(np.int8)
    return w, WeightQuant(wq.name, wq.axis, bits, wq.scale, codes)


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("fixed_scale", [True, False])
def test_weight_fake_quantizer_and_its_initial_rounding_are_the_reference(bits: int, fixed_scale: bool) -> None:
    """WeightFakeQuant: the fixed codes x step are the reference's dequantize; started rounding
    (AdaRound's V from the fractional part) exports, before any update, the reference's codes,
    exact ties and saturated values included."""
    w, wq = _weight_quant(bits, 4)
    fq = WeightFakeQuant(wq)
    wt = torch.from_numpy(w)
    with torch.no_grad():
        np.testing.assert_array_equal(fq(wt).numpy(), arithmetic.dequantize(wq.codes, wq.scale, 0, 0))
    expected = arithmetic.quantize(w, wq.scale, 0, qtype(bits, True), axis=0).astype(np.int64)
    s = wq.scale[:, None]
    assert np.count_nonzero(np.abs(w / s - np.floor(w / s)) == 0.5) > 5
    fq.start_rounding(wt, fixed_scale=fixed_scale)
    np.testing.assert_array_equal(fq.export(wt).codes.astype(np.int64), expected)
    fq.mode = "hard"
    with torch.no_grad():
        np.testing.assert_array_equal(fq(wt).numpy(), arithmetic.dequantize(expected, wq.scale, 0, 0))


@pytest.mark.parametrize("fused", [False, True])
def test_soft_weights_at_decided_roundings_are_the_references_values(fused: bool) -> None:
    """The rounding bank's soft weights (eptq.kernels.soft_rounding), with every h(V) at 0 or 1,
    are the reference's dequantized codes of those decisions up to one float32 rounding
    (floor x s + s, where the reference has (floor + 1) x s), saturation included."""
    if fused:
        _fused_or_skip()
    quantizers, expected = [], []
    for bits, seed in ((8, 5), (4, 6), (2, 7)):
        w, wq = _weight_quant(bits, seed)
        fq = WeightFakeQuant(wq)
        fq.start_rounding(torch.from_numpy(w), fixed_scale=True)
        codes = arithmetic.quantize(w, wq.scale, 0, qtype(bits, True), axis=0).astype(np.int64)
        with torch.no_grad():  # decide every rounding as the reference does
            floor = np.floor(w / wq.scale[:, None])
            fq.rounding.copy_(torch.from_numpy(np.where(codes > floor, 20.0, -20.0).astype(np.float32)))
        quantizers.append(fq)
        expected.append(arithmetic.dequantize(codes, wq.scale, 0, 0))
    bank = RoundingBank(quantizers)
    with (training_kernels.python_kernels() if not fused else _nothing()):
        bank.refresh(beta=2.0)
    for fq, want in zip(quantizers, expected):
        np.testing.assert_allclose(fq.soft.detach().numpy(), want, rtol=2**-23, atol=0)
        np.testing.assert_array_equal(fq.export(torch.zeros(())).dequantized(), want)


@pytest.mark.parametrize("fused", [False, True])
def test_int32_bias_rounding_is_the_reference(fused: bool) -> None:
    """round_bias (fixed step: RoundToGrid or the fused kernel; learned: the STE path) is the
    reference's fake quantization on the symmetric int32 grid, ties and saturation included."""
    if fused:
        _fused_or_skip()
    step = np.array([2.0**-20, 1e-7, 0.37], dtype=np.float32)
    rng = np.random.default_rng(8)
    ties = (rng.integers(-2**20, 2**20, (3, 50)) + 0.5) * 2.0**-20
    b = np.concatenate([ties, rng.normal(0, 1, (3, 50)), np.full((3, 2), 1e9), np.full((3, 2), -1e9)], axis=1).astype(np.float32).T
    expected = arithmetic.fake_quant(b, step, 0, -INT32_MAX, INT32_MAX)
    bt, st = torch.from_numpy(np.ascontiguousarray(b)), torch.from_numpy(step)
    with (training_kernels.python_kernels() if not fused else _nothing()):
        trained = round_bias(bt.clone().requires_grad_(), st, fixed=True)
    np.testing.assert_array_equal(trained.detach().numpy(), expected)
    with torch.no_grad():
        np.testing.assert_array_equal(round_bias(bt, st, fixed=False).numpy(), expected)


def test_a_bias_whose_input_is_left_float_stays_float() -> None:
    """The int32 bias grid is input step x weight step; with the input's quantizer off (a point the
    analysis or the fidelity target leaves float) the written model keeps the bias float, and so must
    the twin: rounding it to the grid of a quantizer that is off is an error the model will not have."""
    w, wq = _weight_quant(8, 3)
    act = ActFakeQuant(ActParams(scale=0.5, zero_point=0, bits=8, signed=True))
    bias = BiasFakeQuant(act, WeightFakeQuant(wq))
    b = torch.linspace(-1.0, 1.0, len(wq.scale))
    step = 0.5 * torch.from_numpy(wq.scale)
    np.testing.assert_allclose(bias(b).numpy(), (torch.round(b / step) * step).numpy(), rtol=1e-6)
    act.enabled = False
    assert torch.equal(bias(b), b)
