"""GPTQ rounding against a plain numpy reference (the OBQ update with an explicit inverse), and what it buys."""
from __future__ import annotations

import numpy as np

from eptq_onnx.init.gptq import DAMP, gptq_weight
from eptq_onnx.init.quantizers import quantize, weight_scales


def _reference(w: np.ndarray, scale: np.ndarray, x: np.ndarray, qmin: int, qmax: int) -> np.ndarray:
    """Codes of w [C, K] column by column in descending order of input energy; after each column the
    others take its error through H^-1, which then loses that column (Frantar & Alistarh's OBQ step)."""
    h = x.T.astype(np.float64) @ x / len(x)
    h += DAMP * np.mean(np.diag(h)) * np.eye(len(h))
    hinv = np.linalg.inv(h)
    w = w.astype(np.float64).copy()
    codes = np.zeros_like(w)
    left = list(np.argsort(-np.diag(h), kind="stable"))
    while left:
        j = left.pop(0)
        q = quantize(w[:, j], scale, 0, qmin, qmax)
        codes[:, j] = q
        err = (w[:, j] - q * scale) / hinv[j, j]
        for r in left:
            w[:, r] -= err * hinv[j, r]
        hinv = hinv - np.outer(hinv[:, j], hinv[j, :]) / hinv[j, j]
    return codes


def _layer(seed: int, k: int = 24, c: int = 6, n: int = 400):
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(k, k)) * np.geomspace(3.0, 0.1, k)  # correlated inputs of unequal energy
    x = (rng.normal(size=(n, k)) @ mix).astype(np.float32)
    w = rng.normal(0, 0.4, (c, k)).astype(np.float32)
    return w, x


def test_codes_are_the_reference_s_and_lower_the_output_error_at_4_bits() -> None:
    for seed in range(3):
        w, x = _layer(seed)
        scale = weight_scales(w, 0, 4, "mse")
        found = gptq_weight(w, 0, scale, x[:, None, :], -8, 7)
        assert found is not None
        np.testing.assert_array_equal(found.codes, _reference(w, scale, x, -8, 7))
        nearest = quantize(w, scale[:, None], 0, -8, 7)
        rtn = np.sum(((w - nearest * scale[:, None]) @ x.T) ** 2)
        ours = np.sum(((w - found.codes * scale[:, None]) @ x.T) ** 2)
        assert ours < 0.7 * rtn and abs(found.error_ratio - ours / rtn) < 1e-6
        # every code is the nearest grid point of its pre-rounding value
        np.testing.assert_array_equal(quantize(found.source, scale[:, None], 0, -8, 7), found.codes)


def test_conv_groups_and_a_matmul_layout() -> None:
    """A grouped Conv [Cout, Cin/g, kh, kw] is coded group by group on that group's patches, a MatMul
    [K, N] along its output axis 1: each as the reference codes its [channels, K] slice."""
    rng = np.random.default_rng(7)
    w = rng.normal(0, 0.5, (4, 3, 2, 2)).astype(np.float32)  # 2 groups of 2 output channels, K = 12
    x = rng.normal(size=(300, 2, 12)).astype(np.float32) * np.geomspace(2.0, 0.2, 12)
    scale = weight_scales(w, 0, 4, "mse")
    found = gptq_weight(w, 0, scale, x, -8, 7)
    assert found is not None
    for g in range(2):
        ref = _reference(w[2 * g:2 * g + 2].reshape(2, 12), scale[2 * g:2 * g + 2], x[:, g], -8, 7)
        np.testing.assert_array_equal(found.codes[2 * g:2 * g + 2].reshape(2, 12), ref)
    wm, xm = _layer(3)
    mat = np.ascontiguousarray(wm.T)  # [K, N]
    scale = weight_scales(mat, 1, 4, "mse")
    found = gptq_weight(mat, 1, scale, xm[:, None, :], -8, 7)
    assert found is not None and found.codes.shape == mat.shape
    np.testing.assert_array_equal(found.codes.T, _reference(wm, scale, xm, -8, 7))


def test_rows_that_do_not_match_the_weight_give_nothing() -> None:
    w, x = _layer(0)
    assert gptq_weight(w, 0, weight_scales(w, 0, 4, "mse"), x[:, None, :5], -8, 7) is None


def test_a_w4_run_writes_gptq_codes_that_beat_nearest(calib_for) -> None:
    """The pipeline's default rounding: the written 4-bit MLP is closer to the float model than the
    round-to-nearest one at the same steps."""
    import onnxruntime as ort

    from eptq_onnx import quantize
    from models import zoo_analysis
    from tests.helpers import init_only

    model = zoo_analysis.tiny_mlp()
    folder = calib_for(model, 32)
    x = np.random.default_rng(5).normal(size=(256, 8)).astype(np.float32)

    def output(m) -> np.ndarray:  # type: ignore[no-untyped-def]
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]

    ref = output(model)
    errors = {}
    for rounding in ("gptq", "nearest"):
        result = quantize(model, folder, init_only(weight_bits=4, weight_rounding=rounding, bias_correction=False),
                          progress=False)
        errors[rounding] = float(np.mean((output(result.model) - ref) ** 2))
    assert errors["gptq"] < errors["nearest"], errors
