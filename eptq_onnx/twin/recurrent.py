"""ONNX LSTM/GRU/RNN in torch, left float (run step by step as onnxruntime does)."""
from __future__ import annotations

from typing import Optional
import torch
from torch import Tensor, nn


def _lstm_cell(x_t: Tensor, state: tuple[Tensor, ...], w: Tensor, r: Tensor, b: Tensor, extra: dict) -> tuple[Tensor, ...]:
    """One ONNX LSTM step (gates i, o, f, c; default activations, no peepholes)."""
    h, c = state
    i, o, f, g = (x_t @ w.T + h @ r.T + b).chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c

def _gru_cell(x_t: Tensor, state: tuple[Tensor, ...], w: Tensor, r: Tensor, b: Tensor, extra: dict) -> tuple[Tensor, ...]:
    """One ONNX GRU step (gates z, r, h; default activations, either linear_before_reset)."""
    (h,) = state
    hidden = h.shape[-1]
    wb, rb = b[: 3 * hidden], b[3 * hidden:]
    xz, xr, xh = (x_t @ w.T + wb).chunk(3, dim=-1)
    rz, rr, rh = r.chunk(3, dim=0)
    rbz, rbr, rbh = rb.chunk(3)
    z = torch.sigmoid(xz + h @ rz.T + rbz)
    reset = torch.sigmoid(xr + h @ rr.T + rbr)
    if extra["linear_before_reset"]:
        candidate = torch.tanh(xh + reset * (h @ rh.T + rbh))
    else:
        candidate = torch.tanh(xh + (reset * h) @ rh.T + rbh)
    return ((1 - z) * candidate + z * h,)

class RecurrentOp(nn.Module):
    """ONNX LSTM / GRU (forward, reverse or bidirectional; layout 0) as an explicit loop.

    Inputs in ONNX order: X, W, R, B, sequence_lens (must be absent), initial_h (, initial_c).
    Outputs Y, Y_h (, Y_c). The op stays float: its weights are plain buffers.
    """

    def __init__(self, kind: str, hidden: int, direction: str, linear_before_reset: bool = False, outputs: int = 3) -> None:
        super().__init__()
        self.kind, self.hidden = kind, hidden
        self.outputs = outputs  # how many outputs the node declares (trailing ones may be omitted)
        self.directions = {"forward": [False], "reverse": [True], "bidirectional": [False, True]}[direction]
        self.cell = _lstm_cell if kind == "LSTM" else _gru_cell
        self.extra = {"linear_before_reset": linear_before_reset}
        self.states = 2 if kind == "LSTM" else 1

    def forward(self, x: Tensor, w: Tensor, r: Tensor, b: Optional[Tensor] = None, seq_lens: Optional[Tensor] = None,
                initial_h: Optional[Tensor] = None, initial_c: Optional[Tensor] = None) -> Tensor | tuple[Tensor, ...]:
        """Y alone when the node declares only Y (as the fx graph then expects a tensor), else (Y, Y_h[, Y_c])."""
        initial = (initial_h, initial_c)
        if seq_lens is not None:
            raise NotImplementedError(f"{self.kind} with sequence_lens")
        steps, batch = x.shape[0], x.shape[1]
        gates = w.shape[1] // self.hidden
        if b is None:
            b = x.new_zeros(len(self.directions), 2 * gates * self.hidden)
        ys, finals = [], []
        for d, reverse in enumerate(self.directions):
            state = tuple(
                initial[k][d] if initial[k] is not None else x.new_zeros(batch, self.hidden)
                for k in range(self.states)
            )
            bias = b[d] if self.kind == "GRU" else b[d, : 4 * self.hidden] + b[d, 4 * self.hidden:]
            outputs: list[Tensor] = [x.new_zeros(0)] * steps
            for t in (reversed(range(steps)) if reverse else range(steps)):
                state = self.cell(x[t], state, w[d], r[d], bias, self.extra)
                outputs[t] = state[0]
            ys.append(torch.stack(outputs))
            finals.append(state)
        y = torch.stack(ys, dim=1)  # [steps, dirs, batch, hidden]
        if self.outputs == 1:
            return y
        return (y, *(torch.stack([f[k] for f in finals]) for k in range(self.states)))
