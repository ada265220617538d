"""The fused CPU training kernels against their Python references, and the fallback when they cannot be built."""
from __future__ import annotations

import copy
import shutil

import pytest
import torch
import torch.nn.functional as F

from eptq_onnx import QuantConfig, quantize

from eptq_onnx.eptq import kernels as training_kernels
from eptq_onnx.config import OptimizeOptions
from eptq_onnx.eptq.kernels import ClippedRound, KernelStatus
from models import zoo


def _extension():  # type: ignore[no-untyped-def]
    """The built extension; a failed build fails the test where a C++ compiler is on PATH."""
    status = training_kernels.load(log=lambda message: None)
    if not status.fused:
        if status.failed and any(shutil.which(c) for c in ("c++", "g++", "clang++")):
            pytest.fail(f"a C++ compiler is on PATH but: {status.detail}")
        pytest.skip(status.detail)
    return training_kernels._ext


def _grid_values(scale: float, zero_point: float) -> torch.Tensor:
    """Random values over and beyond an 8-bit grid's range, exact rounding ties, and the range ends."""
    gen = torch.Generator().manual_seed(0)
    low, high = (0 - zero_point) * scale, (255 - zero_point) * scale
    ties = (torch.arange(-140, 140, dtype=torch.float32) + 0.5) * scale
    ends = torch.tensor([low, high, low - scale, high + scale, 0.0, -0.0])
    wide = (torch.rand(3000, generator=gen) * 1.4 - 0.2) * (high - low) + low
    return torch.cat([wide, ties, ends])


@pytest.mark.parametrize("scale,zero_point", [(0.05, 128.0), (0.0123, 0.0), (3.7, 17.0)])
def test_fused_clipped_round_equals_the_python_reference(scale: float, zero_point: float) -> None:
    """Same values forward (ties to even, saturation) and the same straight-through gradient backward."""
    ext = _extension()
    low, high = (0 - zero_point) * scale, (255 - zero_point) * scale
    base = _grid_values(scale, zero_point)
    middle, large = base.repeat(30), base.repeat(90)  # over the one-pass sizes: ATen's ops, the same arithmetic
    for x in (base, base[:3000].reshape(10, 20, 15).transpose(0, 2), middle, large):
        grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        fused = ext.clipped_round(a, scale, low, high)
        reference = ClippedRound.apply(b, scale, low, high)
        assert torch.equal(fused, reference)
        fused.backward(grad)
        reference.backward(grad)
        assert torch.equal(a.grad, b.grad)
        assert int((a.grad == 0).sum()) > 0 and int((a.grad != 0).sum()) > 0


def test_clipped_round_uses_the_kernel_on_float32_cpu_and_python_otherwise() -> None:
    _extension()
    x = torch.randn(40, requires_grad=True)
    assert type(training_kernels.clipped_round(x, 0.1, 0.0, -8, 7).grad_fn).__name__ != "ClippedRoundBackward"
    y = training_kernels.clipped_round(x.double(), 0.1, 0.0, -8, 7)
    assert type(y.grad_fn).__name__ == "ClippedRoundBackward" and y.dtype == torch.float64


def test_clipped_round_keeps_a_nan_as_nan() -> None:
    """A non-finite input stays visible (the checks after optimization look for NaN outputs): NaN in, NaN
    out, and infinities saturate, in the fused kernel as in the Python reference."""
    ext = _extension()
    x = torch.tensor([float("nan"), float("inf"), float("-inf"), 0.26])
    for y in (ext.clipped_round(x, 0.1, -12.8, 12.7), ClippedRound.apply(x, 0.1, -12.8, 12.7)):
        assert torch.isnan(y[0]) and not torch.isnan(y[1:]).any()
        assert torch.allclose(y[1:], torch.tensor([12.7, -12.8, 0.3]))


@pytest.mark.parametrize("zero_point", [0.0, 128.0])
def test_an_activation_quantizer_without_gradients_computes_what_its_training_path_does(zero_point: float) -> None:
    """ActFakeQuant under no_grad (bias correction, checks) takes the one-pass clipped round; its values are
    those of QuantizeLinear -> DequantizeLinear as the gradient path computes them, ties and saturation too."""
    from eptq_onnx.init.quantizers import ActParams
    from eptq_onnx.twin.fake_quant import ActFakeQuant

    quantizer = ActFakeQuant(ActParams(scale=0.05, zero_point=int(zero_point), bits=8, signed=False))
    x = _grid_values(0.05, zero_point)
    with torch.no_grad():
        fast = quantizer(x)
    slow = quantizer(x.clone().requires_grad_()).detach()
    assert torch.equal(fast, slow)


