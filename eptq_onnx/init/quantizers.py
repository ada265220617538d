"""Uniform quantizers in numpy, with onnxruntime's semantics, and their step-size search.

QuantizeLinear: q = saturate(round_half_to_even(x / scale) + zero_point); DequantizeLinear:
x' = (q - zero_point) * scale (both from :mod:`eptq_onnx.ops.arithmetic`, the reference). Weights
are symmetric per channel (zero point 0), activations per tensor, asymmetric (unsigned) or
symmetric (signed, zero point 0).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import numpy as np

from eptq_onnx.ops.arithmetic import dequantize, int_range, quantize_codes

COARSE_GRID = np.linspace(0.05, 1.0, 96)  # fractions of the max |w| tried per channel, step 0.01
FINE_STEPS = np.linspace(-0.01, 0.01, 21)  # then around the best, step 0.001
Transfer = Callable[[np.ndarray], np.ndarray]  # the activation that alone reads a point: values -> its output
SCALE_BLOCK_BYTES = 8 << 20  # larger weights get their steps searched block by block
SEARCH_BLOCK_BYTES = 64 << 20  # temporaries of the candidates a step search evaluates at once


def quantize(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | int, qmin: int, qmax: int) -> np.ndarray:
    """Integer codes of ``x`` (as floats; ``arithmetic.quantize_codes``: float32 division, round half to
    even, saturated), ``scale`` and ``zero_point`` broadcasting against ``x``."""
    return quantize_codes(x, scale, zero_point, qmin, qmax)


def fake_quant(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | int, qmin: int, qmax: int) -> np.ndarray:
    """Quantize then dequantize (what a QuantizeLinear -> DequantizeLinear pair computes)."""
    return dequantize(quantize(x, scale, zero_point, qmin, qmax), scale, zero_point)


def channels_first(w: np.ndarray, axis: int) -> np.ndarray:
    """View a weight as [channels, everything else]."""
    if w.ndim == 0:
        return w.reshape(1, 1).astype(np.float32)
    return np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1).astype(np.float32, copy=False)


def broadcast_scale(scale: np.ndarray, w: np.ndarray, axis: int) -> np.ndarray:
    """Reshape a per-channel vector to broadcast against ``w`` along ``axis``."""
    shape = [1] * w.ndim
    if w.ndim:
        shape[axis] = -1
    return np.asarray(scale, dtype=np.float32).reshape(shape)


ErrorFn = Callable[[np.ndarray, np.ndarray, int, int], np.ndarray]


def _weight_error(w2: np.ndarray, scales: np.ndarray, qmin: int, qmax: int) -> np.ndarray:
    """Per-channel sums of squared weight errors: ``scales`` [candidates, C] -> [candidates, C]."""
    s = scales[:, :, None]
    return ((np.clip(np.rint(w2 / s), qmin, qmax) * s - w2) ** 2).sum(axis=2)


def _output_error(inputs: np.ndarray) -> ErrorFn:
    """Per-channel sums of squared output errors of a layer on sampled inputs, for candidate steps.

    ``inputs`` is [samples, groups, K]: the rows (Gemm/MatMul) or im2col patches (Conv) the layer
    multiplies with its weight, split by convolution group; channel c belongs to group
    c // (channels / groups). The error of a channel's weight error d is ||X d||^2; where K is
    smaller than the number of samples it is computed as d^T (X^T X) d, in float64, from the
    Gram matrix of each group (the same sum, with fewer operations per candidate).
    """
    samples, groups, k = inputs.shape
    per_group = np.ascontiguousarray(inputs.transpose(1, 0, 2))  # [G, P, K]
    gram = None
    if k < samples:
        x64 = per_group.astype(np.float64)
        gram = np.matmul(x64.transpose(0, 2, 1), x64)  # [G, K, K]

    def error(w2: np.ndarray, scales: np.ndarray, qmin: int, qmax: int) -> np.ndarray:
        s = scales[:, :, None]
        candidates = len(scales)
        diff = (np.clip(np.rint(w2 / s), qmin, qmax) * s - w2).astype(np.float32)  # [A, C, K]
        # one matrix product per group over every candidate's channels: [G, A * C/G, K]
        diff = diff.reshape(candidates, groups, -1, k).transpose(1, 0, 2, 3).reshape(groups, -1, k)
        if gram is not None:
            d = diff.astype(np.float64)
            err = (np.matmul(d, gram) * d).sum(axis=2)
        else:
            err = (np.matmul(diff, per_group.transpose(0, 2, 1)).astype(np.float64) ** 2).sum(axis=2)  # [G, A * C/G]
        return err.reshape(groups, candidates, -1).transpose(1, 0, 2).reshape(candidates, -1)

    error.bytes_per_channel = 24 * k + (0 if gram is not None else 12 * samples)  # type: ignore[attr-defined]
    return error


def weight_scales(w: np.ndarray, axis: int, bits: int, method: str = "mse", inputs: Optional[np.ndarray] = None) -> np.ndarray:
    """Per-channel symmetric step sizes for ``w`` at ``bits`` bits.

    ``minmax``: max|w_c| / qmax. ``mse``: the step minimizing the squared error per channel, over a
    coarse grid of clipping fractions of max|w_c| and then a fine grid around the best one; the
    error is that of the layer's output on ``inputs`` ([samples, groups, K], see
    ``_output_error``) when given, else that of the weight itself.
    Channels that are all zero get the median step of the others (so int32 bias scales stay sane).
    Weights over SCALE_BLOCK_BYTES are searched in blocks of whole groups of channels (each
    channel's step is its own: the same steps, with temporaries of one block's size).
    """
    if method not in ("mse", "minmax"):
        raise ValueError(f"unknown weight scale method {method!r}")
    w2 = channels_first(w, axis)
    groups = inputs.shape[1] if inputs is not None else 1
    per_group = len(w2) // groups
    rows = max(1, SCALE_BLOCK_BYTES // max(w2[0].nbytes * per_group, 1)) * per_group
    parts = []
    for start in range(0, len(w2), rows):
        block_inputs = None if inputs is None else inputs[:, start // per_group:(start + rows) // per_group]
        parts.append(_channel_steps(w2[start:start + rows], bits, method, block_inputs))
    scale = np.concatenate(parts) if len(parts) > 1 else parts[0]
    live = scale > 0
    fill = float(np.median(scale[live])) if live.any() else 1.0
    return np.where(live, scale, fill).astype(np.float32)


def _channel_steps(w2: np.ndarray, bits: int, method: str, inputs: Optional[np.ndarray]) -> np.ndarray:
    """The steps of ``weight_scales`` for channels-first ``w2`` (0 for all-zero channels).

    Candidates are tried in order and a channel keeps the first one with the smallest error, all
    channels at once, as many candidates at a time as fit SEARCH_BLOCK_BYTES of temporaries.
    """
    qmin, qmax = int_range(bits, signed=True)
    maxabs = np.abs(w2).max(axis=1)
    if method == "minmax":
        return maxabs / qmax
    live = maxabs > 0
    error = _output_error(inputs) if inputs is not None else _weight_error
    per_candidate = len(w2) * getattr(error, "bytes_per_channel", 16 * w2.shape[1])
    block = max(1, SEARCH_BLOCK_BYTES // max(per_candidate, 1))
    channels = np.arange(len(w2))
    best_alpha = np.ones_like(maxabs)
    best_err = np.full(maxabs.shape, np.inf)
    coarse = np.broadcast_to(COARSE_GRID.astype(maxabs.dtype)[:, None], (len(COARSE_GRID), len(w2)))
    for phase in ("coarse", "fine"):
        alphas = coarse if phase == "coarse" else np.clip(best_alpha[None, :] + FINE_STEPS[:, None], 0.01, 1.0)
        for start in range(0, len(alphas), block):
            alpha = alphas[start:start + block]
            scale = np.where(live, alpha * maxabs / qmax, 1.0).astype(np.float32)
            err = error(w2, scale, qmin, qmax)
            first = np.argmin(err, axis=0)  # the first of equal errors, as a one-by-one search keeps
            err, alpha = err[first, channels], alpha[first, channels]
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best_alpha = np.where(better, alpha, best_alpha)
    exact = _exact_steps(w2, qmax)
    return np.where(exact > 0, exact, best_alpha * maxabs / qmax)


def _exact_steps(w2: np.ndarray, qmax: int) -> np.ndarray:
    """Per channel, a step on whose grid every weight lies exactly within qmax codes (0 where none).

    Weights that are integer multiples of their smallest magnitude (a DFL head's arange 0..15
    expectation weights, a fixed difference or averaging kernel) are stored without error; the
    clipping search would round them onto a grid of max|w| / qmax.
    """
    mags = np.abs(w2.astype(np.float64))
    step = np.where(mags > 0, mags, np.inf).min(axis=1)
    codes = w2 / np.where(np.isfinite(step), step, 1.0)[:, None]
    on_grid = np.all(np.abs(codes - np.rint(codes)) <= 1e-6, axis=1) & (np.abs(codes).max(axis=1) <= qmax)
    return np.where(np.isfinite(step) & on_grid, step, 0.0)


@dataclass(frozen=True)
class ActParams:
    """Per-tensor activation quantization parameters."""

    scale: float
    zero_point: int
    bits: int
    signed: bool
    fixed: bool = False  # set by the user (--overrides): neither calibrated nor learned

    @property
    def qrange(self) -> Tuple[int, int]:
        return int_range(self.bits, self.signed)

    @property
    def bounds(self) -> Tuple[float, float]:
        """The smallest and largest representable values."""
        qmin, qmax = self.qrange
        return (qmin - self.zero_point) * self.scale, (qmax - self.zero_point) * self.scale


def range_params(lo: np.ndarray, hi: np.ndarray, bits: int, symmetric: bool) -> Tuple[np.ndarray, np.ndarray]:
    """Scales (float64 values of float32 steps) and integer zero points covering each [lo, hi], widened to
    include 0 (which stays exact); elementwise over arrays of ranges."""
    lo = np.minimum(np.asarray(lo, dtype=np.float64), 0.0)
    hi = np.maximum(np.asarray(hi, dtype=np.float64), 0.0)
    qmin, qmax = int_range(bits, signed=symmetric)
    if symmetric:
        amax = np.maximum(-lo, hi)
        scale = np.where(amax > 0, amax / qmax, 1.0).astype(np.float32).astype(np.float64)
        return scale, np.zeros(scale.shape, dtype=np.int64)
    scale = np.where(hi > lo, (hi - lo) / (qmax - qmin), 1.0).astype(np.float32).astype(np.float64)
    return scale, np.clip(np.rint(qmin - lo / scale), qmin, qmax).astype(np.int64)


def params_for_range(lo: float, hi: float, bits: int, symmetric: bool) -> ActParams:
    """Scale and zero point covering [lo, hi] (widened to include 0, which stays exact)."""
    scale, zero_point = range_params(np.array([float(lo)]), np.array([float(hi)]), bits, symmetric)
    return ActParams(float(scale[0]), int(zero_point[0]), bits, symmetric)


class Histogram:
    """Streaming histogram of a tensor's finite values over a fixed range, exact zeros apart."""

    def __init__(self, lo: float, hi: float, bins: int = 2048) -> None:
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        if hi <= lo:
            hi = lo + 1.0
        self.edges = np.linspace(lo, hi, bins + 1)
        self.counts = np.zeros(bins, dtype=np.float64)
        self.zeros = 0.0

    def add(self, x: np.ndarray) -> None:
        """Count the finite values of ``x``; those outside the range count in its first or last bin."""
        x = np.asarray(x, dtype=np.float32).ravel()
        finite = np.isfinite(x)
        if not finite.all():
            x = x[finite]
        nz = x[x != 0]
        self.zeros += x.size - nz.size
        lo, hi = self.edges[0], self.edges[-1]
        counts, _ = np.histogram(nz, bins=self.edges)  # values outside [lo, hi] are left out here
        self.counts += counts
        self.counts[0] += np.count_nonzero(nz < lo)
        self.counts[-1] += np.count_nonzero(nz > hi)

    @property
    def centers(self) -> np.ndarray:
        return 0.5 * (self.edges[1:] + self.edges[:-1])

    def total(self) -> float:
        return float(self.counts.sum() + self.zeros)


