"""The error catalogue (docs/errors.md), checked against the code: every row is triggered through the CLI.

The table between ``<!-- errors:begin -->`` and ``<!-- errors:end -->`` in docs/errors.md lists each
situation with its exit code and the message as printed (``<...>`` stands for a part that
varies). For every row this test builds the situation, runs the CLI, and asserts the exit code,
that the message is one line matching the catalogue's, and that nothing was written (files in the
output folder are byte-identical before and after). Rows with exit 0 are situations that are not
errors (ops that stay float): their message is a warning of the report. A case without a row, or
a row without a case, fails the test, so the table cannot drift from the code.
"""
from __future__ import annotations

import errno
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from eptq_onnx import io_checks, pipeline

from eptq_onnx.graph import model_io
from eptq_onnx.cli import main

CATALOGUE = Path(__file__).resolve().parents[1] / "docs" / "errors.md"
ROW = re.compile(r"^\| `(?P<case>[a-z0-9-]+)` \| (?P<situation>[^|]+) \| (?P<exit>\d+) \| `(?P<message>[^`]+)` \|$")


def catalogue() -> Dict[str, tuple[int, str]]:
    """case -> (exit code, message template) from the catalogue's table."""
    text = CATALOGUE.read_text()
    table = text.split("<!-- errors:begin -->")[1].split("<!-- errors:end -->")[0]
    rows = {}
    for line in table.strip().splitlines()[2:]:
        match = ROW.match(line.strip())
        assert match, f"docs/errors.md: malformed row {line!r}"
        rows[match["case"]] = (int(match["exit"]), match["message"])
    return rows


def template_regex(template: str) -> re.Pattern[str]:
    """A message template with ``<...>`` placeholders as a regex matching the whole line."""
    parts = re.split(r"<[^>]+>", template)
    return re.compile(".+".join(re.escape(p) for p in parts))


# ---------------------------------------------------------------- models and data


def _model(nodes: List[onnx.NodeProto], initializers: List[onnx.TensorProto], *, opset: int = 13,
           extra_opsets: tuple = (), dtype: int = TensorProto.FLOAT, shape: list | None = ["N", 8]) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", dtype, shape)],
        [helper.make_tensor_value_info("y", dtype, ["N", 8])], initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), *extra_opsets])
    model.ir_version = 8
    return model


def _weight(name: str = "W") -> onnx.TensorProto:
    return numpy_helper.from_array(np.random.default_rng(0).normal(size=(8, 8)).astype(np.float32), name)


def mlp(opset: int = 13) -> onnx.ModelProto:
    """x [N, 8] -> MatMul -> Relu -> MatMul -> y: the model of most cases."""
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "W2"], ["y"])]
    return _model(nodes, [_weight(), _weight("W2")], opset=opset)


def with_middle_op(node: onnx.NodeProto, *extra_opsets: onnx.OperatorSetIdProto) -> onnx.ModelProto:
    """MatMul -> ``node`` (reads h, writes m) -> MatMul."""
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]), node, helper.make_node("MatMul", ["m", "W2"], ["y"])]
    return _model(nodes, [_weight(), _weight("W2")], extra_opsets=extra_opsets)


def if_model() -> onnx.ModelProto:
    """An If on the sign of a sum: control flow between two MatMuls."""
    def branch(name: str, op: str) -> onnx.GraphProto:
        return helper.make_graph([helper.make_node(op, ["h"], [f"{name}_out"])], name, [],
                                 [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, ["N", 8])])

    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("ReduceSum", ["h"], ["s"], keepdims=0),
             helper.make_node("Greater", ["s", "zero"], ["c"]),
             helper.make_node("If", ["c"], ["m"], then_branch=branch("then", "Relu"), else_branch=branch("else", "Neg")),
             helper.make_node("MatMul", ["m", "W2"], ["y"])]
    zero = numpy_helper.from_array(np.array(0, np.float32), "zero")
    return _model(nodes, [_weight(), _weight("W2"), zero])