def _loss_inputs():  # type: ignore[no-untyped-def]
    """Students of several shapes and sizes (one over the one-pass size) and their targets: the
    teacher cache's column slices and whole tensors."""
    gen = torch.Generator().manual_seed(2)
    students = [torch.randn(6, 3, 4, 5, generator=gen), torch.randn(6, 7, generator=gen), torch.randn(6, 2, 9, generator=gen),
                torch.randn(6, 4, 50, 60, generator=gen)]
    cache_rows = torch.randn(6, 60 + 7 + 12000, generator=gen)
    sliced = list(torch.split(cache_rows, [60, 7, 12000], dim=1))
    targets = sliced[:2] + [torch.randn(6, 2, 9, generator=gen), sliced[2]]
    return students, targets, [0.5, 2.0, 1.25, 0.75]


def test_fused_weighted_mse_equals_the_sum_of_mse_losses() -> None:
    """Loss and gradients equal sum_i w_i * F.mse_loss (float rounding apart), targets sliced or whole."""
    _extension()
    students, targets, weights = _loss_inputs()
    a = [s.clone().requires_grad_() for s in students]
    b = [s.clone().requires_grad_() for s in students]
    fused = training_kernels.weighted_mse(a, targets, weights)
    reference = sum(w * F.mse_loss(s, t.reshape(s.shape)) for s, t, w in zip(b, targets, weights))
    assert type(fused.grad_fn).__name__ != "SumBackward0"
    assert float(fused.detach()) == pytest.approx(float(reference.detach()), rel=1e-6)
    fused.backward()
    reference.backward()
    for x, y in zip(a, b):
        assert x.grad.shape == x.shape
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-6, atol=1e-9)
    with training_kernels.python_kernels():  # the Python path takes the same inputs
        assert float(training_kernels.weighted_mse(students, targets, weights)) == pytest.approx(float(reference), rel=1e-6)


def test_weighted_mse_reads_indexed_rows_like_a_gathered_copy() -> None:
    """With ``rows`` the targets hold every cached sample: loss and gradients equal those against the
    gathered rows, fused (read in place) and in Python."""
    _extension()
    students, targets, weights = _loss_inputs()
    gen = torch.Generator().manual_seed(3)
    rows = torch.tensor([4, 0, 5, 2, 2, 1])
    wide = [torch.cat([t.reshape(6, -1), torch.randn(3, t[0].numel(), generator=gen)])[torch.tensor([3, 4, 5, 0, 1, 2, 6, 7, 8])]
            for t in targets]  # 9 cached samples; row i of the 6 gathered ones is at i+3 (i < 3) or i-3
    index = torch.tensor([[3, 4, 5, 0, 1, 2][r] for r in rows.tolist()])
    gathered = [w[index] for w in wide]
    for kernels in (training_kernels.python_kernels, None):
        with kernels() if kernels else torch.enable_grad():
            a = [s.clone().requires_grad_() for s in students]
            b = [s.clone().requires_grad_() for s in students]
            indexed = training_kernels.weighted_mse(a, wide, weights, index)
            plain = training_kernels.weighted_mse(b, gathered, weights)
            assert float(indexed.detach()) == float(plain.detach())
            indexed.backward()
            plain.backward()
            for x, y in zip(a, b):
                assert torch.equal(x.grad, y.grad)


@pytest.mark.parametrize("indexed", [False, True])
def test_quant_tap_loss_is_the_fake_quantizer_and_its_loss_term_in_one_node(indexed: bool) -> None:
    """Forward: clipped_round's values and weighted_mse's term; backward: exactly the sum of the two
    separate gradients (as the autograd engine adds them), also with only one of them flowing."""
    _extension()
    gen = torch.Generator().manual_seed(5)
    scale, zero_point, qmin, qmax = 0.05, 3.0, -128, 127
    for shape in ((6, 4, 5), (6, 40, 300)):  # one-pass and ATen sizes
        x = torch.randn(*shape, generator=gen) * 4
        cache = torch.randn(9, x[0].numel(), generator=gen)
        rows = torch.tensor([8, 0, 3, 3, 1, 5]) if indexed else None
        target = cache if indexed else cache[:6].reshape(shape)
        grad_y = torch.randn(*shape, generator=gen)
        for flows in ("both", "y", "loss"):
            a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
            y, loss = training_kernels.quant_tap_loss(a, scale, zero_point, qmin, qmax, target, 0.7, rows)
            y_ref = training_kernels.clipped_round(b, scale, zero_point, qmin, qmax)
            loss_ref = training_kernels.weighted_mse([b], [target], [0.7], rows, torch.float64)
            assert torch.equal(y, y_ref) and loss.dtype == torch.float64 and float(loss) == float(loss_ref)
            outs = {"both": (y, loss), "y": (y,), "loss": (loss,)}[flows]
            refs = {"both": (y_ref, loss_ref), "y": (y_ref,), "loss": (loss_ref,)}[flows]
            grads = {"both": (grad_y, torch.tensor(1.5, dtype=torch.float64)), "y": (grad_y,), "loss": (torch.tensor(1.5, dtype=torch.float64),)}[flows]
            torch.autograd.backward(outs, grads)
            torch.autograd.backward(refs, grads)
            assert torch.equal(a.grad, b.grad), (shape, flows)