def _clipping_errors(hist: Histogram, lows: np.ndarray, highs: np.ndarray, scales: np.ndarray,
                     transfer: Optional[Transfer] = None) -> np.ndarray:
    """Expected squared error of quantizing the histogram for each candidate range.

    Values outside [low, high] cost their distance to the bound squared; values inside cost the
    rounding noise scale^2 / 12; exact zeros cost nothing (zero is always representable). With a
    ``transfer`` f (the activation that alone reads the point, calib/transfer.py) the errors are
    those of f's output: a clipped value costs (f(x) - f(bound))^2, rounding noise f'(x)^2 scale^2 / 12.
    """
    c, h = hist.centers, hist.counts
    if transfer is None:
        fc, gain, f_lows, f_highs = c, h, lows, highs
    else:
        fc = transfer(c)
        gain = h * np.gradient(fc, c) ** 2
        f_lows, f_highs = np.interp(lows, c, fc), np.interp(highs, c, fc)
    cum_h = np.concatenate([[0.0], np.cumsum(h)])
    cum_hf = np.concatenate([[0.0], np.cumsum(h * fc)])
    cum_hf2 = np.concatenate([[0.0], np.cumsum(h * fc * fc)])
    cum_gain = np.concatenate([[0.0], np.cumsum(gain)])
    i_lo = np.searchsorted(c, lows, side="left")  # bins [0, i_lo) lie below low
    i_hi = np.searchsorted(c, highs, side="right")  # bins [i_hi, n) lie above high
    below = cum_hf2[i_lo] - 2 * f_lows * cum_hf[i_lo] + f_lows**2 * cum_h[i_lo]
    n = len(c)
    above = ((cum_hf2[n] - cum_hf2[i_hi]) - 2 * f_highs * (cum_hf[n] - cum_hf[i_hi])
             + f_highs**2 * (cum_h[n] - cum_h[i_hi]))
    inside = (cum_gain[i_hi] - cum_gain[i_lo]) * scales**2 / 12.0
    return below + above + inside


