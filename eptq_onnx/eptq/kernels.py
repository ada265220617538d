"""The hot operations of an EPTQ training step, with fused CPU kernels where they can be built.

``clipped_round``: an activation fake quantizer with a fixed step (forward: clip, scale, round,
rescale; backward: the straight-through gradient inside the grid's range). ``weighted_mse``: the
reconstruction loss, sum_i w_i * mean((z~_i - z_i)^2) over every loss tensor; ``quant_tap_loss``
both for one tensor; ``sum_terms`` their sum. ``soft_rounding``: every weight's AdaRound soft
weight and the rounding regularizer. ``round_to_grid``: the biases on their int32 grids.

On a small model a step is dominated by per-op overhead, not arithmetic: in Python each fake
quantizer is 4 elementwise ops and a Python autograd node, each loss term 3-4 ops and 2 nodes.
The C++ kernels in ``csrc/training_kernels.cpp`` make each one call with its autograd node in
C++, and one vectorized pass forward and one backward over small tensors (up to 256K elements
forward, 64K backward; larger ones take ATen's multi-threaded ops, where per-op overhead does not
matter); docs/BENCHMARKS.md has the step cost with and without them. They are compiled with torch's extension builder the first time a run
needs them (about 30 s with a C++ compiler; cached per machine and torch version) and used for
float32 tensors on the CPU. Without a compiler, on CUDA or with ``EPTQ_ONNX_NO_FUSED_KERNELS=1``
the Python reference below runs instead: the same arithmetic, slower.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

SOURCE = Path(__file__).with_name("csrc") / "training_kernels.cpp"
DISABLE_ENV = "EPTQ_ONNX_NO_FUSED_KERNELS"
BUILD_NAME = "eptq_onnx_training_kernels"


class ClippedRound(torch.autograd.Function):
    """Fake quantization with a fixed step for training (the Python reference of the fused kernel):
    clip to the grid's range, round to the grid, straight-through gradient inside the range and
    zero outside (one fused backward kernel). Divides by s as onnxruntime does (multiplying by
    1 / s puts values within an ulp of a rounding tie on the other code).
    """

    @staticmethod
    def forward(ctx, x: Tensor, scale: float, low: float, high: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        ctx.bounds = (low, high)
        return torch.clamp(x, low, high).div_(scale).round_().mul_(scale)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return torch.ops.aten.hardtanh_backward(grad, x, *ctx.bounds), None, None, None


@dataclass
class KernelStatus:
    """Whether the fused kernels are in use, and why not when they are not."""

    fused: bool
    detail: str
    failed: bool = False  # the build failed (not disabled on purpose): a fallback the report warns about


_ext = None  # the loaded extension module
_status: Optional[KernelStatus] = None


def kernel_ext():
    """The loaded extension module, or None (not built, disabled, or inside ``python_kernels``)."""
    return _ext


def _fits(x: Tensor) -> bool:
    return _ext is not None and x.device.type == "cpu" and x.dtype == torch.float32


def _grid_range(scale: float, zero_point: float, qmin: int, qmax: int) -> Tuple[float, float]:
    """The lowest and highest value of the grid: (qmin - z) * s and (qmax - z) * s."""
    return (qmin - zero_point) * scale, (qmax - zero_point) * scale


def clipped_round(x: Tensor, scale: float, zero_point: float, qmin: int, qmax: int) -> Tensor:
    """(clip(round(x / s) + z, qmin, qmax) - z) * s with a straight-through gradient inside the range."""
    low, high = _grid_range(scale, zero_point, qmin, qmax)
    if _fits(x):
        return _ext.clipped_round(x, scale, low, high)  # type: ignore[union-attr]
    return ClippedRound.apply(x, scale, low, high)


def weighted_mse(students: Sequence[Tensor], targets: Sequence[Tensor], weights: Sequence[float],
                 rows: Optional[Tensor] = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """sum_i weights[i] * mean((students[i] - targets[i])^2), summed in float64 and returned as ``dtype``.

    A target holds its student's values row by row: the same shape, or [rows, -1] with rows the
    student's first dimension (e.g. a column slice of the teacher cache). With ``rows`` (indices)
    student row r is compared with target row rows[r]: the targets then hold every cached sample
    and the fused kernel reads the rows in place (no gathered copy).
    """
    if _ext is not None and all(_fits(s) and _fits(t) for s, t in zip(students, targets)):
        return _ext.weighted_mse(list(students), list(targets), [float(w) for w in weights], rows).to(dtype)
    if rows is not None:
        targets = [t.index_select(0, rows) for t in targets]
    terms = [w * F.mse_loss(_rows(s), _rows(t)) for s, t, w in zip(students, targets, weights)]
    return torch.stack(terms).double().sum().to(dtype) if terms else torch.zeros((), dtype=dtype)


def quant_tap_loss(x: Tensor, scale: float, zero_point: float, qmin: int, qmax: int, target: Tensor, weight: float,
                   rows: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """``clipped_round(x, ...)`` and x's loss term ``weighted_mse([x], [target], [weight], rows,
    torch.float64)`` in one node (fused: one pass forward, one backward)."""
    low, high = _grid_range(scale, zero_point, qmin, qmax)
    if _fits(x) and _fits(target):
        y, loss = _ext.quant_tap_loss(x, target, rows, float(weight), scale, low, high)  # type: ignore[union-attr]
        return y, loss
    return ClippedRound.apply(x, scale, low, high), weighted_mse([x], [target], [weight], rows, torch.float64)


def sum_terms(terms: Sequence[Tensor]) -> Tensor:
    """The sum of float64 0-d loss terms, as float32 (one node with the fused kernels)."""
    if _ext is not None and terms and all(t.device.type == "cpu" for t in terms):
        return _ext.sum_terms(list(terms))
    return torch.stack(list(terms)).sum().float() if terms else torch.zeros(())


class RoundToGrid(torch.autograd.Function):
    """clamp(round(b / step), -limit, limit) x step with a fixed step, straight-through gradient to b
    (the Python reference of ``round_to_grid``'s kernel)."""

    @staticmethod
    def forward(ctx, b: Tensor, step: Tensor, limit: float) -> Tensor:  # type: ignore[override]
        return torch.clamp(torch.round(b / step), -limit, limit) * step

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return grad, None, None


def round_to_grid(b: Tensor, step: Tensor, limit: float) -> Tensor:
    """``b`` rounded to the grid ``step`` with codes clamped to +-limit, x step; the gradient
    passes straight through to ``b`` (the step is fixed)."""
    if _fits(b) and _fits(step):
        return _ext.round_to_grid(b, step, float(limit))  # type: ignore[union-attr]
    return RoundToGrid.apply(b, step, float(limit))


ZETA, GAMMA = 1.1, -0.1  # AdaRound's rectified sigmoid stretch


def rectified_sigmoid(v: Tensor) -> Tensor:
    """h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1)."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def rounding_regularizer(h: Tensor, share: Union[Tensor, float], beta: float) -> Tensor:
    """sum(share * (1 - |2h - 1|^beta)): zero where every h is 0 or 1."""
    return ((1.0 - torch.abs(2.0 * h - 1.0) ** beta) * share).sum()


def soft_rounding(v: Tensor, floor_scaled: Tensor, room_scaled: Tensor, share: Tensor, beta: Optional[float],
                  shapes: Sequence[Sequence[int]]) -> Tuple[List[Tensor], Tensor]:
    """AdaRound's soft weights ``floor_scaled + h(V) * room_scaled`` (flat tensors of one size),
    split into the weights' ``shapes``, and the rounding regularizer ``rounding_regularizer(h(V),
    share, beta)`` (zero without a beta).

    Fused: one node whose forward also evaluates both derivatives with respect to V, instead of a
    chain of about 20 small ops and nodes forward and backward, and a split and a view per weight
    (the sigmoid and the power still run as torch's vectorized ops). Equal to the Python path up
    to float rounding.
    """
    if all(_fits(t) and t.is_contiguous() for t in (v, floor_scaled, room_scaled, share)):
        *soft, reg = _ext.soft_rounding(v, floor_scaled, room_scaled, share, beta, ZETA - GAMMA, GAMMA,  # type: ignore[union-attr]
                                        [list(s) for s in shapes])
        return soft, reg
    h = rectified_sigmoid(v)
    reg = rounding_regularizer(h, share, beta) if beta is not None else torch.zeros((), device=v.device)
    parts = torch.split(torch.addcmul(floor_scaled, h, room_scaled), [math.prod(s) for s in shapes])
    return [part.view(shape) for part, shape in zip(parts, shapes)], reg


def _rows(t: Tensor) -> Tensor:
    """``t`` as a 2-d [first dimension, rest] tensor (a view where it can be)."""
    return t.reshape(t.shape[0] if t.dim() else 1, -1)


def load(log: Callable[[str], None] = print) -> KernelStatus:
    """Build (the first time on this machine) and load the fused kernels; never raises.

    When they cannot be built the reason is logged as a warning and the Python path stays in use.
    """
    global _ext, _status
    if _status is not None:
        return _status
    if os.environ.get(DISABLE_ENV, "").strip() not in ("", "0"):
        _status = KernelStatus(False, f"Python kernels ({DISABLE_ENV} is set)")
        return _status
    try:
        _ext = _build(log)
        _status = KernelStatus(True, "fused C++ kernels (CPU)")
    except Exception as exc:  # a missing compiler, headers or ninja: every failure means the same fallback
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:200]
        _status = KernelStatus(False, f"Python kernels (the fused C++ kernels could not be built: {reason})", failed=True)
        log(f"warning: {_status.detail}; CPU training steps run about 2x slower. "
            f"Install a C++ compiler (g++ or clang) and ninja, or set {DISABLE_ENV}=1 to silence this.")
    return _status


def _build(log: Callable[[str], None]):
    quiet = logging.getLogger("torch.utils.cpp_extension")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # e.g. "No CUDA runtime is found" on import: we build for the CPU only
    try:
        from torch.utils import cpp_extension

        if not _built(cpp_extension):
            log("EPTQ: compiling the fused training kernels (once per machine and torch version, ~30 s)")
        with _ninja_on_path():
            return cpp_extension.load(_build_name(), [str(SOURCE)], extra_cflags=_flags(), verbose=False)
    finally:
        quiet.setLevel(level)


def _flags() -> List[str]:
    """-O3, no contraction of a * b + c into one rounding (the kernels must round like torch), no
    floating-point traps (so that loops with selects vectorize; no value changes), and AVX2 on x86
    CPUs that have it (a build is per machine, its name says which)."""
    flags = ["-O3", "-ffp-contract=off", "-fno-trapping-math"]
    if platform.machine().lower() in ("x86_64", "amd64") and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        flags.append("-mavx2")
    return flags


def _build_name() -> str:
    return BUILD_NAME + ("_avx2" if "-mavx2" in _flags() else "")


def _built(cpp_extension) -> bool:
    """Whether a build of the kernels is already there (only decides whether to announce one)."""
    try:  # a private helper of torch's: any failure only means no announcement
        return any(Path(cpp_extension._get_build_directory(_build_name(), verbose=False)).glob("*.[sp][oy]*"))
    except Exception:
        return False


@contextlib.contextmanager
def _ninja_on_path():
    """Put the ``ninja`` package's binary on PATH while building when none is there (a venv not activated)."""
    path = os.environ.get("PATH", "")
    if shutil.which("ninja") is None:
        try:
            import ninja  # type: ignore[import-not-found]

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + path
        except ImportError:
            pass
    try:
        yield
    finally:
        os.environ["PATH"] = path


@contextlib.contextmanager
def python_kernels() -> Iterator[None]:
    """Run the Python reference kernels inside the block, even where the fused ones are loaded
    (to compare the two)."""
    global _ext
    saved, _ext = _ext, None
    try:
        yield
    finally:
        _ext = saved