@pytest.mark.parametrize("beta", [None, 20.0, 7.3, 2.0])
def test_soft_rounding_is_the_python_chain_in_one_node(beta) -> None:  # type: ignore[no-untyped-def]
    """Soft weights (in each weight's shape), regularizer and the gradient reaching V (from both,
    from each alone, and with a weight unused) as the Python ops compute them, up to float
    rounding; over the one-thread size and ATen's tasks, with V saturating h at 0 and 1 and
    exactly 0.5."""
    _extension()
    gen = torch.Generator().manual_seed(3)
    for n in (1000, 100_003):
        shapes = [(n - 80,), (4, 2, 3, 3), (1, 0), (2, 2, 2)]
        v = torch.cat([torch.randn(n - 4, generator=gen) * 3, torch.tensor([-20.0, 20.0, 0.0, 2.3979])])
        floor = torch.randint(-8, 7, (n,), generator=gen).float() * 0.01
        room = (torch.rand(n, generator=gen) > 0.1).float() * 0.01
        share = torch.rand(n, generator=gen) / n
        grads_soft = [torch.randn(s, generator=gen) for s in shapes]
        for flows in ("both", "soft", "reg", "one weight"):
            a, b = v.clone().requires_grad_(), v.clone().requires_grad_()
            soft, reg = training_kernels.soft_rounding(a, floor, room, share, beta, shapes)
            assert type(soft[0].grad_fn).__name__ not in ("ViewBackward0", "SplitWithSizesBackward0")
            with training_kernels.python_kernels():
                soft_ref, reg_ref = training_kernels.soft_rounding(b, floor, room, share, beta, shapes)
            assert [tuple(t.shape) for t in soft] == shapes
            for fused, reference in zip(soft, soft_ref):
                torch.testing.assert_close(fused, reference, rtol=0, atol=1e-8)
            assert reg.dtype == torch.float32 and reg.dim() == 0
            torch.testing.assert_close(reg, reg_ref, rtol=1e-5, atol=0)
            if beta is None:
                assert float(reg.detach()) == 0.0 and not reg.requires_grad
                if flows in ("both", "reg"):
                    continue
            used = {"both": [0, 1, 3], "soft": [0, 1, 3], "reg": [], "one weight": [1]}[flows]
            with_reg = flows in ("both", "reg", "one weight") and beta is not None
            for outs, (s_list, r) in ((a, (soft, reg)), (b, (soft_ref, reg_ref))):
                tensors = [s_list[i] for i in used] + ([r] if with_reg else [])
                grads = [grads_soft[i] for i in used] + ([torch.tensor(0.7)] if with_reg else [])
                torch.autograd.backward(tensors, grads)
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-9)
            if 0 in used or with_reg:
                assert int((a.grad == 0).sum()) >= 2 and int((a.grad != 0).sum()) > n // 2
            else:  # only the second weight's part of V has a gradient
                assert bool((a.grad[n - 80 : n - 8] != 0).any()) and not bool(torch.cat([a.grad[: n - 80], a.grad[n - 8 :]]).any())


def test_sum_terms_and_round_to_grid_equal_their_python_references() -> None:
    """sum_terms: the float64 terms' sum as float32, each term's gradient the sum's. round_to_grid:
    the same int32-grid values (ties to even, the code limit) and the gradient straight to b."""
    _extension()
    gen = torch.Generator().manual_seed(7)
    terms = [(torch.rand((), generator=gen, dtype=torch.float64) * 10 ** -k).requires_grad_() for k in range(6)]
    total = training_kernels.sum_terms(terms)
    assert type(total.grad_fn).__name__ != "ToCopyBackward0" and total.dtype == torch.float32
    assert float(total.detach()) == float(torch.stack([t.detach() for t in terms]).sum().float())
    (total * 3.0).backward()
    assert all(t.grad is not None and t.grad.dtype == torch.float64 and float(t.grad) == 3.0 for t in terms)
    step = torch.rand(40, generator=gen) * 0.01 + 1e-3
    b = torch.cat([torch.randn(36, generator=gen), step[36:] * torch.tensor([0.5, 2.5, -1.5, 3e9])])
    a, ref = b.clone().requires_grad_(), b.clone().requires_grad_()
    fused = training_kernels.round_to_grid(a, step, 2**31 - 1)
    expected = training_kernels.RoundToGrid.apply(ref, step, float(2**31 - 1))
    assert type(fused.grad_fn).__name__ != "RoundToGridBackward" and torch.equal(fused, expected)
    assert float(fused[-1] / step[-1]) == pytest.approx(2**31, rel=1e-6)  # clamped to the code limit
    grad = torch.randn(40, generator=gen)
    fused.backward(grad)
    expected.backward(grad)
    assert torch.equal(a.grad, grad) and torch.equal(ref.grad, grad)