def params_mse(hist: Histogram, bits: int, symmetric: bool,
               transfer: Optional[Transfer] = None) -> ActParams:
    """The range minimizing the expected quantization error of the histogram (the first of equal errors),
    or of what ``transfer`` makes of it (see ``_clipping_errors``).

    Candidates: fractions of the range's largest magnitude (symmetric), or every pair of fractions of
    its low and of its high end (asymmetric), evaluated all at once; with a transfer, a low end of 0 too
    (a Relu-like activation reads nothing below it).
    """
    lo, hi = float(hist.edges[0]), float(hist.edges[-1])
    fractions = np.linspace(0.05, 1.0, 96)
    if symmetric:
        amax = max(-lo, hi)
        lows, highs = -fractions * amax, fractions * amax
    else:
        ends = fractions * lo if lo < 0 else np.zeros(1)
        if transfer is not None and lo < 0:
            ends = np.concatenate([ends, [0.0]])
        lows, highs = np.repeat(ends, len(fractions)), np.tile(fractions * hi, len(ends))
    scales, zero_points = range_params(lows, highs, bits, symmetric)
    qmin, qmax = int_range(bits, signed=symmetric)
    errors = _clipping_errors(hist, (qmin - zero_points) * scales, (qmax - zero_points) * scales, scales, transfer)
    best = int(np.argmin(errors))
    return params_for_range(lows[best], highs[best], bits, symmetric)


