"""Stateful recurrent models whose inputs have no shared batch dim, and their calibration feeds.

- :func:`stateful_lstm`: a voice-activity-style LSTM as torch exports it, ``input [seq, feat]``
  (unbatched, dynamic seq), ``h [1, 1, H]`` and ``c [1, 1, H]`` (state), outputs ``out [seq, 1]``,
  ``hn`` and ``cn``. A calibration file holds one complete feed: a sequence and the state the
  previous chunk left, whose leading dims (seq vs 1) never agree.
- ``state_batch=True``: the same model with dim 0 of ``h``/``c`` declared dynamic (as a batch),
  so every input has a dynamic dim 0 and only the data shows that it is not a shared batch.

These models are not in ``ZOO``: its checks feed every model a batch along dim 0.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from models.zoo import _seeded, exported

FEATURES, HIDDEN = 24, 16
SEQ_AXIS = "sequence_length"
STATE_AXIS = "state_batch"

__all__ = ["FEATURES", "HIDDEN", "stateful_lstm", "stateful_feeds", "write_feeds"]


class _StatefulVAD(nn.Module):
    """Frame encoder (Linear + ReLU), one LSTM layer over the frames, per-frame speech probability."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(FEATURES, 32), nn.ReLU())
        self.lstm = nn.LSTM(32, HIDDEN)
        self.head = nn.Linear(HIDDEN, 1)

    def forward(self, frames: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self.encoder(frames).unsqueeze(1)  # [seq, 1, 32]: a batch of one sequence
        y, (hn, cn) = self.lstm(x, (h, c))
        return torch.sigmoid(self.head(y.squeeze(1))), hn, cn


def stateful_lstm(opset: int = 16, *, state_batch: bool = False) -> onnx.ModelProto:
    """LSTM with inputs ``input [seq, 24]``, ``h``/``c`` ``[1, 1, 16]`` (legacy torch export, opset 16).

    ``state_batch``: dim 0 of ``h``, ``c``, ``hn``, ``cn`` is declared dynamic too.
    """
    with _seeded(40):
        net = _StatefulVAD()
        args = (torch.randn(7, FEATURES), torch.zeros(1, 1, HIDDEN), torch.zeros(1, 1, HIDDEN))
    axes = {"input": {0: SEQ_AXIS}, "out": {0: SEQ_AXIS}}
    if state_batch:
        axes.update({name: {0: STATE_AXIS} for name in ("h", "c", "hn", "cn")})
    return exported(net, args, opset=opset, dynamic_batch=False, input_names=["input", "h", "c"],
                    output_names=["out", "hn", "cn"], dynamic_axes=axes)


def stateful_feeds(model: onnx.ModelProto, count: int, seed: int = 0,
                   lengths: tuple[int, ...] = (16, 9, 16, 23)) -> list[dict[str, np.ndarray]]:
    """``count`` feeds of a stream: sequences of varying length (``lengths`` in turn), each with the
    state the model left after the previous one (zeros first), as a streaming user records them."""
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    h = np.zeros((1, 1, HIDDEN), np.float32)
    c = np.zeros((1, 1, HIDDEN), np.float32)
    feeds = []
    for i in range(count):
        frames = rng.standard_normal((lengths[i % len(lengths)], FEATURES)).astype(np.float32)
        feeds.append({"input": frames, "h": h, "c": c})
        _, h, c = session.run(None, feeds[-1])
    return feeds


def write_feeds(folder: Path, feeds: list[dict[str, np.ndarray]]) -> Path:
    """One .npz file per feed (``0.npz``, ``1.npz``, ...) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, feed in enumerate(feeds):
        np.savez(folder / f"{i}.npz", **feed)
    return folder
