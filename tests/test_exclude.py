"""--exclude: the matched nodes stay float in every stage (plan, mixed precision, EPTQ, the written model, the report)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from eptq_onnx import QuantConfig, quantize
from eptq_onnx.cli import main
from eptq_onnx.config import MixedPrecisionOptions, OptimizeOptions
from eptq_onnx.errors import UsageError
from eptq_onnx.graph.normalize import normalize_model
from eptq_onnx.plan.exclusions import exclude_nodes
from eptq_onnx.plan.qpoints import build_plan
from eptq_onnx.twin.build import build_twin
from models.zoo_control import NAMED_CNN_CONVS, named_cnn
from tests.helpers import init_only

LINEAR = ("Conv", "Gemm")
ALL_LINEAR = (*NAMED_CNN_CONVS, "head")


@pytest.fixture(scope="module")
def cnn(tmp_path_factory: pytest.TempPathFactory) -> tuple[onnx.ModelProto, Path]:
    from models.calib_files import write_calib

    model = named_cnn()
    return model, write_calib(model, tmp_path_factory.mktemp("calib"), 16)


def _float_layers(qdq: onnx.ModelProto) -> set[str]:
    """The Conv/Gemm nodes of a written model whose weight no DequantizeLinear feeds; each of them must
    also have no QuantizeLinear on its output."""
    producer = {o: n for n in qdq.graph.node for o in n.output}
    readers = {}
    for n in qdq.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n.op_type)
    floats = set()
    for node in qdq.graph.node:
        if node.op_type not in LINEAR:
            continue
        feeder = producer.get(node.input[1])
        if feeder is None or feeder.op_type != "DequantizeLinear":
            floats.add(node.name)
            assert "QuantizeLinear" not in readers.get(node.output[0], []), node.name
    return floats


@pytest.mark.parametrize("patterns, expected", [
    (("block/conv2",), {"block/conv2"}),  # a node name
    (("proj_out",), {"proj"}),  # an output tensor name
    (("block/conv[12]",), {"block/conv1", "block/conv2"}),  # a regular expression over whole names
    (("op:Conv",), set(NAMED_CNN_CONVS)),  # an op type
    (("op:Gemm", "stem"), {"head", "stem"}),  # repeated
])
def test_excluded_layers_and_only_they_stay_float_in_the_written_model(cnn, patterns, expected) -> None:
    model, calib = cnn
    result = quantize(model, calib, init_only(exclude=patterns, measure_latency=False), progress=False)
    assert _float_layers(result.model) == expected
    assert {e["node"] for e in result.report.excluded} == expected
    assert all(e["pattern"] in patterns and e["op_type"] in LINEAR for e in result.report.excluded)
    quantized_weights = {t.name for t in result.report.tensors if t.kind == "weight"}
    assert quantized_weights == {f"{n}.weight" for n in ALL_LINEAR if n not in expected}


def test_an_excluded_layers_input_stays_float_unless_another_quantized_layer_reads_it(cnn) -> None:
    model, calib = cnn
    qdq = quantize(model, calib, init_only(exclude=("block/conv2", "stem"), measure_latency=False), progress=False).model
    quantized = {n.input[0] for n in qdq.graph.node if n.op_type == "QuantizeLinear"}
    assert "block/relu1_out" not in quantized  # read by block/conv2 alone
    assert "x" not in quantized  # the model input, read by stem alone
    assert "block/conv2_out" not in quantized and "stem_out" not in quantized
    assert "stem_relu_out" in quantized  # block/conv1 reads it too


def test_a_shared_grid_tensor_after_an_excluded_node_gets_its_own_range() -> None:
    model = normalize_model(named_cnn())
    plan = exclude_nodes(model, build_plan(model), ["proj_relu"])
    groups = {t: g for g in plan.groups for t in g.tensors}
    assert "proj_relu_out" not in groups  # the excluded Relu's output
    assert groups["pool_out"].roots == ["pool_out"]  # the MaxPool after it shared its grid: now calibrated itself
    assert [g.id for g in plan.groups] == list(range(len(plan.groups)))


def test_with_quantize_outputs_a_quantized_output_stays_and_an_excluded_ones_goes() -> None:
    model = normalize_model(named_cnn())
    base = build_plan(model, quantize_outputs=True)
    assert "logits" in base.group_of()
    kept = exclude_nodes(model, base, ["block/conv2"], quantize_outputs=True).group_of()
    assert "logits" in kept and "gap_out" in kept
    gone = exclude_nodes(model, base, ["head"], quantize_outputs=True).group_of()
    assert "logits" not in gone and "gap_out" not in gone  # read by the excluded Gemm alone


def test_mixed_precision_leaves_excluded_weights_out_of_the_candidates(cnn) -> None:
    model, calib = cnn
    config = QuantConfig(optimize=OptimizeOptions(iters=0), measure_latency=False, exclude=("proj",),
                         mixed=MixedPrecisionOptions(bit_options=(4, 8), avg_weight_bits=6.0, samples=8))
    result = quantize(model, calib, config, progress=False)
    layers = {layer["weight"] for layer in result.report.mixed_precision["layers"]}
    assert layers == {f"{n}.weight" for n in ALL_LINEAR if n != "proj"}
    assert _float_layers(result.model) == {"proj"}


def test_eptq_neither_trains_nor_quantizes_an_excluded_layer(cnn) -> None:
    model, calib = cnn
    config = QuantConfig(measure_latency=False, exclude=("block/conv2",),
                         optimize=OptimizeOptions(iters=5, hessian_samples=2, hessian_draws=2, discard_if_worse=False))
    result = quantize(model, calib, config, progress=False)
    assert result.report.optimization["iters"] == 5
    state = result.state
    assert "block/conv2.weight" not in state.weights
    original = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    trained = {t.name: numpy_helper.to_array(t) for t in state.float_model.graph.initializer}
    np.testing.assert_array_equal(trained["block/conv2.bias"], original["block/conv2.bias"])  # not trained
    assert not np.array_equal(trained["stem.bias"], original["stem.bias"])  # the quantized layers' biases are
    twin = build_twin(state.float_model, state.plan, state.weights, state.acts)
    assert "block/conv2.weight" not in twin.weight_quant and "stem.weight" in twin.weight_quant
    quantized = {t for g in state.plan.groups for t in g.tensors}
    assert not quantized & {"block/conv2_out", "block/relu1_out"}
    assert _float_layers(result.model) == {"block/conv2"}


def test_a_pattern_that_matches_nothing_is_a_usage_error_naming_it(cnn) -> None:
    model, calib = cnn
    with pytest.raises(UsageError, match="'nothing_here' matches no node"):
        quantize(model, calib, init_only(exclude=("stem", "nothing_here")), progress=False)
    with pytest.raises(UsageError, match="no valid regular expression"):
        quantize(model, calib, init_only(exclude=("conv(",)), progress=False)


def test_cli_exclude_is_repeatable_reported_and_a_miss_exits_2_in_one_line(cnn, tmp_path: Path) -> None:
    model, calib = cnn
    path = tmp_path / "cnn.onnx"
    onnx.save(model, path)
    report = tmp_path / "report.json"
    args = [str(path), str(tmp_path / "out.onnx"), "--calib", str(calib), "--iters", "0", "--no-latency", "-q"]
    result = CliRunner().invoke(main, [*args, "--exclude", "block/conv2", "--exclude", "op:Gemm", "--report", str(report)])
    assert result.exit_code == 0, result.output
    excluded = json.loads(report.read_text())["excluded"]
    assert excluded == [{"node": "block/conv2", "op_type": "Conv", "pattern": "block/conv2"},
                        {"node": "head", "op_type": "Gemm", "pattern": "op:Gemm"}]
    assert _float_layers(onnx.load(tmp_path / "out.onnx")) == {"block/conv2", "head"}
    result = CliRunner().invoke(main, [*args, "--force", "--exclude", "block/conv9"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "'block/conv9' matches no node" in lines[0], result.output


def test_a_matmul_whose_input_stays_float_stays_float_whole_on_ort_cpu(calib_for) -> None:
    """onnxruntime's CPU would run fc3 (float input h2, DequantizeLinear weight) as MatMulNBits and quantize
    h2 on the fly, outlier channel and all (output SQNR ~0 dB): on ort-cpu its weight stays float too and
    the model matches the float one; the generic target keeps the weight quantized."""
    import onnxruntime as ort

    from models import zoo_analysis

    model = zoo_analysis.outlier_channel_mlp()
    folder = calib_for(model, 16)
    x = np.concatenate([np.load(f)["x"][None] for f in sorted(folder.glob("*.npz"))])
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    for target, w3_quantized in (("ort-cpu", False), ("generic", True)):
        result = quantize(model, folder, init_only(weight_bits=8, exclude=("relu2",), target=target), progress=False)
        dequantized = {n.input[0] for n in result.model.graph.node if n.op_type == "DequantizeLinear"}
        assert ("w3_quantized" in dequantized) == w3_quantized and "w2_quantized" in dequantized
        assert any(op["node"] == "fc3" for op in result.report.float_ops) != w3_quantized
        if target == "ort-cpu":
            got = ort.InferenceSession(result.model.SerializeToString(),
                                       providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
            assert 10 * np.log10(np.sum(ref ** 2) / np.sum((ref - got) ** 2)) > 25.0


def _shared_weight_cnn() -> onnx.ModelProto:
    """x[1,4,8,8] -> Conv a (weight w) -> Relu -> Conv b (the same w) -> y: one initializer, two readers."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (4, 4, 3, 3)).astype(np.float32), "w")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["a_out"], name="a", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a_out"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w"], ["y"], name="b", pads=[1, 1, 1, 1])]
    value = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 4, 8, 8])
    model = helper.make_model(helper.make_graph(nodes, "shared", [value("x")], [value("y")], inits),
                              opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def test_an_excluded_reader_of_a_shared_weight_reads_it_float_while_the_other_stays_quantized(calib_for) -> None:
    """--exclude b, where a and b read one initializer: the writer, the fake-quant reference and the torch twin
    all leave b on the float weight and a on its 8-bit codes (the written model passes validation against
    the reference), and the student computes what onnxruntime computes on the written model."""
    from eptq_onnx.export.reference import fake_quant_model, fake_quant_name
    from eptq_onnx.twin.weighted import WeightedOp
    from tests.helpers import assert_student_matches_onnxruntime

    model = _shared_weight_cnn()
    result = quantize(model, calib_for(model, 16), init_only(weight_bits=8, exclude=("b",), measure_latency=False),
                      progress=False)
    state = result.state
    nodes = {n.name: n for n in result.model.graph.node}
    assert nodes["b"].input[1] == "w" and nodes["a"].input[1] != "w"
    dq = next(n for n in result.model.graph.node if n.output[0] == nodes["a"].input[1])
    assert dq.op_type == "DequantizeLinear"
    stored = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    np.testing.assert_array_equal(stored["w"], numpy_helper.to_array(model.graph.initializer[0]))
    reference = fake_quant_model(state.float_model, state.plan, state.weights, state.acts)
    readers = {n.name: n.input[1] for n in reference.graph.node if n.name in ("a", "b")}
    assert readers == {"a": fake_quant_name("w"), "b": "w"}
    twin = build_twin(state.float_model, state.plan, state.weights, state.acts)
    ops = {m.node: m for m in twin.student.modules() if isinstance(m, WeightedOp)}
    assert ops["a"].weight_quant is not None and ops["b"].weight_quant is None
    assert_student_matches_onnxruntime(model, result)