def calib_folder(folder: Path, n: int = 8, sample: Callable[[int], np.ndarray] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for i in range(n):
        np.save(folder / f"{i}.npy", sample(i) if sample else rng.normal(size=8).astype(np.float32))
    return folder


@dataclass
class Case:
    """Where a case runs: ``model``/``calib`` paths, the output folder and its default output."""

    tmp: Path
    monkeypatch: pytest.MonkeyPatch
    model: Path
    calib: Path

    @property
    def out(self) -> Path:
        return self.tmp / "out" / "model_q.onnx"

    def save(self, model: onnx.ModelProto, name: str = "bad.onnx") -> Path:
        path = self.tmp / name
        onnx.save(model, path)
        return path

    def args(self, model: Path | None = None, calib: Path | None = None, out: Path | None = None, *extra: str) -> list:
        return [model or self.model, out or self.out, "--calib", calib or self.calib, *extra]


def _external_missing(c: Case) -> list:
    path = c.tmp / "ext" / "m.onnx"
    path.parent.mkdir()
    onnx.save_model(mlp(), path, save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    (path.parent / "m.onnx.data").unlink()
    return c.args(path)


def _bad_bytes(c: Case, data: bytes) -> list:
    path = c.tmp / "bad.onnx"
    path.write_bytes(data)
    return c.args(path)


def _bad_calib(c: Case, sample: Callable[[int], np.ndarray], n: int = 8) -> list:
    return c.args(calib=calib_folder(c.tmp / "bad_calib", n, sample))


def _nan(i: int) -> np.ndarray:
    return np.array([0, 1, np.nan, 3, 4, 5, 6, 7], np.float32)


def _inf(i: int) -> np.ndarray:
    return np.array([0, 1, 2, np.inf, 4, 5, 6, 7], np.float32)


def _unreadable(c: Case) -> list:
    folder = calib_folder(c.tmp / "bad_calib", 3)
    (folder / "1.npy").write_bytes(b"\x93NUMPY garbage")
    return c.args(calib=folder)


def _missing_input(c: Case) -> list:
    folder = c.tmp / "bad_calib"
    folder.mkdir()
    np.savez(folder / "0.npz", a=np.zeros(8, np.float32), b=np.zeros(8, np.float32))
    return c.args(calib=folder)


def _dims_disagree(c: Case) -> list:
    """x [N, 8] and m [N, 8] (dim 0 named alike) from a file of 2 and 3 rows."""
    nodes = [helper.make_node("Add", ["x", "m"], ["s"]), helper.make_node("MatMul", ["s", "W"], ["y"])]
    model = _model(nodes, [_weight()])
    model.graph.input.append(helper.make_tensor_value_info("m", TensorProto.FLOAT, ["N", 8]))
    folder = c.tmp / "bad_calib"
    folder.mkdir()
    np.savez(folder / "0.npz", x=np.zeros((2, 8), np.float32), m=np.zeros((3, 8), np.float32))
    return c.args(c.save(model), folder)


def _empty_calib(c: Case) -> list:
    (c.tmp / "empty").mkdir()
    (c.tmp / "empty" / "notes.txt").write_text("no samples here")
    return c.args(calib=c.tmp / "empty")


def _calib_is_file(c: Case) -> list:
    (c.tmp / "calib.npy").write_bytes(b"")
    return c.args(calib=c.tmp / "calib.npy")


def _output_exists(c: Case) -> list:
    c.out.write_bytes(b"someone's model")
    return c.args()


def _output_unwritable(c: Case) -> list:
    folder = c.out.parent
    folder.chmod(0o500)
    real_access = os.access
    if os.geteuid() == 0:  # root writes anywhere: simulate the permission check's answer
        c.monkeypatch.setattr(io_checks.os, "access", lambda p, mode, *a, **k: False if Path(p) == folder else real_access(p, mode, *a, **k))
    return c.args()


def _disk_full(c: Case) -> list:
    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    c.monkeypatch.setattr(model_io.os, "fsync", no_space)  # the data reaches the disk at fsync
    return c.args()


def _corrupt_scale(c: Case) -> list:
    """The written model's first activation DequantizeLinear reads a doubled scale: validation must catch it."""
    real_write = pipeline.write_qdq

    def corrupted(*args, **kwargs):
        model, summary = real_write(*args, **kwargs)
        corrupt_first_activation_scale(model)
        return model, summary

    c.monkeypatch.setattr(pipeline, "write_qdq", corrupted)
    return c.args()


def corrupt_first_activation_scale(model: onnx.ModelProto, factor: float = 2.0) -> str:
    """Make the first activation DequantizeLinear read ``factor`` x its scale; returns its tensor."""
    quantized = {n.output[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in quantized)
    scale = next(t for t in model.graph.initializer if t.name == dq.input[1])
    model.graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(scale) * factor, scale.name + "_corrupt"))
    dq.input[1] = scale.name + "_corrupt"
    return dq.name.removesuffix("_DequantizeLinear")


def _config_unknown_option(c: Case) -> list:
    config = c.tmp / "run.json"
    config.write_text(json.dumps({"weight-bitz": 3}))
    return c.args(None, None, None, "--config", str(config))


CASES: Dict[str, Callable[[Case], list]] = {
    # bad model: exit 3
    "model-missing": lambda c: c.args(c.tmp / "nowhere.onnx"),
    "not-onnx": lambda c: _bad_bytes(c, b"this is not a model\n" * 10),
    "truncated": lambda c: _bad_bytes(c, mlp().SerializeToString()[:300]),
    "garbage": lambda c: _bad_bytes(c, np.random.default_rng(5).bytes(4096)),
    "checker": lambda c: c.args(c.save(_model([helper.make_node("MatMul", ["x", "W_missing"], ["y"])], []))),
    "old-opset": lambda c: c.args(c.save(mlp(opset=9))),
    "input-no-shape": lambda c: c.args(c.save(_model([helper.make_node("MatMul", ["x", "W"], ["y"])], [_weight()], shape=None))),
    "custom-op-no-kernel": lambda c: c.args(c.save(with_middle_op(
        helper.make_node("Foo", ["h"], ["m"], domain="com.example"), helper.make_opsetid("com.example", 1)))),
    "nothing-to-quantize": lambda c: c.args(c.save(_model([helper.make_node("Add", ["x", "x"], ["y"])], [], dtype=TensorProto.INT32))),
    "external-data-missing": _external_missing,
    # not errors: ops that stay float, exit 0, a warning in the report
    "unsupported-op": lambda c: c.args(c.save(with_middle_op(helper.make_node("Sign", ["h"], ["m"])))),
    "custom-domain-op": lambda c: c.args(c.save(with_middle_op(
        helper.make_node("Gelu", ["h"], ["m"], domain="com.microsoft"), helper.make_opsetid("com.microsoft", 1)))),
    "control-flow": lambda c: c.args(c.save(if_model())),
    # bad calibration data: exit 4
    "calib-missing": lambda c: c.args(calib=c.tmp / "no_such_folder"),
    "calib-not-a-folder": _calib_is_file,
    "calib-empty": _empty_calib,
    "calib-unreadable": _unreadable,
    "calib-wrong-shape": lambda c: _bad_calib(c, lambda i: np.zeros(7, np.float32)),
    "calib-wrong-dtype": lambda c: _bad_calib(c, lambda i: np.array(["a"] * 8)),
    "calib-nan": lambda c: _bad_calib(c, _nan),
    "calib-inf": lambda c: _bad_calib(c, _inf),
    "calib-missing-input": _missing_input,
    "calib-dims-disagree": _dims_disagree,
    "calib-too-few": lambda c: c.args(None, None, None, "--num-calib", "20"),
    # bad usage or paths: exit 2
    "output-is-input": lambda c: c.args(out=c.model),
    "output-exists": _output_exists,
    "output-is-folder": lambda c: c.args(out=c.out.parent),
    "output-folder-missing": lambda c: c.args(out=c.tmp / "no_dir" / "m.onnx"),
    "output-unwritable": _output_unwritable,
    "disk-full": _disk_full,
    "report-folder-missing": lambda c: c.args(None, None, None, "--report", str(c.tmp / "no_dir" / "r.json")),
    "weight-bits-too-many": lambda c: c.args(None, None, None, "--weight-bits", "9"),
    "weight-bits-too-few": lambda c: c.args(None, None, None, "--weight-bits", "1"),
    "act-bits-unsupported": lambda c: c.args(None, None, None, "--act-bits", "3"),
    "num-calib-zero": lambda c: c.args(None, None, None, "--num-calib", "0"),
    "percentile-out-of-range": lambda c: c.args(None, None, None, "--calib-method", "percentile", "--percentile", "30"),
    "time-budget-zero": lambda c: c.args(None, None, None, "--time-budget", "0"),
    "unknown-option": lambda c: c.args(None, None, None, "--wieght-bits", "4"),
    "exclude-no-match": lambda c: c.args(None, None, None, "--exclude", "nothing_here"),
    "config-unknown-option": _config_unknown_option,
    "infeasible-budget": lambda c: c.args(None, None, None, "--mixed-precision", "--avg-weight-bits", "1"),
    "strict-without-target": lambda c: c.args(None, None, None, "--strict"),
    # validation of the written model: exit 5
    "validation-diverges": _corrupt_scale,
    # --strict fidelity target not reached: exit 6
    "target-not-reached": lambda c: c.args(None, None, None, "--iters", "0", "--min-sqnr", "199", "--time-budget",
                                           "0.0001", "--strict"),
}


def _snapshot(folder: Path) -> Dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("base")
    path = folder / "mlp.onnx"
    onnx.save(mlp(), path)
    return path, calib_folder(folder / "calib")


def test_every_case_has_a_catalogue_row_and_back() -> None:
    rows = catalogue()
    assert sorted(rows) == sorted(CASES), "docs/errors.md and CASES differ: update both"


@pytest.mark.parametrize("case", sorted(CASES))
def test_error_catalogue(case: str, base: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code_expected, template = catalogue()[case]
    (tmp_path / "out").mkdir()
    c = Case(tmp_path, monkeypatch, *base)
    argv = [str(a) for a in CASES[case](c)]
    report = tmp_path / "report.json"
    if code_expected == 0:
        argv += ["--report", str(report)]
    before = _snapshot(tmp_path / "out")
    try:
        result = CliRunner().invoke(main, [*argv, "--iters", "0", "-q"])
    finally:
        (tmp_path / "out").chmod(0o700)
    lines = result.output.strip().splitlines()
    assert result.exit_code == code_expected, result.output
    if code_expected == 0:
        warnings = json.loads(report.read_text())["warnings"]
        pattern = template_regex(template.removeprefix("warning: "))
        assert any(pattern.fullmatch(w) for w in warnings), (template, warnings)
        assert c.out.is_file()
        return
    assert len(lines) == 1, result.output
    assert template_regex(template).fullmatch(lines[0]), (template, lines[0])
    assert _snapshot(tmp_path / "out") == before, "an error left files behind or changed them"
    assert not list(tmp_path.rglob("*.tmp")), "an error left a temporary file behind"
