"""GPTQ rounding (Frantar et al., 2023) of a layer's weight on its sampled input rows, at fixed steps.

Round-to-nearest codes each weight alone. GPTQ codes the input columns one at a time (largest input
energy first) and spreads each column's rounding error over the columns not coded yet, weighted by
the inverse of the layer's input second moment H = X^T X / n: what the layer outputs on its inputs
moves less than with round-to-nearest, most at 4 bits and below. The steps (the MSE-chosen per-channel
scales) are kept; only the integer codes change.

These codes are what ``--iters 0`` writes and what a discarded EPTQ result falls back to. EPTQ itself
starts from the float weights, as the paper does (AdaRound's h(V) = frac(w / s)): started next to the
GPTQ codes instead, a 3-minute run on a real text-line classifier ended at 20.5 dB output SQNR where
the cold start reached 26.6 dB. ``source``, each value just before it was rounded (its code is its
nearest grid point), is kept for tests and diagnostics.

The rows are the float model's layer inputs (``calib.layer_inputs``), a few hundred to a few thousand
per layer; H is damped by 1% of its mean diagonal. A layer keeps its GPTQ codes only when they give a
smaller output error on those rows than round-to-nearest.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch

from eptq_onnx.init.quantizers import quantize

DAMP = 0.01  # of the mean diagonal of H, added to it (GPTQ's default)
FLOAT64_MAX_K = 2048  # inputs per group up to which H is factored in float64
BLOCK = 128  # columns coded per block before the error is pushed to the rest (lazy batch updates)


@dataclass
class GptqCodes:
    """A weight's GPTQ codes and pre-rounding values, in the weight's own layout."""

    codes: np.ndarray  # int8, the weight's shape
    source: np.ndarray  # float32, the weight's shape: the value each code is the nearest grid point of
    error_ratio: float  # output error on the rows, GPTQ / round-to-nearest


def _second_moment(rows: np.ndarray) -> np.ndarray:
    """[groups, K, K] input second moments of rows [n, groups, K], damped, dead inputs given a unit diagonal."""
    x = rows.astype(np.float64).transpose(1, 0, 2)  # [groups, n, K]
    h = np.matmul(x.transpose(0, 2, 1), x) / max(1, x.shape[1])
    diag = np.einsum("gkk->gk", h)
    dead = diag <= 0
    idx = np.arange(h.shape[1])
    h[:, idx, idx] += np.where(dead, 1.0, 0.0) + DAMP * np.maximum(diag.mean(axis=1, keepdims=True), 1e-12)
    return h


def _inverse_factor(h: np.ndarray, order: np.ndarray) -> Optional[np.ndarray]:
    """The upper triangular U with H_o^-1 = U^T U, where H_o is h [groups, K, K] with its rows and columns
    in ``order`` (None when H is not positive definite). With P the order reversal and L L^T = P H_o P:
    U = P L^-1 P, one Cholesky factorization and one triangular solve. Above FLOAT64_MAX_K inputs the
    factorization runs in float32, as GPTQ's own implementation does (half the time and memory of
    float64 on matrices of 256 MB and more)."""
    k = h.shape[1]
    backwards = order[:, ::-1]
    reversed_h = torch.from_numpy(h[np.arange(len(h))[:, None, None], backwards[:, :, None], backwards[:, None, :]])
    lower, info = torch.linalg.cholesky_ex(reversed_h.to(torch.float64 if k <= FLOAT64_MAX_K else torch.float32))
    del reversed_h
    if bool((info != 0).any()):
        return None
    inverse = torch.linalg.solve_triangular(lower, torch.eye(k, dtype=lower.dtype).expand_as(lower), upper=False)
    return inverse.numpy()[:, ::-1, ::-1]


def gptq_grouped(w: np.ndarray, scale: np.ndarray, rows: np.ndarray, qmin: int, qmax: int
                 ) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """GPTQ of w [groups, C, K] (C output channels per group, steps ``scale`` [groups, C]) on rows
    [n, groups, K]: (codes, pre-rounding values), both [groups, C, K]; None when the damped second
    moment is not positive definite (non-finite rows)."""
    groups, channels, k = w.shape
    h = _second_moment(rows)
    order = np.argsort(-np.einsum("gkk->gk", h), axis=1, kind="stable")  # largest input energy first
    u = _inverse_factor(h, order)
    del h
    if u is None:
        return None
    work = np.take_along_axis(w.astype(np.float64), order[:, None, :], 2)
    s = scale.astype(np.float64)[:, :, None]
    codes = np.zeros_like(work)
    source = np.zeros_like(work)
    for b0 in range(0, k, BLOCK):
        b1 = min(b0 + BLOCK, k)
        block = work[:, :, b0:b1].copy()
        errors = np.zeros_like(block)
        for i in range(b1 - b0):
            col = block[:, :, i:i + 1]
            q = quantize(col, s, 0, qmin, qmax)
            codes[:, :, b0 + i:b0 + i + 1] = q
            source[:, :, b0 + i:b0 + i + 1] = col
            err = (col - q * s) / u[:, None, b0 + i:b0 + i + 1, b0 + i]
            block[:, :, i:] -= err * u[:, None, b0 + i, b0 + i:b1]
            errors[:, :, i:i + 1] = err
        work[:, :, b1:] -= np.matmul(errors, u[:, b0:b1, b1:])
    inverse = np.argsort(order, axis=1)
    back = lambda a: np.take_along_axis(a, inverse[:, None, :], 2)  # noqa: E731
    return back(codes), back(source)


def _output_error(w: np.ndarray, approx: np.ndarray, rows: np.ndarray) -> float:
    """sum over the rows of ||(w - approx) x||^2, w [groups, C, K], rows [n, groups, K]."""
    diff = (w - approx).astype(np.float64)
    out = np.matmul(rows.astype(np.float64).transpose(1, 0, 2), diff.transpose(0, 2, 1))  # [groups, n, C]
    return float((out * out).sum())


def gptq_weight(w: np.ndarray, axis: int, scale: np.ndarray, rows: np.ndarray, qmin: int, qmax: int
                ) -> Optional[GptqCodes]:
    """GPTQ codes of a weight whose channels lie on ``axis`` (a Conv's [Cout, Cin/g, *kernel] with axis
    0, a MatMul's [K, N] with axis 1, ...) given its layer's input rows [n, groups, K]; None when the
    rows do not match the weight's layout or GPTQ does not beat round-to-nearest on them."""
    groups, k = rows.shape[1], rows.shape[2]
    moved = np.moveaxis(w, axis, 0)
    channels = moved.shape[0]
    if moved.size != channels * k or channels % groups or len(rows) < 2:
        return None
    flat = moved.reshape(groups, channels // groups, k).astype(np.float32)
    steps = scale.astype(np.float32).reshape(groups, channels // groups)
    found = gptq_grouped(flat, steps, rows, qmin, qmax)
    if found is None:
        return None
    codes, source = found
    nearest = quantize(flat, steps[:, :, None], 0, qmin, qmax) * steps[:, :, None]
    rtn = _output_error(flat, nearest, rows)
    ours = _output_error(flat, codes * steps[:, :, None], rows)
    if not np.all(np.isfinite(codes)) or ours >= rtn:
        return None

    def layout(a: np.ndarray, dtype: type) -> np.ndarray:
        return np.moveaxis(a.reshape(moved.shape), 0, axis).astype(dtype)

    return GptqCodes(layout(codes, np.int8), layout(source, np.float32), ours / max(rtn, 1e-300))