def params_percentile(hist: Histogram, bits: int, symmetric: bool, percentile: float) -> ActParams:
    """Range from the ``percentile`` of the values (both tails; of |x| when symmetric)."""
    c = hist.centers
    counts = hist.counts.copy()
    counts[np.searchsorted(c, 0.0).clip(0, len(c) - 1)] += hist.zeros
    cdf = np.cumsum(counts) / max(counts.sum(), 1.0)
    tail = 1.0 - percentile / 100.0
    if symmetric:
        amax = max(-hist.edges[0], hist.edges[-1])
        grid = np.linspace(0.0, amax, 4097)
        inside = np.interp(grid, c, cdf) - np.interp(-grid, c, cdf, left=0.0)
        a = grid[min(int(np.searchsorted(inside, 1.0 - tail)), len(grid) - 1)]
        return params_for_range(-a, a, bits, True)
    lo = c[min(int(np.searchsorted(cdf, tail)), len(c) - 1)]
    hi = c[min(int(np.searchsorted(cdf, 1.0 - tail)), len(c) - 1)]
    return params_for_range(lo, hi, bits, False)


def sqnr_db(reference: np.ndarray, approx: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB (inf when equal)."""
    ref = np.asarray(reference, dtype=np.float64)
    noise = float(((ref - np.asarray(approx, dtype=np.float64)) ** 2).sum())
    signal = float((ref**2).sum())
    if noise == 0:
        return float("inf")
    if signal == 0:
        return float("-inf")
    return 10.0 * np.log10(signal / noise)
