"""Calibration data from memory (calib/memory.py): feeds, generators, arrays and onnxruntime readers are
read as a folder of the same arrays is, and give the same quantized model."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
import pytest
from onnxruntime.quantization import CalibrationDataReader

from eptq_onnx import quantize
from eptq_onnx.calib.data import CalibrationSet
from eptq_onnx.calib.memory import MemoryCalibrationSet, open_calibration
from eptq_onnx.calib.specs import input_specs
from eptq_onnx.config import CalibOptions
from eptq_onnx.errors import CalibrationError
from models import zoo
from tests.helpers import init_only
from models.calib_files import write_calib

DEMO = Path(__file__).resolve().parents[1] / "models" / "demo"


def _samples(model: onnx.ModelProto, n: int) -> list[dict[str, np.ndarray]]:
    """The samples write_calib stores (seed 0), without the batch dim."""
    return [{k: v[0] for k, v in zoo.sample_inputs(model, 1, i).items()} for i in range(n)]


def _batches(calib: CalibrationSet, size: int | None = None, limit: int | None = None) -> list[dict[str, np.ndarray]]:
    return list(calib.batches(size, limit=limit))


def _assert_same_batches(a: list[dict[str, np.ndarray]], b: list[dict[str, np.ndarray]]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            assert x[key].dtype == y[key].dtype
            np.testing.assert_array_equal(x[key], y[key])


def _memory(model: onnx.ModelProto, source, **options) -> CalibrationSet:
    return open_calibration(source, input_specs(model), CalibOptions(**options))


def test_a_list_of_dicts_reads_as_the_folder_of_the_same_arrays(tmp_path: Path) -> None:
    model = zoo.multi_input()
    folder = CalibrationSet(write_calib(model, tmp_path / "calib", 10), input_specs(model), CalibOptions(batch_size=4))
    memory = _memory(model, _samples(model, 10), batch_size=4)
    assert isinstance(memory, MemoryCalibrationSet)
    assert len(memory) == len(folder) == 10 and not memory.whole_feeds and memory.stackable
    for size, limit in ((None, None), (3, 7), (1, 1)):
        _assert_same_batches(_batches(memory, size, limit), _batches(folder, size, limit))
        assert memory.num_batches(size, limit) == folder.num_batches(size, limit)
    _assert_same_batches(_batches(memory), _batches(memory))  # read again, as every stage does


def test_torch_tensors_are_arrays_too(tmp_path: Path) -> None:
    import torch

    model = zoo.multi_input()
    samples = _samples(model, 4)
    tensors = [{k: torch.from_numpy(v) for k, v in s.items()} for s in samples]
    _assert_same_batches(_batches(_memory(model, tensors)), _batches(_memory(model, samples)))


def test_a_generator_is_consumed_once_and_no_further_than_needed() -> None:
    model = zoo.mlp()
    pulled = []

    def feeds() -> Iterator[dict[str, np.ndarray]]:
        for i in range(1000):
            pulled.append(i)
            yield {"input": np.full((2, 64), i, np.float32)}  # batches of 2

    calib = _memory(model, feeds(), num_samples=6, batch_size=4)
    assert len(calib) == 6 and len(pulled) <= 4  # 3 feeds hold the 6 samples (the scan looks at one more)
    first = _batches(calib)
    assert [b["input"].shape[0] for b in first] == [4, 2]
    _assert_same_batches(first, _batches(calib))


def test_single_arrays_and_one_batch_array_for_a_single_input_model() -> None:
    model = zoo.mlp()
    rows = np.random.default_rng(0).standard_normal((5, 64)).astype(np.float64)  # cast to float32 as files are
    calib = _memory(model, list(rows), batch_size=8)  # samples without the batch dim
    (batch,) = _batches(calib)
    assert batch["input"].dtype == np.float32 and batch["input"].shape == (5, 64)
    np.testing.assert_array_equal(batch["input"], rows.astype(np.float32))
    whole = _memory(model, rows, batch_size=2)  # one array: one batch of 5 samples
    assert len(whole) == 5
    np.testing.assert_array_equal(np.concatenate([b["input"] for b in _batches(whole)]), batch["input"])


class _Reader(CalibrationDataReader):
    """An onnxruntime-style reader: get_next() gives a feed, then None."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self._feeds = iter(feeds)

    def get_next(self):  # noqa: ANN201 - onnxruntime's signature
        return next(self._feeds, None)


def test_an_onnxruntime_calibration_data_reader(tmp_path: Path) -> None:
    model = zoo.multi_input()
    folder = CalibrationSet(write_calib(model, tmp_path / "calib", 6), input_specs(model), CalibOptions())
    batched = [{k: v[None] for k, v in s.items()} for s in _samples(model, 6)]  # with the batch dim, as ORT readers give
    _assert_same_batches(_batches(_memory(model, _Reader(batched))), _batches(folder))


@pytest.mark.parametrize("source, message", [
    ([{"input": np.zeros((64,), np.float32)}, {"input": np.zeros((63,), np.float32)}],
     "calibration feed 1: input 'input' has shape [63] but the model expects [?, 64]"),
    ([{"input": np.zeros((1, 64), np.complex64)}], "calibration feed 0: input 'input' has dtype complex64"),
    ([{"input": np.full((1, 64), np.nan, np.float32)}], "calibration feed 0: input 'input' contains NaN"),
    ([{"other": np.zeros((1, 64), np.float32), "more": np.zeros((1, 64), np.float32)}],
     "calibration feed 0: no array for input 'input'"),
    ([], "holds no feeds"),
    (42, "calibration data of type int"),
])
def test_data_that_does_not_fit_the_model_is_a_one_line_calibration_error(source, message) -> None:
    model = zoo.mlp()
    with pytest.raises(CalibrationError) as info:
        _batches(_memory(model, source))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_one_array_for_a_model_of_two_inputs_and_too_few_samples() -> None:
    model = zoo.multi_input()
    with pytest.raises(CalibrationError, match=r"calibration feed 0 is one ndarray, but the model has 2 inputs"):
        _memory(model, [np.zeros((3, 16, 16), np.float32)])
    with pytest.raises(CalibrationError, match="asked for 9 samples, the calibration data given in memory"):
        _memory(model, _samples(model, 4), num_samples=9)


def _hash(model: onnx.ModelProto) -> str:
    return hashlib.sha256(model.graph.SerializeToString()).hexdigest()


def test_the_demo_model_quantized_from_memory_equals_the_folder_run() -> None:
    model = onnx.load(DEMO / "digits_resnet.onnx")
    config = init_only(weight_bits=4, measure_latency=False, validation_samples=16,
                       calib=CalibOptions(num_samples=48))
    from_folder = quantize(model, DEMO / "calib", config, progress=False)
    arrays = [np.load(DEMO / "calib" / f"{i:04d}.npy") for i in range(48)]
    from_memory = quantize(model, (a for a in arrays), config, progress=False)
    assert _hash(from_memory.model) == _hash(from_folder.model)
    assert from_memory.report.calibration_samples == 48
