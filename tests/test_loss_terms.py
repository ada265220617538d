"""tools/loss_terms.py: per-tensor loss terms at the init and the averaging check."""
from __future__ import annotations

import onnx
import pytest

from models import zoo
from tools.loss_terms import loss_terms, terms_markdown


def test_loss_terms_cover_every_loss_tensor_and_the_pooling(tmp_path, calib_for) -> None:
    model = zoo.residual_cnn()
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    result = loss_terms(path, calib_for(model, 8), bits=4, samples=8)
    for trace in ("element", "channel", None):  # None: uniform weights
        total = result.total(trace)
        assert sum(t.share(total, trace) for t in result.terms) == pytest.approx(100.0)
    for trace in ("element", "channel"):
        assert sum(t.weights[trace] for t in result.terms) / len(result.terms) == pytest.approx(1.0)
        assert min(t.weights[trace] for t in result.terms) == 0.0  # the least sensitive tensor, as in the paper
    (pool,) = result.averaging
    assert pool.op == "GlobalAveragePool" and pool.positions == 8 * 8
    assert pool.trace_ratio["element"] == pytest.approx(1 / pool.positions, rel=0.05)  # independent errors
    assert pool.trace_ratio["channel"] == pytest.approx(1.0, rel=0.05)  # errors equal at every position
    text = "\n".join(terms_markdown(result))
    assert "| averaging op |" in text and "GlobalAveragePool" in text
