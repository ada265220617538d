"""Reading and writing ONNX files: errors, atomic writes, IR versions, external data."""
from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import uses_external_data

from eptq_onnx.graph import model_io
from eptq_onnx.errors import ModelError, UsageError


def _matmul_model(opset: int = 13) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32), "W")
    bias = numpy_helper.from_array(np.ones(32, np.float32), "b")  # small: stays inline
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 32])],
        [weight, bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = model_io.ir_version_for(opset)
    return model


def _run(path_or_model, x: np.ndarray) -> np.ndarray:
    source = path_or_model if isinstance(path_or_model, str) else path_or_model.SerializeToString()
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture
def x() -> np.ndarray:
    return np.random.default_rng(1).standard_normal((2, 64)).astype(np.float32)


# ---------------------------------------------------------------- versions


def test_ort_max_ir_version_is_accepted_and_next_refused() -> None:
    model = _matmul_model()
    model.ir_version = model_io.ORT_MAX_IR_VERSION
    ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    model.ir_version += 1
    with pytest.raises(Exception, match="IR version"):
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_ir_version_for_known_opsets() -> None:
    assert model_io.ir_version_for(11) == 6
    assert model_io.ir_version_for(13) == 7
    assert model_io.ir_version_for(21) == 10
    assert model_io.ir_version_for(10_000) == model_io.ORT_MAX_IR_VERSION


# ---------------------------------------------------------------- loading


def test_load_round_trip(tmp_path: Path) -> None:
    onnx.save_model(_matmul_model(), tmp_path / "m.onnx")
    assert model_io.load_model(tmp_path / "m.onnx").graph.node[0].op_type == "MatMul"


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no such file"):
        model_io.load_model(tmp_path / "nope.onnx")


@pytest.mark.parametrize("content", [b"this is not an onnx model\n", b"", b"\x08\x07"])
def test_load_not_onnx(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "bad.onnx").write_bytes(content)
    with pytest.raises(ModelError, match="not an ONNX model"):
        model_io.load_model(tmp_path / "bad.onnx")


def test_load_truncated(tmp_path: Path) -> None:
    data = _matmul_model().SerializeToString()
    (tmp_path / "half.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="truncated"):
        model_io.load_model(tmp_path / "half.onnx")


def _save_external(model: onnx.ModelProto, path: Path) -> None:
    onnx.save_model(model, path, save_as_external_data=True, location=path.name + ".weights")


def test_load_external_data(tmp_path: Path, x: np.ndarray) -> None:
    _save_external(_matmul_model(), tmp_path / "m.onnx")
    model = model_io.load_model(tmp_path / "m.onnx")
    assert not any(uses_external_data(t) for t in model.graph.initializer)
    np.testing.assert_array_equal(_run(model, x), _run(_matmul_model(), x))


def test_load_missing_external_data_names_the_file(tmp_path: Path) -> None:
    _save_external(_matmul_model(), tmp_path / "m.onnx")
    (tmp_path / "m.onnx.weights").unlink()
    with pytest.raises(ModelError, match=r"'m\.onnx\.weights'.*missing"):
        model_io.load_model(tmp_path / "m.onnx")


# ---------------------------------------------------------------- saving


def test_save_sets_ir_version_onnxruntime_accepts(tmp_path: Path, x: np.ndarray) -> None:
    model = _matmul_model(opset=21)
    model.ir_version = onnx.IR_VERSION + 1
    model_io.save_model(model, tmp_path / "m.onnx")
    assert onnx.load(tmp_path / "m.onnx").ir_version == model_io.ir_version_for(21) == 10
    _run(str(tmp_path / "m.onnx"), x)


def test_save_refuses_overwrite_without_force(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(b"keep me")
    with pytest.raises(UsageError, match="exists"):
        model_io.save_model(_matmul_model(), path)
    assert path.read_bytes() == b"keep me"
    model_io.save_model(_matmul_model(), path, force=True)
    assert model_io.load_model(path).graph.node
    assert _files(tmp_path) == ["m.onnx"]


def test_save_into_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        model_io.save_model(_matmul_model(), tmp_path / "no" / "m.onnx")


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), UsageError),
        (KeyboardInterrupt(), KeyboardInterrupt),
    ],
)
@pytest.mark.parametrize("external", [False, True])
def test_failed_save_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: BaseException, expected: type, external: bool
) -> None:
    model = _matmul_model()
    before = model.SerializeToString()
    if external:
        monkeypatch.setattr(model_io, "EXTERNAL_DATA_THRESHOLD", 0)

    def fail(*_args: object) -> None:
        raise error

    monkeypatch.setattr(model_io.os, "fsync", fail)
    with pytest.raises(expected):
        model_io.save_model(model, tmp_path / "m.onnx")
    assert _files(tmp_path) == []
    model.ir_version = onnx.load_model_from_string(before).ir_version
    assert model.SerializeToString() == before  # external-data bookkeeping was undone


def test_failed_replace_of_existing_file_keeps_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(b"old")

    def fail(*_args: object) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(model_io.os, "replace", fail)
    with pytest.raises(UsageError, match="I/O error"):
        model_io.save_model(_matmul_model(), path, force=True)
    assert _files(tmp_path) == ["m.onnx"] and path.read_bytes() == b"old"


def test_large_model_written_with_external_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, x: np.ndarray
) -> None:
    monkeypatch.setattr(model_io, "EXTERNAL_DATA_THRESHOLD", 1000)
    _save_external(_matmul_model(), tmp_path / "in.onnx")
    model = model_io.load_model(tmp_path / "in.onnx")
    model_io.save_model(model, tmp_path / "out.onnx")

    assert _files(tmp_path) == ["in.onnx", "in.onnx.weights", "out.onnx", "out.onnx.data"]
    assert (tmp_path / "out.onnx.data").stat().st_size == 64 * 32 * 4  # W only; b is small
    written = onnx.load(tmp_path / "out.onnx", load_external_data=False)
    assert [uses_external_data(t) for t in written.graph.initializer] == [True, False]
    assert not any(uses_external_data(t) for t in model.graph.initializer)  # caller's model intact
    np.testing.assert_array_equal(_run(str(tmp_path / "out.onnx"), x), _run(_matmul_model(), x))
    reloaded = model_io.load_model(tmp_path / "out.onnx")
    assert reloaded.graph.initializer[0].raw_data == model.graph.initializer[0].raw_data


def test_external_data_file_is_not_overwritten_without_force(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(model_io, "EXTERNAL_DATA_THRESHOLD", 0)
    (tmp_path / "m.onnx.data").write_bytes(b"someone else's")
    with pytest.raises(UsageError, match="m.onnx.data exists"):
        model_io.save_model(_matmul_model(), tmp_path / "m.onnx")
    assert _files(tmp_path) == ["m.onnx.data"]


def test_saved_file_mode_follows_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        model_io.save_model(_matmul_model(), tmp_path / "m.onnx")
    finally:
        os.umask(old)
    assert (tmp_path / "m.onnx").stat().st_mode & 0o777 == 0o644
