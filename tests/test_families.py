"""Every architecture family and trap model of the zoo through the pipeline, from every exporter.

Default run: a subset of the models at their default export (W8A8 with twin equivalence, W4A8
with a few EPTQ steps; tests/test_pipeline.py quantizes every zoo model at W8A8 and W4A8) and a
subset of the exporter x opset matrix; ``-m slow`` runs every model and the whole matrix.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from eptq_onnx import QuantConfig, quantize
from eptq_onnx.config import OptimizeOptions
from eptq_onnx.graph.runtime import make_session
from models import zoo
from models.zoo_families import EXPORT_OPSETS, FAMILIES, newest_ort_opset
from models.zoo_traps import TRAPS
from tests.helpers import assert_student_matches_onnxruntime, init_only

NEW_MODELS = sorted({**FAMILIES, **TRAPS})
W8A8_FLOOR_DB = 15.0  # output SQNR of every family at W8A8 (random weights; most reach 30-55 dB)
FAST_EXPORTS = [("deit", "dynamo"), ("mobilenet_v3", "legacy"), ("segmentation_head", "dynamo")]
W4A8_FAST = ("deit", "bert_attention_mask", "mobilenet_v3", "conv_lstm")  # the others: -m slow


def _opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _outputs(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return make_session(model, optimize=False).run(None, feeds)


def _sqnr(ref: np.ndarray, test: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / max(np.sum((ref - test) ** 2), 1e-30)))


def _check_w8a8(model: onnx.ModelProto, calib_for) -> None:
    """W8A8 (MSE init): runs, validates, finite outputs above the SQNR floor, twin == onnxruntime."""
    result = quantize(model, calib_for(model, 8), init_only(weight_bits=8), progress=False)
    feeds = zoo.sample_inputs(model, 4, seed=5)
    for ref, out in zip(_outputs(model, feeds), _outputs(result.model, feeds)):
        assert np.isfinite(out).all()
        assert _sqnr(ref, out) > W8A8_FLOOR_DB
    assert not [w for w in result.report.warnings if "FALLBACK" in w]
    assert_student_matches_onnxruntime(model, result)


TWIN_FAST = ("deit", "bert_attention_mask", "mobilevit", "mobilenet_v3", "segmentation_head", "conv_lstm")


@pytest.mark.parametrize("name", [n if n in TWIN_FAST else pytest.param(n, marks=pytest.mark.slow) for n in NEW_MODELS])
def test_w8a8_and_twin(name: str, calib_for) -> None:
    _check_w8a8(zoo.ZOO[name](), calib_for)


@pytest.mark.parametrize("name", [n if n in W4A8_FAST else pytest.param(n, marks=pytest.mark.slow) for n in NEW_MODELS])
def test_w4a8_eptq_runs(name: str, calib_for) -> None:
    """W4A8 with 3 EPTQ steps: the optimization runs (no fallback), the model validates and is finite."""
    model = zoo.ZOO[name]()
    options = OptimizeOptions(iters=3, hessian_samples=2, hessian_draws=2, batch_size=4, discard_if_worse=False)
    config = QuantConfig(weight_bits=4, optimize=options)
    result = quantize(model, calib_for(model, 8), config, progress=False)
    assert result.report.optimization["iters"] == 3
    assert not [w for w in result.report.warnings if "FALLBACK" in w]
    types = {t.data_type for t in result.model.graph.initializer}
    assert onnx.TensorProto.INT4 in types  # native 4-bit weights
    for out in _outputs(result.model, zoo.sample_inputs(model, 2, seed=3)):
        assert np.isfinite(out).all()


def test_transformer_points_follow_the_paper(calib_for) -> None:
    """DeiT/BERT: act x act MatMuls quantize both inputs; Softmax, LayerNorm and GELU outputs are
    points; embedding tables are quantized weights (paper A.1)."""
    for name in ("deit", "bert_encoder"):
        model = zoo.ZOO[name]()
        plan = quantize(model, calib_for(model, 4, name=name), init_only(weight_bits=8), progress=False).state.plan
        graph = model.graph
        constants = {t.name for t in graph.initializer}
        producers = {o: n for n in graph.node for o in n.output}
        consumers = {i: [n for n in graph.node if i in n.input] for n in graph.node for i in n.input}
        quantized = set(plan.group_of())
        act_matmuls = [n for n in graph.node if n.op_type == "MatMul" and not set(n.input) & constants]
        assert len(act_matmuls) == 2  # scores and context
        for node in act_matmuls:
            assert set(node.input) <= quantized, f"{name}: act x act MatMul {node.name} inputs not all quantized"
        kinds = {producers[t].op_type for t in quantized if t in producers}
        assert {"Softmax", "LayerNormalization"} <= kinds
        for erf in [n for n in graph.node if n.op_type == "Erf"]:  # GELU: one point at its end, none inside
            tensor, inside = erf.output[0], []
            while not any(c.op_type in ("MatMul", "Gemm") for c in consumers.get(tensor, [])):
                inside.append(tensor)
                (tensor,) = [c.output[0] for c in consumers[tensor]]
            assert tensor in quantized and not set(inside) & quantized
        if name == "bert_encoder":
            # word and token-type tables; the position lookup has constant indices and is folded into a constant
            assert sorted(p.weight for p in plan.weights if p.op_type == "Gather") == ["token_type.weight", "word.weight"]


def test_export_opsets_probe_onnxruntime() -> None:
    assert newest_ort_opset() >= 21
    assert EXPORT_OPSETS["legacy"][:2] == [13, 17] and EXPORT_OPSETS["legacy"][-1] <= newest_ort_opset()
    assert min(EXPORT_OPSETS["dynamo"]) == zoo.MIN_DYNAMO_OPSET and max(EXPORT_OPSETS["dynamo"]) <= newest_ort_opset()


def _exports(pairs: list[tuple[str, str]]) -> list[tuple[str, str, int]]:
    return [(name, exporter, opset) for name, exporter in pairs for opset in EXPORT_OPSETS[exporter]]


def _check_export(name: str, exporter: str, opset: int, calib_for) -> None:
    """The export matches the default export numerically and goes through the W8A8 pipeline."""
    builder = zoo.ZOO[name]
    model = builder(opset, dynamo=exporter == "dynamo")
    assert _opset(model) == opset
    reference = builder()
    feeds = zoo.sample_inputs(reference, 3, seed=2)
    for a, b in zip(_outputs(model, feeds), _outputs(reference, feeds)):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)
    _check_w8a8(model, calib_for)


FAST = [(n, e, max(EXPORT_OPSETS[e])) for n, e in FAST_EXPORTS]


@pytest.mark.parametrize(("name", "exporter", "opset"), FAST)
def test_exporters_fast_subset(name: str, exporter: str, opset: int, calib_for) -> None:
    _check_export(name, exporter, opset, calib_for)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "exporter", "opset"),
                         _exports([(n, e) for n in NEW_MODELS for e in ("legacy", "dynamo")]))
def test_exporter_matrix(name: str, exporter: str, opset: int, calib_for) -> None:
    _check_export(name, exporter, opset, calib_for)


MIXED_FAST = ("deit", "mobilenet_v3", "segmentation_head")  # the others: -m slow


@pytest.mark.parametrize("name", [n if n in MIXED_FAST else pytest.param(n, marks=pytest.mark.slow) for n in NEW_MODELS])
def test_mixed_precision_runs(name: str, calib_for) -> None:
    """Mixed precision over {2, 4, 8} at 4 bits average: the budget holds, the model validates, outputs are finite."""
    from eptq_onnx.config import MixedPrecisionOptions

    model = zoo.ZOO[name]()
    config = QuantConfig(optimize=OptimizeOptions(iters=0, hessian_samples=2, hessian_draws=2),
                         mixed=MixedPrecisionOptions(avg_weight_bits=4.0, samples=8))
    result = quantize(model, calib_for(model, 8), config, progress=False)
    mixed = result.report.mixed_precision
    assert mixed["memory_bytes"] <= mixed["budget_bytes"]
    assert {layer["bits"] for layer in mixed["layers"]} <= {2, 4, 8}
    for out in _outputs(result.model, zoo.sample_inputs(model, 2, seed=3)):
        assert np.isfinite(out).all()
