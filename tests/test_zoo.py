"""The test-model zoo: every builder yields a valid, onnxruntime-runnable, deterministic model."""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `models/` lives at the repo root, not in the package
from models import zoo  # noqa: E402
from models.demo import evaluate  # noqa: E402

DEMO = Path(zoo.__file__).resolve().parent / "demo"

BUILDERS = zoo.ZOO


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def op_counts(model: onnx.ModelProto) -> Counter[str]:
    return Counter(node.op_type for node in model.graph.node)


def opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def built(request: pytest.FixtureRequest) -> tuple[str, onnx.ModelProto]:
    return request.param, BUILDERS[request.param]()


def test_runs_in_onnxruntime(built: tuple[str, onnx.ModelProto]) -> None:
    name, model = built
    assert model.ir_version <= zoo.MAX_ORT_IR_VERSION
    feeds = zoo.sample_inputs(model, 3)
    outputs = run(model, feeds)
    assert len(outputs) == len(model.graph.output)
    static = name.endswith("_static")
    for out in outputs:
        assert np.isfinite(out).all()
        assert out.shape[0] == (1 if static else 3)


def test_deterministic(built: tuple[str, onnx.ModelProto]) -> None:
    name, model = built
    feeds = zoo.sample_inputs(model, 2, seed=1)
    again = BUILDERS[name]()
    for a, b in zip(run(model, feeds), run(again, feeds)):
        np.testing.assert_array_equal(a, b)


def test_sample_inputs_are_seeded_and_typed() -> None:
    model = zoo.multi_input()
    a, b = zoo.sample_inputs(model, 4, seed=7), zoo.sample_inputs(model, 4, seed=7)
    assert set(a) == {"image", "features"}
    assert a["image"].shape == (4, 3, 16, 16) and a["image"].dtype == np.float32
    np.testing.assert_array_equal(a["features"], b["features"])


def test_token_ids_within_vocab() -> None:
    ids = zoo.sample_inputs(zoo.token_model(), 64)["ids"]
    assert ids.dtype == np.int64 and ids.shape == (64, 12)
    assert ids.min() >= 0 and ids.max() < 100 and ids.max() > 50


def test_dynamic_spatial_dims() -> None:
    model = zoo.dynamic_spatial_cnn()
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["N", 3, "H", "W"]
    rng = np.random.default_rng(0)
    for hw in [(16, 16), (40, 24)]:
        (out,) = run(model, {"input": rng.standard_normal((2, 3, *hw)).astype(np.float32)})
        assert out.shape == (2, 5)


def test_expected_graph_structure() -> None:
    cnn = op_counts(zoo.residual_cnn())
    assert cnn["BatchNormalization"] == cnn["Conv"] == 7 and cnn["Clip"] == 1 and cnn["Gemm"] == 1
    assert op_counts(zoo.transformer_block())["LayerNormalization"] == 2
    decomposed = op_counts(zoo.transformer_block_decomposed())
    assert "LayerNormalization" not in decomposed and {"ReduceMean", "Pow", "Sqrt", "Div"} <= set(decomposed)
    assert op_counts(zoo.transformer_block())["Erf"] == 1  # exact GELU
    assert opset(zoo.helper_opset11()) == 11
    paddle = zoo.paddle_style()
    assert len(paddle.graph.initializer) == 0
    assert {"Shape", "Gather", "Unsqueeze", "Concat", "Reshape", "MatMul"} <= set(op_counts(paddle))
    tf = zoo.nhwc_tf_style()
    assert [i.name for i in tf.graph.input] == ["input:0"] and [o.name for o in tf.graph.output] == ["Identity:0"]
    assert [o.name for o in zoo.multi_input().graph.output] == ["logits", "embedding"]


@pytest.mark.parametrize(
    ("builder", "name"), [(zoo.residual_cnn, "residual_cnn"), (zoo.transformer_block, "transformer_block")]
)
def test_dynamo_exporter_matches_legacy(builder: Callable[..., onnx.ModelProto], name: str) -> None:
    dynamo_model = builder(dynamo=True)
    legacy_model = builder()
    assert opset(dynamo_model) == zoo.MIN_DYNAMO_OPSET
    assert dynamo_model.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    feeds = zoo.sample_inputs(legacy_model, 3)
    for a, b in zip(run(dynamo_model, feeds), run(legacy_model, feeds)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_bundled_demo_model() -> None:
    model = onnx.load(DEMO / "digits_resnet.onnx")
    assert opset(model) == 13 and model.ir_version <= zoo.MAX_ORT_IR_VERSION
    (feed,) = model.graph.input
    assert feed.name == "image" and [d.dim_param or d.dim_value for d in feed.type.tensor_type.shape.dim] == [
        "N", 1, 32, 32,
    ]
    assert [o.name for o in model.graph.output] == ["logits"]
    assert op_counts(model)["BatchNormalization"] > 0  # left for the quantizer to fold
    calib = sorted((DEMO / "calib").glob("*.npy"))
    assert len(calib) == 256 and calib[0].name == "0000.npy"
    sample = np.load(calib[0])
    assert sample.shape == (1, 32, 32) and sample.dtype == np.float32
    images, labels = evaluate.load_test_set()
    assert images.shape == (500, 1, 32, 32) and labels.shape == (500,) and labels.dtype == np.int64
    assert evaluate.accuracy(DEMO / "digits_resnet.onnx") >= 0.97


def test_evaluate_cli(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    model = str(DEMO / "digits_resnet.onnx")
    assert evaluate.main([model, model]) == 0
    assert capsys.readouterr().out.count("100.00%") == 2
    assert evaluate.main([model, str(tmp_path / "missing.onnx")]) == 1
    assert "no such file" in capsys.readouterr().err
