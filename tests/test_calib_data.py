"""Tests of eptq_onnx.calib.data: reading a calibration folder as model feeds."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from eptq_onnx.calib import data as calib_data
from eptq_onnx.calib.data import CalibrationSet
from eptq_onnx.calib.specs import InputSpec, input_specs
from eptq_onnx.config import CalibOptions, ImageOptions
from eptq_onnx.errors import CalibrationError, ModelError, UsageError

IMAGE_SPEC = InputSpec("x", np.float32, (None, 3, 4, 5))
SINGLE = [InputSpec("x", np.float32, (None, 3, 4, 4))]
MULTI = [InputSpec("a", np.float32, (None, 3)), InputSpec("b", np.int64, (None, 2))]


def rand(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def collect(calib: CalibrationSet, **kwargs) -> list[dict[str, np.ndarray]]:
    return list(calib.batches(**kwargs))


def make(folder: Path, specs: list[InputSpec], **options) -> CalibrationSet:
    image = options.pop("image", ImageOptions())
    return CalibrationSet(folder, specs, CalibOptions(image=image, **options))


def error_of(exc_type: type[Exception], fn, *parts: str) -> str:
    """Run fn, expect exc_type with a one-line message containing every part; return the message."""
    with pytest.raises(exc_type) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message
    for part in parts:
        assert part in message, f"{part!r} not in {message!r}"
    return message


# --------------------------------------------------------------------------- input_specs


def test_input_specs_skip_initializers_and_read_dtypes_and_dynamic_dims() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 4, 4])
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 5])
    w_info = helper.make_tensor_value_info("w", TensorProto.FLOAT, [3])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    w = numpy_helper.from_array(np.ones(3, np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "g", [x, w_info, ids], [out], initializer=[w]
    )
    specs = input_specs(helper.make_model(graph))
    assert specs == [
        InputSpec("x", np.dtype(np.float32), (None, 3, 4, 4)),
        InputSpec("ids", np.dtype(np.int64), (1, 5)),
    ]
    assert isinstance(specs[0].dtype, np.dtype)


def test_input_specs_rejects_shapeless_input() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, None)
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [x])
    error_of(ModelError, lambda: input_specs(helper.make_model(graph)), "'x'", "no shape")


# --------------------------------------------------------------------------- arrays


def test_one_sample_per_npy_file(tmp_path: Path) -> None:
    samples = [rand(3, 4, 4, seed=i) for i in range(3)]
    for i, sample in enumerate(samples):
        np.save(tmp_path / f"s{i}.npy", sample.astype(np.float64))
    calib = make(tmp_path, SINGLE, batch_size=2)
    batches = collect(calib)
    assert len(calib) == 3
    assert [b["x"].shape for b in batches] == [(2, 3, 4, 4), (1, 3, 4, 4)]
    assert all(b["x"].dtype == np.float32 for b in batches)
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in batches]), np.stack(samples))


def test_batch_npy_is_split_into_batches(tmp_path: Path) -> None:
    data = rand(5, 3, 4, 4)
    np.save(tmp_path / "batch.npy", data)
    batches = collect(make(tmp_path, SINGLE), batch_size=2)
    assert [b["x"].shape[0] for b in batches] == [2, 2, 1]
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in batches]), data)


def test_batches_span_files(tmp_path: Path) -> None:
    first, second = rand(3, 3, 4, 4, seed=1), rand(2, 3, 4, 4, seed=2)
    np.save(tmp_path / "a.npy", first)
    np.save(tmp_path / "b.npy", second)
    batches = collect(make(tmp_path, SINGLE, batch_size=4))
    assert [b["x"].shape[0] for b in batches] == [4, 1]
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in batches]), np.concatenate([first, second]))


def test_npz_multi_input(tmp_path: Path) -> None:
    np.savez(tmp_path / "1.npz", a=np.arange(3, dtype=np.float32), b=np.array([1, 2], dtype=np.int32))
    np.savez_compressed(
        tmp_path / "2.npz", a=np.ones((2, 3), np.float16), b=np.array([[3, 4], [5, 6]], np.int64), extra=np.zeros(1)
    )
    calib = make(tmp_path, MULTI, batch_size=8)
    (batch,) = collect(calib)
    assert len(calib) == 3
    assert batch["a"].dtype == np.float32 and batch["b"].dtype == np.int64
    np.testing.assert_array_equal(batch["a"], [[0, 1, 2], [1, 1, 1], [1, 1, 1]])
    np.testing.assert_array_equal(batch["b"], [[1, 2], [3, 4], [5, 6]])


def test_npz_single_input_accepts_any_key(tmp_path: Path) -> None:
    data = rand(2, 3, 4, 4)
    np.savez(tmp_path / "s.npz", whatever=data)
    (batch,) = collect(make(tmp_path, SINGLE))
    np.testing.assert_array_equal(batch["x"], data)


def test_bool_input(tmp_path: Path) -> None:
    np.save(tmp_path / "m.npy", np.array([True, False]))
    (batch,) = collect(make(tmp_path, [InputSpec("m", np.bool_, (None, 2))]))
    np.testing.assert_array_equal(batch["m"], [[True, False]])


# --------------------------------------------------------------------------- batching


def test_fixed_batch_dim_gives_batches_of_that_size(tmp_path: Path) -> None:
    np.save(tmp_path / "batch.npy", rand(3, 3, 4, 4))
    calib = make(tmp_path, [InputSpec("x", np.float32, (1, 3, 4, 4))], batch_size=16)
    assert [b["x"].shape for b in collect(calib)] == [(1, 3, 4, 4)] * 3
    assert [b["x"].shape for b in collect(calib, batch_size=2)] == [(1, 3, 4, 4)] * 3


def test_fixed_batch_drops_incomplete_batches(tmp_path: Path) -> None:
    np.save(tmp_path / "batch.npy", rand(5, 3, 4, 4))
    calib = make(tmp_path, [InputSpec("x", np.float32, (2, 3, 4, 4))])
    assert len(calib) == 4
    assert [b["x"].shape[0] for b in collect(calib)] == [2, 2]


def test_fixed_batch_larger_than_folder(tmp_path: Path) -> None:
    np.save(tmp_path / "batch.npy", rand(3, 3, 4, 4))
    spec = [InputSpec("x", np.float32, (8, 3, 4, 4))]
    error_of(CalibrationError, lambda: make(tmp_path, spec), "fixed batch size of 8", str(tmp_path))


def test_dynamic_spatial_dims_split_batches(tmp_path: Path) -> None:
    for name, size in [("1", 4), ("2", 4), ("3", 6), ("4", 4)]:
        np.save(tmp_path / f"{name}.npy", rand(3, size, size))
    calib = make(tmp_path, [InputSpec("x", np.float32, (None, 3, None, None))], batch_size=8)
    assert [b["x"].shape for b in collect(calib)] == [(2, 3, 4, 4), (1, 3, 6, 6), (1, 3, 4, 4)]


def test_num_samples_and_limit(tmp_path: Path) -> None:
    data = rand(5, 3, 4, 4)
    np.save(tmp_path / "batch.npy", data)
    calib = make(tmp_path, SINGLE, num_samples=3, batch_size=2)
    assert len(calib) == 3
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in collect(calib)]), data[:3])
    assert [b["x"].shape[0] for b in collect(calib, limit=1)] == [1]
    assert collect(calib, limit=0) == []
    assert len(make(tmp_path, SINGLE)) == 5


def test_num_samples_larger_than_folder(tmp_path: Path) -> None:
    np.save(tmp_path / "batch.npy", rand(5, 3, 4, 4))
    error_of(CalibrationError, lambda: make(tmp_path, SINGLE, num_samples=10), "asked for 10 samples", "has 5")


def test_default_sample_cap_stops_scanning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(calib_data, "DEFAULT_MAX_SAMPLES", 4)
    for i in range(3):
        np.save(tmp_path / f"{i}.npy", rand(3, 3, 4, 4))
    (tmp_path / "9.npy").write_bytes(b"never looked at")
    assert len(make(tmp_path, SINGLE)) == 4


def test_natural_order_and_ignored_entries(tmp_path: Path) -> None:
    for i in (10, 2, 1):
        np.save(tmp_path / f"{i}.npy", np.full((3, 4, 4), i, np.float32))
    (tmp_path / "notes.txt").write_text("ignored")
    (tmp_path / ".hidden.npy").write_bytes(b"ignored")
    (tmp_path / "sub.npy").mkdir()
    np.save(tmp_path / "sub.npy" / "0.npy", rand(3, 4, 4))
    (batch,) = collect(make(tmp_path, SINGLE))
    assert batch["x"][:, 0, 0, 0].tolist() == [1, 2, 10]


def test_construction_reads_no_data(tmp_path: Path) -> None:
    data = rand(2, 3, 4, 4)
    data[1, 0, 0, 0] = np.nan
    np.save(tmp_path / "bad.npy", data)
    calib = make(tmp_path, SINGLE, batch_size=1)  # headers only: no error yet
    batches = calib.batches()
    assert next(batches)["x"].shape == (1, 3, 4, 4)  # only the sample in use is checked
    error_of(CalibrationError, lambda: next(batches), str(tmp_path / "bad.npy"), "'x'", "NaN or Inf")


# --------------------------------------------------------------------------- images


def write_image(path: Path, pixels: np.ndarray) -> None:
    Image.fromarray(pixels).save(path)


def pixels(height: int = 4, width: int = 5, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_png_values_nchw(tmp_path: Path) -> None:
    rgb = pixels()
    write_image(tmp_path / "a.png", rgb)
    options = ImageOptions(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    (batch,) = collect(make(tmp_path, [IMAGE_SPEC], image=options))
    expected = (rgb * (1 / 255) - np.array(options.mean)) / np.array(options.std)
    assert batch["x"].dtype == np.float32
    np.testing.assert_allclose(batch["x"][0], expected.transpose(2, 0, 1).astype(np.float32), rtol=1e-6)


def test_png_values_nhwc_bgr(tmp_path: Path) -> None:
    rgb = pixels()
    write_image(tmp_path / "a.png", rgb)
    options = ImageOptions(mean=(1.0, 2.0, 3.0), std=(2.0, 4.0, 8.0), scale=1.0, layout="nhwc", bgr=True)
    spec = InputSpec("x", np.float32, (None, 4, 5, 3))
    (batch,) = collect(make(tmp_path, [spec], image=options))
    expected = (rgb[:, :, ::-1].astype(np.float64) - [1.0, 2.0, 3.0]) / [2.0, 4.0, 8.0]
    np.testing.assert_allclose(batch["x"][0], expected.astype(np.float32), rtol=1e-6)


def test_jpg_resized_and_grayscale(tmp_path: Path) -> None:
    write_image(tmp_path / "a.jpg", pixels(10, 12))
    write_image(tmp_path / "b.JPEG", pixels(7, 7, seed=1))
    spec = InputSpec("x", np.float16, (None, 1, None, None))
    calib = make(tmp_path, [spec], image=ImageOptions(size=(6, 8)))
    (batch,) = collect(calib)
    assert batch["x"].shape == (2, 1, 6, 8) and batch["x"].dtype == np.float16
    assert 0.0 <= batch["x"].min() and batch["x"].max() <= 1.0


def test_image_resized_to_model_size(tmp_path: Path) -> None:
    write_image(tmp_path / "a.bmp", pixels(9, 9))
    (batch,) = collect(make(tmp_path, [IMAGE_SPEC]))
    assert batch["x"].shape == (1, 3, 4, 5)


def test_image_errors(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    write_image(path, pixels())
    dynamic = [InputSpec("x", np.float32, (None, 3, None, None))]
    error_of(CalibrationError, lambda: make(tmp_path, dynamic), str(path), "--image-size")
    error_of(CalibrationError, lambda: make(tmp_path, MULTI), str(path), "one rank-4 float input", "'a'")
    ints = [InputSpec("x", np.int64, (None, 3, 4, 5))]
    error_of(CalibrationError, lambda: make(tmp_path, ints), str(path), "int64")
    four = [InputSpec("x", np.float32, (None, 4, 4, 5))]
    error_of(CalibrationError, lambda: make(tmp_path, four), str(path), "4 channels")
    sized = ImageOptions(size=(8, 8))
    error_of(UsageError, lambda: make(tmp_path, [IMAGE_SPEC], image=sized), "--image-size 8 8", "[?, 3, 4, 5]")
    gray = [InputSpec("x", np.float32, (None, 1, 4, 5))]
    two_means = ImageOptions(mean=(0.1, 0.2, 0.3))
    error_of(UsageError, lambda: make(tmp_path, gray, image=two_means), "mean has 3 values", "1-channel")
    error_of(UsageError, lambda: make(tmp_path, [IMAGE_SPEC], image=ImageOptions(std=(1, 0, 1))), "std")


def test_corrupt_image(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(b"not a png")
    error_of(CalibrationError, lambda: make(tmp_path, [IMAGE_SPEC]), str(path), "cannot read image")


def test_image_damaged_after_check(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    write_image(path, pixels())
    calib = make(tmp_path, [IMAGE_SPEC])
    path.write_bytes(path.read_bytes()[:40])
    error_of(CalibrationError, lambda: collect(calib), str(path), "cannot read image")


# --------------------------------------------------------------------------- array errors


def test_folder_errors(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    error_of(CalibrationError, lambda: make(missing, SINGLE), str(missing), "does not exist")
    file = tmp_path / "file.npy"
    np.save(file, rand(3, 4, 4))
    error_of(CalibrationError, lambda: make(file, SINGLE), str(file), "not a directory")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("x")
    (empty / ".a.npy").write_bytes(b"x")
    (empty / "sub").mkdir()
    np.save(empty / "sub" / "a.npy", rand(3, 4, 4))
    error_of(CalibrationError, lambda: make(empty, SINGLE), str(empty), "no .npy/.npz/.jpg/.jpeg/.png/.bmp files")


def test_empty_batches_hold_no_samples(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.zeros((0, 3, 4, 4), np.float32))
    error_of(CalibrationError, lambda: make(tmp_path, SINGLE), str(tmp_path), "no samples")


def test_npy_for_multi_input_model(tmp_path: Path) -> None:
    path = tmp_path / "a.npy"
    np.save(path, rand(3))
    error_of(CalibrationError, lambda: make(tmp_path, MULTI), str(path), ".npz", "'a'", "'b'")


def test_npz_missing_input(tmp_path: Path) -> None:
    path = tmp_path / "a.npz"
    np.savez(path, a=rand(3), c=np.zeros(2, np.int64))
    error_of(CalibrationError, lambda: make(tmp_path, MULTI), str(path), "no array for input 'b'", "found: 'a', 'c'")
    np.savez(path, p=rand(3, 4, 4), q=rand(3, 4, 4))
    error_of(CalibrationError, lambda: make(tmp_path, SINGLE), str(path), "'x'", "found: 'p', 'q'")


def test_npz_counts_along_a_named_batch_dim_must_agree(tmp_path: Path) -> None:
    """Dim 0 named alike ("N") in both inputs: arrays of 2 and 3 rows contradict the model."""
    path = tmp_path / "a.npz"
    np.savez(path, a=rand(2, 3), b=np.zeros((3, 2), np.int64))
    named = [InputSpec(s.name, s.dtype, s.shape, ("N", None)) for s in MULTI]
    error_of(CalibrationError, lambda: make(tmp_path, named), str(path), "input 'b' has shape [3, 2]",
             "expects [N, 2] with N = 2 as in input 'a'")


@pytest.mark.parametrize("shape", [(3, 5, 4), (2, 3, 4, 5), (4, 4), (1, 1, 3, 4, 4)])
def test_shape_mismatch(tmp_path: Path, shape: tuple[int, ...]) -> None:
    path = tmp_path / "a.npy"
    np.save(path, np.zeros(shape, np.float32))
    found = "[" + ", ".join(map(str, shape)) + "]"
    error_of(CalibrationError, lambda: make(tmp_path, SINGLE), str(path), "'x'", "[?, 3, 4, 4]", found)


@pytest.mark.parametrize(
    ("spec", "array", "found"),
    [
        (SINGLE[0], np.zeros((3, 4, 4), np.int32), "int32"),
        (InputSpec("x", np.int64, (None, 2)), np.zeros(2, np.float32), "float32"),
        (InputSpec("x", np.bool_, (None, 2)), np.zeros(2, np.uint8), "uint8"),
        (InputSpec("x", np.float32, (None, 2)), np.array(["a", "b"]), "<U1"),
    ],
)
def test_dtype_mismatch(tmp_path: Path, spec: InputSpec, array: np.ndarray, found: str) -> None:
    path = tmp_path / "a.npy"
    np.save(path, array)
    error_of(CalibrationError, lambda: make(tmp_path, [spec]), str(path), "'x'", found, f"expects {spec.dtype}")


def test_object_array_is_rejected_without_unpickling(tmp_path: Path) -> None:
    path = tmp_path / "a.npy"
    np.save(path, np.array([1, "b"], dtype=object), allow_pickle=True)
    error_of(CalibrationError, lambda: make(tmp_path, [InputSpec("x", np.float32, (None, 2))]), str(path), "object")


def test_integer_out_of_range_on_read(tmp_path: Path) -> None:
    path = tmp_path / "a.npy"
    np.save(path, np.array([1, 300], np.int64))
    calib = make(tmp_path, [InputSpec("x", np.int8, (None, 2))])
    error_of(CalibrationError, lambda: collect(calib), str(path), "'x'", "[1, 300]", "int8")


def test_nan_in_npz_input(tmp_path: Path) -> None:
    path = tmp_path / "a.npz"
    np.savez(path, a=np.array([1, np.inf, 0], np.float32), b=np.zeros(2, np.int64))
    error_of(CalibrationError, lambda: collect(make(tmp_path, MULTI)), str(path), "'a'", "NaN or Inf")


def test_float16_overflow(tmp_path: Path) -> None:
    path = tmp_path / "a.npy"
    np.save(path, np.array([1e6, 0], np.float32))
    calib = make(tmp_path, [InputSpec("x", np.float16, (None, 2))])
    error_of(CalibrationError, lambda: collect(calib), str(path), "float16")


@pytest.mark.parametrize("suffix", [".npy", ".npz"])
def test_corrupt_array_file(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"a{suffix}"
    path.write_bytes(b"garbage, not numpy")
    error_of(CalibrationError, lambda: make(tmp_path, SINGLE), str(path), "cannot read")


def test_truncated_npy(tmp_path: Path) -> None:
    path = tmp_path / "a.npy"
    np.save(path, rand(2, 3, 4, 4))
    path.write_bytes(path.read_bytes()[:-10])
    error_of(CalibrationError, lambda: make(tmp_path, SINGLE), str(path), "cannot read", "truncated")


def test_option_errors(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", rand(3, 4, 4))
    error_of(UsageError, lambda: make(tmp_path, SINGLE, batch_size=0), "batch size 0")
    error_of(UsageError, lambda: make(tmp_path, SINGLE, num_samples=0), "--num-calib 0")
    calib = make(tmp_path, SINGLE)
    error_of(UsageError, lambda: calib.batches(batch_size=0), "batch size 0")
    error_of(UsageError, lambda: calib.batches(limit=-1), "limit -1")


def test_model_errors(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", rand(3))
    error_of(ModelError, lambda: make(tmp_path, []), "no inputs")


# --------------------------------------------------------------------------- whole feeds

SEQ = InputSpec("input", np.float32, (None, 6), ("sequence_length", None))
STATE = [InputSpec("h", np.float32, (1, 1, 4)), InputSpec("c", np.float32, (1, 1, 4))]
STATEFUL = [SEQ, *STATE]  # a recurrent model: a sequence without batch dim, the state of one stream


def stateful_file(path: Path, seq: int, seed: int = 0, state: tuple[int, ...] = (1, 1, 4)) -> dict[str, np.ndarray]:
    arrays = {"input": rand(seq, 6, seed=seed), "h": rand(*state, seed=seed + 100), "c": rand(*state, seed=seed + 200)}
    np.savez(path, **arrays)
    return arrays


def assert_feeds(batches: list[dict[str, np.ndarray]], expected: list[dict[str, np.ndarray]]) -> None:
    assert len(batches) == len(expected)
    for batch, want in zip(batches, expected):
        assert set(batch) == set(want)
        for name, array in want.items():
            np.testing.assert_array_equal(batch[name], array)
            assert batch[name].dtype == np.float32


def test_stateful_files_are_whole_feeds(tmp_path: Path) -> None:
    """input [seq, 6] beside state [1, 1, 4]: 16 and 1 along dim 0 are no sample counts but one feed."""
    feeds = [stateful_file(tmp_path / f"{i}.npz", seq, seed=i) for i, seq in enumerate((16, 9, 16))]
    calib = make(tmp_path, STATEFUL, batch_size=8)
    assert calib.whole_feeds and not calib.stackable
    assert len(calib) == 3 and calib.num_batches() == 3 and calib.num_batches(2, limit=2) == 2
    batches = collect(calib)  # never joined, though two have the same shapes and the batch size is 8
    assert_feeds(batches, feeds)
    assert_feeds(collect(calib, batch_size=1, limit=2), feeds[:2])
    assert [calib.samples_in(b) for b in batches] == [1, 1, 1]
    assert "whole feed" in calib.describe() and "'h' float32 [1, 1, 4]" in calib.describe()


def test_whole_feed_arrays_may_leave_out_a_batch_dim_of_one(tmp_path: Path) -> None:
    """State stored as [1, 4] ('h' [1, 1, 4] without its leading 1) is fed as [1, 1, 4]."""
    arrays = {"input": rand(5, 6), "h": rand(1, 4, seed=1), "c": rand(1, 4, seed=2)}
    np.savez(tmp_path / "0.npz", **arrays)
    (batch,) = collect(make(tmp_path, STATEFUL))
    assert batch["input"].shape == (5, 6) and batch["h"].shape == (1, 1, 4)
    np.testing.assert_array_equal(batch["h"][0], arrays["h"])


def test_one_shared_dim_of_one_is_a_batch_of_one(tmp_path: Path) -> None:
    """Files whose dims 0 agree stay samples; with 'h' fixed at 1 every batch holds one sample,
    and the optimizer may not stack them (the model declares dim 0 differently per input)."""
    arrays = [stateful_file(tmp_path / "0.npz", 1), {"input": rand(6), "h": rand(1, 4), "c": rand(1, 4)}]
    np.savez(tmp_path / "1.npz", **arrays[1])
    calib = make(tmp_path, STATEFUL, batch_size=8)
    assert not calib.whole_feeds and not calib.stackable
    batches = collect(calib)
    assert [b["input"].shape for b in batches] == [(1, 6), (1, 6)]
    assert [b["h"].shape for b in batches] == [(1, 1, 4), (1, 1, 4)]
    assert "batched along dim 0 (fixed at 1)" in calib.describe()


def test_a_file_of_unequal_dims_0_makes_every_file_a_feed(tmp_path: Path) -> None:
    """Every dim 0 dynamic (the state's named as a batch): the first file could be one sample, the
    second cannot; both are then whole feeds, never joined (joined, h would be [2, 1, 4])."""
    state = [InputSpec(s.name, s.dtype, (None, 1, 4), ("state_batch", None, None)) for s in STATE]
    specs = [SEQ, *state]
    assert make_single(tmp_path / "one", specs).stackable  # a folder of samples alone is batched
    feeds = [stateful_file(tmp_path / "0.npz", 1), stateful_file(tmp_path / "1.npz", 7, seed=1)]
    calib = make(tmp_path, specs, batch_size=8)
    assert calib.whole_feeds and len(calib) == 2
    assert_feeds(collect(calib), feeds)
    assert "different lengths along dim 0" in calib.describe()


def make_single(folder: Path, specs: list[InputSpec]) -> CalibrationSet:
    folder.mkdir()
    for i in range(2):
        stateful_file(folder / f"{i}.npz", 1, seed=i)
    return make(folder, specs, batch_size=8)


def test_inputs_without_batch_dim_are_fed_whole(tmp_path: Path) -> None:
    """A scalar input and a two-layer state [2, 1, 4]: no shared batch dim, each file one feed."""
    specs = [SEQ, InputSpec("h", np.float32, (2, 1, 4)), InputSpec("sr", np.int64, ())]
    for i, seq in enumerate((2, 2)):
        np.savez(tmp_path / f"{i}.npz", input=rand(seq, 6, seed=i), h=rand(2, 1, 4), sr=np.array(16000))
    calib = make(tmp_path, specs, batch_size=4)
    assert calib.whole_feeds and "share no batch dim" in calib.describe()
    batches = collect(calib)
    assert [(b["input"].shape, b["h"].shape, b["sr"].shape) for b in batches] == [((2, 6), (2, 1, 4), ())] * 2
    assert batches[1]["sr"] == 16000 and batches[1]["sr"].dtype == np.int64


def test_num_samples_count_whole_feeds(tmp_path: Path) -> None:
    for i in range(3):
        stateful_file(tmp_path / f"{i}.npz", 4 + i, seed=i)
    assert [b["input"].shape[0] for b in collect(make(tmp_path, STATEFUL, num_samples=2))] == [4, 5]
    error_of(CalibrationError, lambda: make(tmp_path, STATEFUL, num_samples=5), "asked for 5 samples", "has 3")


@pytest.mark.parametrize(
    ("arrays", "name", "found", "expected"),
    [
        ({"h": (1, 1, 5)}, "'h'", "[1, 1, 5]", "[1, 1, 4]"),  # a wrong hidden size
        ({"h": (2, 1, 4)}, "'h'", "[2, 1, 4]", "[1, 1, 4]"),  # two states for a model of one
        ({"input": (7, 5)}, "'input'", "[7, 5]", "[?, 6]"),  # a wrong feature count
        ({"c": (4,)}, "'c'", "[4]", "[1, 1, 4]"),  # a rank the model cannot take
    ],
)
def test_feeds_that_contradict_the_model(tmp_path: Path, arrays: dict, name: str, found: str, expected: str) -> None:
    stateful_file(tmp_path / "0.npz", 3)
    shapes = {"input": (7, 6), "h": (1, 1, 4), "c": (1, 1, 4), **arrays}
    path = tmp_path / "1.npz"
    np.savez(path, **{key: np.zeros(shape, np.float32) for key, shape in shapes.items()})
    error_of(CalibrationError, lambda: make(tmp_path, STATEFUL), str(path), f"input {name} has shape {found}",
             f"the model expects {expected}")


def test_feed_check_names_the_file_without_batch_dim(tmp_path: Path) -> None:
    """Without a shared batch dim no dim may be left out: [1, 4] is no [2, 1, 4] state."""
    path = tmp_path / "0.npz"
    np.savez(path, input=rand(3, 6), h=rand(1, 4))
    specs = [SEQ, InputSpec("h", np.float32, (2, 1, 4))]
    error_of(CalibrationError, lambda: make(tmp_path, specs), str(path), "'h' has shape [1, 4]", "[2, 1, 4]",
             "the model has no batch dim")


def test_input_specs_read_dim_names() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["seq", 3])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [x])
    (spec,) = input_specs(helper.make_model(graph))
    assert spec.symbols == ("seq", None) and spec.symbol(0) == "seq" and spec.symbol(1) is None
