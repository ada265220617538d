"""The command line: success, every bad input gives one line, an exit code and no output file."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from eptq_onnx.cli import main
from models import zoo

DEMO = Path(__file__).resolve().parents[1] / "models" / "demo"


def _run(*args: str) -> tuple[int, str]:
    """Invoke the CLI (without EPTQ optimization unless --iters is given: these tests are about I/O)."""
    argv = [str(a) for a in args]
    if "--iters" not in argv:
        argv += ["--iters", "0"]
    result = CliRunner().invoke(main, argv)
    return result.exit_code, result.output


@pytest.fixture
def mlp_files(tmp_path: Path, calib_for) -> tuple[Path, Path]:
    model = zoo.mlp()
    path = tmp_path / "mlp.onnx"
    onnx.save(model, path)
    return path, calib_for(model, 8)


def test_cli_quantizes_the_demo_model_and_writes_report(tmp_path: Path) -> None:
    out, report = tmp_path / "demo_w8a8.onnx", tmp_path / "report.json"
    code, text = _run(DEMO / "digits_resnet.onnx", out, "--calib", DEMO / "calib", "--weight-bits", "8",
                      "--num-calib", "64", "--report", report, "--quiet")
    assert code == 0, text
    data = json.loads(report.read_text())
    assert data["validation"]["fused_linear_ops"] == data["validation"]["linear_ops"] == 8
    sys.path.insert(0, str(DEMO))
    from evaluate import accuracy  # noqa: E402

    assert accuracy(out) >= accuracy(DEMO / "digits_resnet.onnx") - 0.005  # W8A8 within 0.5 point


def test_console_script_help_lists_every_option() -> None:
    text = subprocess.run([sys.executable, "-m", "eptq_onnx.cli", "--help"], capture_output=True, text=True, check=True).stdout
    for option in ("--calib", "--weight-bits", "--act-bits", "--act-symmetric", "--calib-method", "--weight-storage",
                   "--quantize-outputs", "--num-calib", "--image-size", "--mean", "--std", "--scale", "--layout",
                   "--bgr", "--report", "--force", "Exit codes"):
        assert option in text


def test_refuses_to_overwrite_without_force_and_never_the_input(mlp_files, tmp_path: Path) -> None:
    model, calib = mlp_files
    out = tmp_path / "out.onnx"
    out.write_text("keep me")
    code, text = _run(model, out, "--calib", calib, "-q")
    assert code == 2 and "--force" in text and out.read_text() == "keep me"
    code, text = _run(model, model, "--calib", calib, "-q", "--force")
    assert code == 2 and "is the input model" in text
    code, _ = _run(model, out, "--calib", calib, "-q", "--force")
    assert code == 0 and onnx.load(out).graph.node


def _bad_model(kind: str, tmp_path: Path) -> Path:
    path = tmp_path / f"{kind}.onnx"
    if kind == "not_onnx":
        path.write_text("this is not a model\n" * 10)
    elif kind == "truncated":
        data = zoo.residual_cnn().SerializeToString()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "old_opset":
        model = zoo.helper_opset11()
        model.opset_import[0].version = 9
        onnx.save(model, path)
    elif kind == "missing":
        pass
    return path


@pytest.mark.parametrize("kind", ["not_onnx", "truncated", "old_opset", "missing"])
def test_bad_models_exit_3_with_one_line(kind: str, mlp_files, tmp_path: Path) -> None:
    _, calib = mlp_files
    out = tmp_path / "out.onnx"
    code, text = _run(_bad_model(kind, tmp_path), out, "--calib", calib, "-q")
    assert code == 3, text
    assert text.startswith("error: ") and len(text.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.glob("out.onnx*"))


def _bad_calib(kind: str, folder: Path) -> Path:
    folder.mkdir()
    sample = np.random.default_rng(0).normal(size=64).astype(np.float32)
    if kind == "wrong_shape":
        np.save(folder / "0.npy", np.zeros(63, np.float32))
    elif kind == "wrong_dtype":
        np.save(folder / "0.npy", np.array(["a"] * 64))
    elif kind == "nan":
        sample[3] = np.nan
        np.save(folder / "0.npy", sample)
    elif kind == "unreadable":
        (folder / "0.npy").write_bytes(b"\x93NUMPY garbage")
    elif kind == "missing_name":
        np.savez(folder / "0.npz", other=sample, more=sample)
    elif kind == "too_few":
        np.save(folder / "0.npy", sample)
    return folder


@pytest.mark.parametrize("kind", ["empty", "wrong_shape", "wrong_dtype", "nan", "unreadable", "missing_name", "too_few"])
def test_bad_calibration_exit_4_with_one_line_naming_the_file(kind: str, mlp_files, tmp_path: Path) -> None:
    model, _ = mlp_files
    folder = _bad_calib(kind, tmp_path / "bad_calib")
    out = tmp_path / "out.onnx"
    extra = ["--num-calib", "5"] if kind == "too_few" else []
    code, text = _run(model, out, "--calib", folder, "-q", *extra)
    assert code == 4, text
    assert text.startswith("error: ") and len(text.strip().splitlines()) == 1
    if kind not in ("empty", "too_few"):
        assert "0.np" in text
    assert not out.exists()


def test_missing_calibration_folder_and_bad_options(mlp_files, tmp_path: Path) -> None:
    model, calib = mlp_files
    code, text = _run(model, tmp_path / "o.onnx", "--calib", tmp_path / "nowhere", "-q")
    assert code == 4 and "nowhere" in text
    code, text = _run(model, tmp_path / "o.onnx", "--calib", calib, "--weight-bits", "1")
    assert code == 2
    code, text = _run(model, tmp_path / "o.onnx", "--calib", calib, "--image-size", "abc")
    assert code == 2 and "--image-size" in text
    code, text = _run(model, tmp_path / "no_dir" / "o.onnx", "--calib", calib)
    assert code == 2 and "does not exist" in text


def test_unsupported_op_stays_float_and_is_reported(tmp_path: Path, calib_for) -> None:
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["a"]), helper.make_node("Det", ["a"], ["d"]),
         helper.make_node("Mul", ["a", "d"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 4])], initializer=[w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path, out, report = tmp_path / "det.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    onnx.save(model, path)
    code, text = _run(path, out, "--calib", calib_for(model, 4), "--report", report, "-q", "--weight-bits", "8")
    assert code == 0, text
    ops = json.loads(report.read_text())["float_ops"]
    assert [o["op_type"] for o in ops] == ["Det"]
    # with optimization asked for, the torch twin cannot hold Det: a loud fallback, not a failure
    code, text = _run(path, out, "--calib", calib_for(model, 4, name="c2"), "--report", report, "--force",
                      "--iters", "2", "-q", "--weight-bits", "8")
    assert code == 0, text
    warnings = json.loads(report.read_text())["warnings"]
    assert any(w.startswith("FALLBACK: EPTQ optimization skipped") and "Det" in w for w in warnings)
