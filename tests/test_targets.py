"""Deployment targets: every rule of every profile, checked on the written models of the zoo."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from eptq_onnx import QuantConfig, quantize
from eptq_onnx.cli import main
from eptq_onnx.config import OptimizeOptions
from eptq_onnx.errors import UsageError
from eptq_onnx.plan.targets import TARGETS, get_target, violations
from models import zoo
from tests.helpers import assert_student_matches_onnxruntime, init_only

FAST_MODELS = ("deit", "mobilenet_v3", "conv_lstm")  # the whole zoo: -m slow


def _quantized(name: str, target: str, bits: int, calib_for, equalize: bool = True) -> tuple[onnx.ModelProto, object]:
    model = zoo.ZOO[name]()
    config = init_only(weight_bits=bits, target=target, validation_samples=8, equalize=equalize)
    return model, quantize(model, calib_for(model, 4, name=f"{target}{bits}"), config, progress=False)


@pytest.mark.parametrize("target", list(TARGETS))
@pytest.mark.parametrize("name", [n if n in FAST_MODELS else pytest.param(n, marks=pytest.mark.slow) for n in zoo.ZOO])
def test_every_rule_holds_on_the_zoo(name: str, target: str, calib_for) -> None:
    """At W4A8 (activation codings, sub-8-bit storage per op, per-channel rules) the model complies."""
    _, result = _quantized(name, target, 4, calib_for)
    assert violations(result.model, TARGETS[target]) == []


def _ops_with_weights(model: onnx.ModelProto, op_type: str) -> int:
    inits = {t.name for t in model.graph.initializer}
    return sum(n.op_type == op_type and len(n.input) > 1 and n.input[1] in inits for n in model.graph.node)


def _last_layers(model: onnx.ModelProto) -> int:
    """Weighted Convs from which no other Conv/MatMul/Gemm is reachable (their outputs reach only model outputs)."""
    consumers: dict = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def reaches_layer(tensor: str, seen: set) -> bool:
        for n in consumers.get(tensor, []):
            if n.op_type in ("Conv", "MatMul", "Gemm"):
                return True
            if any(o not in seen and (seen.add(o) or reaches_layer(o, seen)) for o in n.output):
                return True
        return False

    inits = {t.name for t in model.graph.initializer}
    return sum(n.op_type == "Conv" and n.input[1] in inits and not reaches_layer(n.output[0], set()) for n in model.graph.node)


@pytest.mark.parametrize("name", ["mobilenet_v3", "segmentation_head", pytest.param("efficientnet", marks=pytest.mark.slow),
                                  pytest.param("regnet", marks=pytest.mark.slow)])
def test_ort_cpu_layout_fuses_every_conv(name: str, calib_for) -> None:
    """ort-cpu: every Conv becomes QLinearConv at W8A8 but the last layers (their outputs reach only model
    outputs, which stay float); the paper's layout (generic) fuses fewer where a non-linearity other than
    Relu/Clip follows a Conv. (Without equalization, which moves the point in front of an equalized
    HardSwish past it: test_equalize.py.)"""
    model, result = _quantized(name, "ort-cpu", 8, calib_for, equalize=False)
    convs = _ops_with_weights(model, "Conv")
    assert result.report.validation["fused_op_types"].get("QLinearConv", 0) == convs - _last_layers(model)
    if name in ("mobilenet_v3", "efficientnet"):
        _, generic = _quantized(name, "generic", 8, calib_for)
        assert generic.report.validation["fused_op_types"].get("QLinearConv", 0) < convs


def _activation_points(model: onnx.ModelProto) -> set:
    inits = {t.name for t in model.graph.initializer}
    return {n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits}


def test_ort_cpu_places_points_for_fusion_only_where_a_layer_fuses(calib_for) -> None:
    """ort-cpu's point on a Conv output in front of a HardSwish buys a QLinearConv only with int8 weights:
    INT4 weights run as DequantizeLinear then the float Conv, so at W4 the points sit where the paper puts
    them (as under generic), and with 4-bit codes in int8 containers every Conv fuses again."""
    model = zoo.ZOO["mobilenet_v3"]()
    calib = calib_for(model, 4)

    def run(target: str, bits: int, storage: str = "native") -> onnx.ModelProto:
        config = init_only(weight_bits=bits, target=target, weight_storage=storage, validation_samples=8,
                           equalize=False)  # (equalized blocks move their points: test_equalize.py)
        return quantize(model, calib, config, progress=False)

    ort4, generic4, ort8 = run("ort-cpu", 4), run("generic", 4), run("ort-cpu", 8)
    assert _activation_points(ort4.model) == _activation_points(generic4.model)
    assert _activation_points(ort8.model) > _activation_points(ort4.model)  # + the Conv outputs before HardSwish
    in_int8 = run("ort-cpu", 4, "int8")
    convs = _ops_with_weights(model, "Conv")
    assert in_int8.report.validation["fused_op_types"].get("QLinearConv", 0) == convs - _last_layers(model)


def test_each_rule_catches_its_violation(calib_for) -> None:
    """A generic model (uint8, INT4 Conv weights, per-channel MatMul) breaks trt's and qnn's rules."""
    _, w4 = _quantized("mobilevit", "generic", 4, calib_for)
    trt = "\n".join(violations(w4.model, TARGETS["trt"]))
    assert "uint8 not read by trt" in trt and "INT4 not read by trt for Conv" in trt
    qnn = violations(w4.model, TARGETS["qnn"])
    assert qnn and all("per-channel, qnn takes per-tensor" in v for v in qnn)
    assert {v.split(" of ")[1].split(":")[0] for v in qnn} <= {"MatMul", "Gemm"}
    _, trt_model = _quantized("mobilevit", "trt", 4, calib_for)
    assert "uint8 not read by trt" not in "\n".join(violations(trt_model.model, TARGETS["trt"]))
    mlp = zoo.mlp()
    qnn16 = quantize(mlp, calib_for(mlp, 4, name="qnn16"), init_only(weight_bits=8, target="qnn", act_bits=16),
                     progress=False).model
    assert violations(qnn16, TARGETS["qnn"]) == []
    assert violations(qnn16, TARGETS["ort-cpu"]) == []  # onnxruntime's CPU runs uint16 QDQ (as float ops)
    assert "uint16 not read by trt" in "\n".join(violations(qnn16, TARGETS["trt"]))
    zero_points = [t for t in trt_model.model.graph.initializer if t.name.endswith("_zero_point")]
    assert all(not np.any(onnx.numpy_helper.to_array(t)) for t in zero_points)  # symmetric everywhere
    storage = {t.data_type for t in trt_model.model.graph.initializer if t.name.endswith("_quantized")}
    assert onnx.TensorProto.INT4 in storage and onnx.TensorProto.UINT8 not in storage


def test_qnn_per_tensor_weights_match_onnxruntime(calib_for) -> None:
    """qnn's per-tensor MatMul/Gemm weights (scalar scale, int32 bias with a scalar scale): the torch
    twin still computes exactly what onnxruntime computes."""
    model, result = _quantized("deit", "qnn", 8, calib_for)
    inits = {t.name: t for t in result.model.graph.initializer}
    gemm_scales = [inits[n.input[1]] for n in result.model.graph.node if n.op_type == "DequantizeLinear"
                   and n.input[0] in inits and inits[n.input[0]].data_type == onnx.TensorProto.INT8
                   and any(c.op_type in ("MatMul", "Gemm") and n.output[0] in c.input for c in result.model.graph.node)]
    assert gemm_scales and all(len(s.dims) == 0 for s in gemm_scales)
    assert_student_matches_onnxruntime(model, result)


def test_config_follows_the_target() -> None:
    assert QuantConfig(target="trt").act_symmetric  # trt reads only signed, symmetric activations
    assert not QuantConfig(target="qnn", act_bits=16).act_symmetric
    assert QuantConfig(target="ort-cpu", act_symmetric=True).act_symmetric  # onnxruntime fuses s8 too
    assert QuantConfig(target="ort-cpu", act_bits=16).act_bits == 16  # run as float ops, not refused
    with pytest.raises(UsageError, match="--target trt reads activations as int8, not uint16"):
        QuantConfig(target="trt", act_bits=16)
    with pytest.raises(UsageError, match="--target tpu is unknown"):
        QuantConfig(target="tpu")
    with pytest.raises(UsageError, match="per-tensor"):
        QuantConfig(target="qnn", optimize=OptimizeOptions(learn_weight_scales=True))


def test_cli_target(tmp_path, calib_for) -> None:
    model = zoo.mlp()
    src = tmp_path / "in.onnx"
    onnx.save(model, src)
    calib = calib_for(model, 4)
    out = tmp_path / "out.onnx"
    args = [str(src), str(out), "--calib", str(calib), "--iters", "0", "-q"]
    assert CliRunner().invoke(main, args + ["--target", "trt"]).exit_code == 0
    assert violations(onnx.load(out), TARGETS["trt"]) == []
    bad = CliRunner().invoke(main, args + ["--target", "trt", "--act-bits", "16", "--force"])
    assert bad.exit_code == 2 and "reads activations as int8, not uint16" in bad.output


def test_ort_cpu_8bit_gemm_weights_take_the_u8s8_safe_range() -> None:
    """2 x 255 x 127 overflows int16 (vpmaddubsw); 2 x 255 x 63 does not."""
    from eptq_onnx.plan.targets import U8S8_SAFE_WEIGHT_BITS, integer_kernel_bits, with_reduce_range

    ort_cpu, generic = with_reduce_range(get_target("ort-cpu"), True), get_target("generic")
    assert 2 * 255 * ((1 << (U8S8_SAFE_WEIGHT_BITS - 1)) - 1) < 2**15 <= 2 * 255 * 127
    assert [integer_kernel_bits(ort_cpu, 8, op, False) for op in ("Conv", "MatMul", "Gemm")] == [7, 7, 7]
    assert integer_kernel_bits(ort_cpu, 8, "Conv", True) == 8  # int8 activations: S8S8 kernels
    assert integer_kernel_bits(ort_cpu, 4, "Conv", False) == 4  # 4-bit weights run as DequantizeLinear -> float op
    assert integer_kernel_bits(generic, 8, "MatMul", False) == 8
    assert integer_kernel_bits(with_reduce_range(get_target("ort-cpu"), False), 8, "Conv", False) == 8


@pytest.mark.parametrize("saturates", [True, False])
def test_default_range_follows_the_probe(saturates: bool, monkeypatch) -> None:
    from eptq_onnx.plan import u8s8_probe
    from eptq_onnx.plan.targets import with_reduce_range

    monkeypatch.setattr(u8s8_probe, "u8s8_saturates", lambda: saturates)
    assert (with_reduce_range(get_target("ort-cpu"), None).u8s8_weight_bits is not None) == saturates
    assert with_reduce_range(get_target("generic"), None) == get_target("generic")  # no U8S8 rule to keep


def test_u8s8_probe_runs_the_fused_integer_kernels_and_detects_saturation(tmp_path) -> None:
    """Each probe fuses into a QLinear op (the kernels a written model runs); computed in float it
    codes exactly to OUT_CODE, and int16-saturated pair sums would code more than one step off."""
    import onnxruntime as ort

    from eptq_onnx.plan.u8s8_probe import OUT_CODE, W_CODE, X_CODE, _probes, u8s8_saturates

    for i, probe in enumerate(_probes()):
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(tmp_path / f"probe{i}.onnx")
        options.log_severity_level = 3
        ort.InferenceSession(probe.model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        assert {n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node} & {"QLinearConv", "QLinearMatMul"}
        plain = ort.SessionOptions()
        plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        y = ort.InferenceSession(probe.model.SerializeToString(), plain, providers=["CPUExecutionProvider"]).run(
            None, {"x": np.full(probe.shape, float(X_CODE), np.float32)})[0]
        np.testing.assert_allclose(y / probe.y_scale, OUT_CODE, atol=0.5)
        saturated = probe.taps // 2 * min(2 * X_CODE * W_CODE, 2**15 - 1)  # vpmaddubsw: each pair sum clamped to int16
        assert abs(saturated / probe.y_scale - OUT_CODE) > 1
    assert isinstance(u8s8_saturates(), bool)


def test_cli_reduce_range_sets_the_weight_range(tmp_path, calib_for) -> None:
    """--reduce-range stores 8-bit Conv codes in [-64, 63]; --no-reduce-range in the full int8 range; the
    report says which and why."""
    import json

    model = zoo.ZOO["mobilenet_v3"]()
    src, calib = tmp_path / "m.onnx", calib_for(model, 4)
    onnx.save(model, src)
    ranges = {}
    for flag in ("--reduce-range", "--no-reduce-range"):
        out, report = tmp_path / f"{flag}.onnx", tmp_path / f"{flag}.json"
        args = [str(src), str(out), "--calib", str(calib), "--iters", "0", "-q", "--weight-bits", "8", "--no-latency",
                "--report", str(report), flag]
        assert CliRunner().invoke(main, args).exit_code == 0
        codes = np.concatenate([onnx.numpy_helper.to_array(t).astype(np.int32).ravel() for t in onnx.load(out).graph.initializer
                                if t.name.endswith("_quantized") and t.data_type == onnx.TensorProto.INT8])
        ranges[flag] = ((codes.min(), codes.max()), json.loads(report.read_text())["u8s8_range"])
    assert -64 <= ranges["--reduce-range"][0][0] and ranges["--reduce-range"][0][1] <= 63
    assert max(-ranges["--no-reduce-range"][0][0], ranges["--no-reduce-range"][0][1]) > 64
    assert ranges["--reduce-range"][1] == {"reduce_range": True, "weight_bits": 7, "why": "--reduce-range"}
    assert ranges["--no-reduce-range"][1]["weight_bits"] == 8