@pytest.mark.parametrize("rectified", [True, False])
def test_fused_updates_are_torch_optims_radam_and_adam_bit_for_bit(rectified: bool) -> None:
    """300 updates (through RAdam's switch to the rectified step), a parameter without a gradient,
    and a state_dict torch.optim loads to go on identically."""
    from eptq_onnx.eptq.optimizer import FusedUpdates

    _extension()
    gen = torch.Generator().manual_seed(6)
    start = [torch.randn(1000, generator=gen), torch.randn(7, generator=gen), torch.randn(3, generator=gen)]
    ours = [torch.nn.Parameter(t.clone()) for t in start]
    theirs = [torch.nn.Parameter(t.clone()) for t in start]
    groups = lambda ps: [{"params": ps[:2], "lr": 3e-2}, {"params": ps[2:], "lr": 1e-3}]  # noqa: E731
    fused = FusedUpdates(groups(ours), rectified=rectified)
    cls = torch.optim.RAdam if rectified else torch.optim.Adam
    reference = cls(groups(theirs), foreach=True)
    for step in range(300):
        grads = [torch.randn(t.shape, generator=gen) * (3.0 if step % 11 == 0 else 0.01) for t in start]
        for i, (p, q) in enumerate(zip(ours, theirs)):
            p.grad = q.grad = None if (i == 1 and step < 5) else grads[i].clone()
        fused.step()
        reference.step()
        for p, q in zip(ours, theirs):
            assert torch.equal(p.detach(), q.detach()), step
    again = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    resumed = cls(groups(again), foreach=True)
    resumed.load_state_dict(copy.deepcopy(fused.state_dict()))  # as a checkpoint file holds it
    for p, q in zip(ours, again):
        p.grad = q.grad = torch.ones_like(p)
    fused.step()
    resumed.step()
    for p, q in zip(ours, again):
        assert torch.equal(p.detach(), q.detach())


def test_a_failed_build_falls_back_to_python_loudly(monkeypatch, calib_for) -> None:
    """No compiler: a warning naming the reason, the Python kernels, and a FALLBACK line in the report."""
    def no_compiler(log):  # type: ignore[no-untyped-def]
        raise RuntimeError("Error building extension:\nc++: command not found")

    monkeypatch.setattr(training_kernels, "_status", None)
    monkeypatch.setattr(training_kernels, "_ext", None)
    monkeypatch.setattr(training_kernels, "_build", no_compiler)
    monkeypatch.delenv(training_kernels.DISABLE_ENV, raising=False)
    said: list = []
    status = training_kernels.load(log=said.append)
    assert not status.fused and status.failed and "c++: command not found" in status.detail
    assert len(said) == 1 and said[0].startswith("warning:") and training_kernels.DISABLE_ENV in said[0]
    assert training_kernels.load(log=said.append) is status and len(said) == 1  # decided once per process
    model = zoo.mlp()
    options = OptimizeOptions(iters=3, weighting="uniform", batch_size=8)
    result = quantize(model, calib_for(model, 16), QuantConfig(optimize=options), progress=False)
    assert result.report.optimization["kernels"] == status.detail
    assert any(w.startswith("FALLBACK: EPTQ trained with the slower Python kernels") for w in result.report.warnings)


def test_the_kernels_can_be_turned_off(monkeypatch) -> None:
    monkeypatch.setattr(training_kernels, "_status", None)
    monkeypatch.setattr(training_kernels, "_ext", None)
    monkeypatch.setenv(training_kernels.DISABLE_ENV, "1")
    said: list = []
    assert training_kernels.load(log=said.append) == KernelStatus(False, f"Python kernels ({training_kernels.DISABLE_ENV} is set)")
    assert said == []


def test_pipeline_reports_the_fused_kernels(calib_for) -> None:
    _extension()
    model = zoo.residual_cnn()
    options = OptimizeOptions(iters=3, weighting="uniform", batch_size=8)
    result = quantize(model, calib_for(model, 16), QuantConfig(optimize=options), progress=False)
    assert result.report.optimization["kernels"] == "fused C++ kernels (CPU)"
    assert not any("Python kernels" in w for w in result.report.warnings)
