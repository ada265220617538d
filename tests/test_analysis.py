"""eptq-onnx-analyze: the culprit ranked first, numerics against numpy, the JSON report, the command line."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from eptq_onnx import QuantConfig
from eptq_onnx.analysis import analyze
from eptq_onnx.analysis.cli import main as analyze_main
from eptq_onnx.analysis.measure import measure
from eptq_onnx.analysis.result import SCHEMA
from eptq_onnx.cli import QUANTIZATION_OPTIONS, main as quantize_main
from eptq_onnx.context import RunContext
from eptq_onnx.pipeline import initial_state
from eptq_onnx.report import Report
from models import zoo_analysis


def test_ranks_the_outlier_channel_activation_first(calib_for) -> None:
    model = zoo_analysis.outlier_channel_mlp()
    # at 8 bits everywhere (the default would widen the culprit's point to 16 bits: tests/test_wide_acts.py)
    result = analyze(model, calib_for(model, 32), QuantConfig(weight_bits=8, act16_below=0.0), samples=32, progress=False)
    first = result.points[0]
    assert (first.point, first.kind, first.exclude) == (zoo_analysis.CULPRIT, "activation", zoo_analysis.CULPRIT_NODE)
    assert result.quantized_worst_db < 10.0 and first.float_sqnr_db > 25.0  # leaving it float fixes the model
    assert first.alone_sqnr_db < 10.0 and all(p.alone_sqnr_db > 30.0 for p in result.points[1:])
    assert [p.rank for p in result.points] == list(range(1, len(result.points) + 1))


def _fake_quant(x: np.ndarray, act) -> np.ndarray:
    """QuantizeLinear -> DequantizeLinear in float32, round half to even (onnxruntime's semantics)."""
    qmin, qmax = act.qrange
    scale = np.float32(act.scale)
    codes = np.clip(np.round(x / scale) + act.zero_point, qmin, qmax)
    return ((codes - act.zero_point) * scale).astype(np.float32)


def _sqnr(ref: np.ndarray, approx: np.ndarray) -> float:
    ref, approx = ref.astype(np.float64), approx.astype(np.float64)
    return 10.0 * np.log10(np.sum(ref ** 2) / np.sum((ref - approx) ** 2))


def test_tensor_sqnr_and_point_costs_match_numpy(calib_for) -> None:
    model = zoo_analysis.tiny_mlp()
    config = QuantConfig(weight_bits=4)
    run = RunContext(config, Report(input="tiny", output=None, config={}), progress=False)
    float_model, plan, calib, candidates, acts = initial_state(run, model, calib_for(model, 16))
    found = measure(float_model, plan, candidates[4], acts, calib, config, samples=12, progress=False)
    group = {g.roots[0]: acts[g.id] for g in plan.groups}
    assert set(group) == {"x", "h1"} and found.cost["samples"] == 12
    x = np.concatenate([f["x"] for f in calib.batches(limit=12)])
    w1, w2 = (numpy_weight(model, n) for n in ("w1", "w2"))
    q1, q2 = (candidates[4][n].dequantized() for n in ("w1", "w2"))
    xq = _fake_quant(x, group["x"])
    m1, m1q = x @ w1, xq @ q1
    h1, h1q = np.maximum(m1, 0), _fake_quant(np.maximum(m1q, 0), group["h1"])
    y, yq = h1 @ w2, h1q @ q2
    expected = {"x": _sqnr(x, xq), "m1": _sqnr(m1, m1q), "h1": _sqnr(h1, h1q), "y": _sqnr(y, yq)}
    measured = {t.tensor: t.sqnr_db for t in found.tensors}
    assert [t.tensor for t in found.tensors] == ["x", "m1", "h1", "y"]  # topological order
    for name, value in expected.items():
        assert measured[name] == pytest.approx(value, abs=0.02), name
    assert found.quantized_sqnr_db["y"] == pytest.approx(expected["y"], abs=0.02)
    costs = {p.point: p for p in found.points}
    alone_x = _sqnr(y, np.maximum(xq @ w1, 0) @ w2)  # only the input quantized
    float_w2 = _sqnr(y, np.maximum(m1q, 0) @ w2)  # --exclude fc2: w2 float, and h1, which reaches no other layer
    assert costs["x"].alone_sqnr_db == pytest.approx(alone_x, abs=0.02)
    assert costs["w2"].float_sqnr_db == pytest.approx(float_w2, abs=0.02)
    assert costs["w2"].gain_db == pytest.approx(float_w2 - expected["y"], abs=0.03)


def numpy_weight(model: onnx.ModelProto, name: str) -> np.ndarray:
    return next(onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


def _run(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(analyze_main, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.fixture
def culprit_files(tmp_path: Path, calib_for) -> tuple[Path, Path]:
    model = zoo_analysis.outlier_channel_mlp()
    path = tmp_path / "culprit.onnx"
    onnx.save(model, path)
    return path, calib_for(model, 16)


def test_cli_writes_report_and_plot_and_no_model(culprit_files, tmp_path: Path) -> None:
    model, calib = culprit_files
    report, plots = tmp_path / "analysis.json", tmp_path / "plots"
    before = set(tmp_path.iterdir())
    code, text = _run(model, "--calib", calib, "--weight-bits", "8", "--act16-below", "0", "--sensitivity-samples", "8",
                      "--report", report, "--plots", plots, "--output", "y")
    assert code == 0, text
    assert "h2" in text and "costliest quantization points" in text
    assert (plots / "analysis.png").read_bytes()[:4] == b"\x89PNG"
    assert set(tmp_path.iterdir()) - before == {report, plots}  # no model written
    data = json.loads(report.read_text())
    assert data["schema"] == SCHEMA and data["samples"] == 8 and data["outputs"] == ["y"]
    assert data["config"]["weight_bits"] == 8 and data["config"]["optimize"]["iters"] == 0
    point_keys = {"rank", "point", "kind", "node", "op_type", "tensor", "bits", "exclude", "alone_sqnr_db",
                  "float_sqnr_db", "gain_db", "noise_share", "alone_by_output", "float_by_output"}
    assert all(set(p) == point_keys for p in data["points"]) and len(data["points"]) == 6
    assert [p["rank"] for p in data["points"]] == list(range(1, 7)) and data["points"][0]["point"] == "h2"
    assert {p["kind"] for p in data["points"]} == {"weight", "activation"}
    assert [t["index"] for t in data["tensors"]] == list(range(len(data["tensors"])))
    assert all(set(t) == {"index", "tensor", "op_type", "node", "sqnr_db", "point"} for t in data["tensors"])
    cost = data["cost"]
    assert cost["points"] == 6 and cost["evaluations"] == 2 * 6 + 1 and cost["evaluation_over_float_forward"] > 0
    assert isinstance(data["quantized_sqnr_db"]["y"], float) and data["quantized_worst_sqnr_db"] < 10.0


def test_cli_exclude_reaches_the_analysis(culprit_files, tmp_path: Path) -> None:
    model, calib = culprit_files
    report = tmp_path / "analysis.json"
    code, text = _run(model, "--calib", calib, "--weight-bits", "8", "--sensitivity-samples", "8",
                      "--exclude", zoo_analysis.CULPRIT_NODE, "--report", report, "-q")
    assert code == 0 and text == ""
    data = json.loads(report.read_text())
    assert "h2" not in {p["point"] for p in data["points"]} and data["quantized_worst_sqnr_db"] > 25.0
    assert data["excluded"] == [{"node": "relu2", "op": "Relu", "pattern": "relu2"}]


def test_cli_errors_are_one_line_with_exit_codes(culprit_files, tmp_path: Path) -> None:
    model, calib = culprit_files
    bad = tmp_path / "bad.onnx"
    bad.write_text("not a model")
    cases = [
        ((bad, "--calib", calib), 3),
        ((tmp_path / "missing.onnx", "--calib", calib), 3),
        ((model, "--calib", tmp_path / "nowhere"), 4),
        ((model, "--calib", calib, "--weight-bits", "1"), 2),
        ((model, "--calib", calib, "--report", tmp_path / "no_dir" / "a.json"), 2),
        ((model, "--calib", calib, "--exclude", "no_such_node"), 2),
        ((model, "--calib", calib, "--output", "no_such_output"), 2),
        ((model,), 2),
    ]
    for args, exit_code in cases:
        code, text = _run(*args, "-q")
        assert code == exit_code, (args, text)
        assert text.startswith("error: ") and len(text.strip().splitlines()) == 1, text


def test_both_commands_share_the_quantization_options() -> None:
    def shared(command):
        return {p.name: (p.opts, p.default, p.help) for p in command.params if p.name in names}

    names = {p.name for p in QUANTIZATION_OPTIONS(lambda **kw: None).__click_params__}
    assert {"calib_dir", "weight_bits", "act_bits", "exclude", "num_calib", "target"} <= names
    assert shared(analyze_main) == shared(quantize_main) and len(shared(analyze_main)) == len(names)
