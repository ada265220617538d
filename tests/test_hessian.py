"""Label-Free Hessian: Hutchinson estimates against exact Jacobian traces, and the paper's claim on digits."""
from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations
from typing import Dict, List, Optional

import numpy as np
import pytest
import torch
import torch.nn as nn
from scipy.stats import spearmanr

from eptq_onnx.eptq.hessian import MIN_TIMED_DRAWS, Forward, LFHResult, label_free_hessian, log_normalize

DRAWS = 50
SIGMAS = 3.0  # allowed deviation from the exact trace, in Hutchinson standard errors


# ---------------------------------------------------------------- small models and their forwards


def sequential_forward(net: nn.Sequential, probe: List[int]) -> Forward:
    """Runs ``net`` on feed "x"; probes the outputs of the layers at ``probe``, named by index."""

    def forward(feed: Dict[str, torch.Tensor]):
        h, tensors = feed["x"], {}
        for i, layer in enumerate(net):
            h = layer(h)
            if i in probe:
                tensors[str(i)] = h
        return [h], tensors

    return forward


def mlp() -> nn.Sequential:
    net = nn.Sequential(nn.Linear(6, 24), nn.Tanh(), nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 5))
    with torch.no_grad():
        net[2].weight.mul_(4.0)  # spread the traces over more than a decade
    return net


def cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 3, stride=2), nn.Tanh(), nn.Flatten(), nn.Linear(72, 6)
    )


class TwoHeads(nn.Module):
    """A trunk and two heads of different sizes: the LFH output vector is both, concatenated."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(6, 16)
        self.head1 = nn.Linear(16, 3)
        self.head2 = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 5))

    def forward_probed(self, feed: Dict[str, torch.Tensor]):
        pre = self.trunk(feed["x"])
        post = torch.tanh(pre)
        hidden = self.head2[1](self.head2[0](post))
        out1, out2 = self.head1(post), self.head2[2](hidden)
        return [out1, out2], {"pre": pre, "post": post, "hidden": hidden, "out1": out1, "out2": out2}


def feeds(shape: tuple, n: int) -> List[Dict[str, torch.Tensor]]:
    return [{"x": torch.randn(1, *shape)} for _ in range(n)]


CASES = {
    "mlp": lambda: (sequential_forward(mlp(), [0, 1, 2, 3, 4]), (6,)),
    "cnn": lambda: (sequential_forward(cnn(), [0, 1, 2, 3, 5]), (1, 8, 8)),
    "two_heads": lambda: (TwoHeads().forward_probed, (6,)),
}


# ---------------------------------------------------------------- the exact answer and its Hutchinson error


@dataclass
class Exact:
    trace: float  # c * mean over samples of Tr(J^T J)
    stderr: float  # standard error of the M-draw Hutchinson estimate of ``trace``


def exact_traces(forward: Forward, samples: List[Dict[str, torch.Tensor]], distribution: str, draws: int,
                 position_axes: Optional[Dict[str, tuple]] = None) -> Dict[str, Exact]:
    """c * Tr(J_z^T J_z) by one backward pass per output component, and the estimator's standard error.

    With A = J J^T (d_o x d_o), one draw of ||v^T J||^2 has variance 2 ||A||_F^2 (Gaussian) or
    2 (||A||_F^2 - sum_k A_kk^2) (Rademacher). With ``position_axes``, J is first multiplied by S, the
    matrix summing the named axes of z (the channel-correlated trace Tr(S^T J^T J S)).
    """
    sums: Dict[str, List[float]] = {}
    for feed in samples:
        outputs, tensors = forward({k: v.clone().requires_grad_(True) for k, v in feed.items()})
        flat = torch.cat([o.reshape(-1) for o in outputs])
        c = 2.0 / flat.numel()
        rows = [torch.autograd.grad(flat[k], list(tensors.values()), retain_graph=True, allow_unused=True) for k in range(flat.numel())]
        for j, name in enumerate(tensors):
            jac = torch.stack([_flat_grad(row[j], tensors[name]) for row in rows]).double()
            axes = (position_axes or {}).get(name)
            if axes:  # J S: the rows of J as tensors of z's shape, summed over the axes
                jac = jac.view(len(rows), *tensors[name].shape).sum(dim=[a + 1 for a in axes]).reshape(len(rows), -1)
            gram = jac @ jac.T
            variance = 2 * (gram.square().sum() - (gram.diagonal().square().sum() if distribution == "rademacher" else 0))
            total = sums.setdefault(name, [0.0, 0.0])
            total[0] += c * float(gram.trace())
            total[1] += c * c * float(variance) / draws
    n = len(samples)
    return {name: Exact(t / n, math.sqrt(v) / n) for name, (t, v) in sums.items()}


def _flat_grad(g, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros(like.numel()) if g is None else g.reshape(-1)


# ---------------------------------------------------------------- (a) Hutchinson against the exact traces


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_exact_jacobian_trace(case: str, distribution: str) -> None:
    torch.manual_seed(0)
    forward, shape = CASES[case]()
    samples = feeds(shape, 3)
    exact = exact_traces(forward, samples, distribution, DRAWS)
    result = label_free_hessian(forward, samples, max_draws=DRAWS, tol=0.0, distribution=distribution, progress=False)

    assert result.draws == DRAWS and result.samples == 3
    assert set(result.traces) == set(exact)
    for name, ex in exact.items():
        error = abs(result.traces[name] - ex.trace)
        print(f"{case}/{distribution} {name}: exact {ex.trace:.4g} lfh {result.traces[name]:.4g} "
              f"rel.err {error / ex.trace:.3f} ({error / max(ex.stderr, 1e-300):.2f} SE)")
        assert error <= SIGMAS * ex.stderr + 1e-9 * ex.trace, name
    for a, b in combinations(exact, 2):
        if exact[a].trace > 3 * exact[b].trace:
            assert result.traces[a] > result.traces[b], (a, b)
        elif exact[b].trace > 3 * exact[a].trace:
            assert result.traces[b] > result.traces[a], (a, b)


CNN_CHANNEL_AXES = {"0": (2, 3), "1": (2, 3), "2": (2, 3), "3": (2, 3)}  # "5" (the Linear) has none


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_channel_trace_matches_exact_summed_jacobian(distribution: str) -> None:
    """With position axes the estimate is c * Tr(S^T J^T J S), S summing each channel's positions."""
    torch.manual_seed(0)
    forward, shape = CASES["cnn"]()
    samples = feeds(shape, 3)
    exact = exact_traces(forward, samples, distribution, DRAWS, CNN_CHANNEL_AXES)
    elementwise = exact_traces(forward, samples, distribution, DRAWS)
    result = label_free_hessian(forward, samples, max_draws=DRAWS, tol=0.0, distribution=distribution, progress=False,
                                position_axes=CNN_CHANNEL_AXES)
    assert result.position_axes == CNN_CHANNEL_AXES
    for name, ex in exact.items():
        error = abs(result.traces[name] - ex.trace)
        print(f"{distribution} {name}: exact {ex.trace:.4g} (elementwise {elementwise[name].trace:.4g}) lfh {result.traces[name]:.4g}")
        assert error <= SIGMAS * ex.stderr + 1e-9 * ex.trace, name
    assert exact["5"].trace == pytest.approx(elementwise["5"].trace)  # no positions: the same trace
    # not vacuous: the summed trace differs from the elementwise one (by ~20% here, the gradient's signs
    # varying over positions; before a global pool it is P times larger, the next test)
    assert sum(abs(exact[n].trace / elementwise[n].trace - 1) > 0.1 for n in CNN_CHANNEL_AXES) >= 2


def test_channel_trace_before_global_average_pool_is_positions_times_elementwise() -> None:
    """Before a global average pool d(v^T f)/dz is the same at every position of a channel, so the
    summed trace is exactly P times the elementwise one (P positions), draw by draw."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    forward, samples = sequential_forward(net, [0]), feeds((1, 8, 8), 2)
    element = label_free_hessian(forward, samples, tol=0.0, max_draws=12, progress=False)
    summed = label_free_hessian(forward, samples, tol=0.0, max_draws=12, progress=False, position_axes={"0": (2, 3)})
    assert summed.traces["0"] == pytest.approx(36 * element.traces["0"], rel=1e-9)


def test_position_axes_must_fit_the_tensor() -> None:
    forward, shape = CASES["cnn"]()
    for axes in ({"0": (0,)}, {"5": (2,)}, {"0": (4,)}):
        with pytest.raises(ValueError, match="position axes"):
            label_free_hessian(forward, feeds(shape, 1), progress=False, position_axes=axes)


def test_mlp_case_spans_more_than_3x() -> None:
    """The ranking check above is not vacuous: the MLP's exact traces differ by more than 3x."""
    torch.manual_seed(0)
    forward, shape = CASES["mlp"]()
    traces = [e.trace for e in exact_traces(forward, feeds(shape, 3), "gaussian", DRAWS).values()]
    assert max(traces) > 3 * min(traces)


def test_probing_outputs_gives_exact_scale_with_multiple_outputs() -> None:
    """d(v^T f)/d out_j = v_j, so with Rademacher v each output's trace is exactly 2 * size_j / d_o."""
    torch.manual_seed(0)
    model = TwoHeads()

    def outputs_only(feed):
        outputs, tensors = model.forward_probed(feed)
        return outputs, {"out1": tensors["out1"], "out2": tensors["out2"]}

    result = label_free_hessian(outputs_only, feeds((6,), 2), distribution="rademacher", progress=False)
    assert result.traces == pytest.approx({"out1": 2 * 3 / 8, "out2": 2 * 5 / 8}, rel=1e-6)
    assert result.draws == 10  # every draw gives the same value: converged at min_draws


def test_early_stop() -> None:
    torch.manual_seed(0)
    forward, shape = CASES["cnn"]()
    samples = feeds(shape, 2)
    assert label_free_hessian(forward, samples, tol=0.0, max_draws=30, progress=False).draws == 30
    loose = label_free_hessian(forward, samples, tol=0.5, min_draws=5, max_draws=30, progress=False)
    assert 5 <= loose.draws < 30


def test_time_limit_cuts_draws_then_samples_and_says_so() -> None:
    forward = sequential_forward(mlp(), [0, 2])
    samples = feeds((6,), 4)
    full = label_free_hessian(forward, samples, tol=0.0, max_draws=12, progress=False)
    roomy = label_free_hessian(forward, samples, tol=0.0, max_draws=12, progress=False, time_limit_s=1e6)
    assert roomy.traces == full.traces and not roomy.time_limited and roomy.total_draws == 4 * 12
    spent = label_free_hessian(forward, samples, tol=0.0, max_draws=12, progress=False, time_limit_s=0.0)
    # no time at all: one sample with the draws a limit never cuts
    assert spent.time_limited and spent.samples == 1 and spent.draws == spent.total_draws == MIN_TIMED_DRAWS
    assert all(math.isfinite(t) and t > 0 for t in spent.traces.values())


def test_tensor_off_the_output_path_gets_zero() -> None:
    torch.manual_seed(0)
    net = mlp()

    def forward(feed):
        hidden = net[1](net[0](feed["x"]))
        out = net[4](net[3](net[2](hidden)))
        side = hidden * 2.0  # computed, never used by the output
        return [out], {"hidden": hidden, "side": side, "constant": torch.ones(3), "out": out}

    result = label_free_hessian(forward, feeds((6,), 2), progress=False)
    assert result.traces["side"] == 0.0 and result.traces["constant"] == 0.0
    assert result.normalized["side"] == 0.0 and result.normalized["constant"] == 0.0
    assert result.traces["hidden"] > 0 and result.traces["out"] > 0
    assert all(math.isfinite(w) for w in result.normalized.values())


def test_deterministic_given_seed_and_works_without_parameter_grads() -> None:
    torch.manual_seed(0)
    net = cnn().requires_grad_(False)  # frozen parameters: the feed is made to require grad
    forward, samples = sequential_forward(net, [0, 3]), feeds((1, 8, 8), 2)
    first, again, other = (label_free_hessian(forward, samples, seed=s, tol=0.0, progress=False) for s in (7, 7, 8))
    assert first.traces == again.traces
    assert first.traces != other.traces
    assert all(t > 0 for t in first.traces.values())


def test_result_to_dict_and_bad_arguments() -> None:
    torch.manual_seed(0)
    forward, shape = CASES["mlp"]()
    result = label_free_hessian(forward, feeds(shape, 1), max_draws=12, progress=False)
    assert isinstance(result, LFHResult)
    assert set(result.to_dict()) == {"traces", "normalized", "draws", "samples", "seconds", "position_axes", "unknown_axes",
                                        "total_draws", "time_limited"}
    for kwargs in ({"distribution": "uniform"}, {"max_draws": 0}, {"tol": -1.0}):
        with pytest.raises(ValueError):
            label_free_hessian(forward, feeds(shape, 1), progress=False, **kwargs)
    with pytest.raises(ValueError):
        label_free_hessian(forward, [], progress=False)


def test_log_normalize() -> None:
    w = log_normalize({"a": 1e-4, "b": 1e-2, "c": 1.0})
    assert w == pytest.approx({"a": 0.0, "b": 0.5, "c": 1.0})
    assert log_normalize({"a": 3.0, "b": 3.0}) == {"a": 1.0, "b": 1.0}
    assert log_normalize({"dead": 0.0, "neg": -1.0, "a": 2.0, "b": 8.0}) == {"dead": 0.0, "neg": 0.0, "a": 0.0, "b": 1.0}
    assert log_normalize({"dead": 0.0}) == {"dead": 0.0}
    assert log_normalize({}) == {}
    with pytest.raises(ValueError):
        log_normalize({"a": float("nan"), "b": 1.0})


# ---------------------------------------------------------------- (b) the paper's Figure 2-3 claim on digits


def train_digits_mlp() -> tuple[nn.Sequential, torch.Tensor, torch.Tensor]:
    """64-64-64-32-10 ReLU MLP trained on sklearn's digits; returns it and the held-out split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    torch.manual_seed(0)
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split((x / 16.0).astype(np.float32), y, test_size=0.25, random_state=0, stratify=y)
    x_train, y_train = torch.from_numpy(x_train), torch.from_numpy(y_train)
    net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(30):
        order = torch.randperm(len(x_train))
        for i in range(0, len(order), 64):
            batch = order[i : i + 64]
            loss = nn.functional.cross_entropy(net(x_train[batch]), y_train[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval(), torch.from_numpy(x_test), torch.from_numpy(y_test)


def true_hessian_traces(forward: Forward, x: torch.Tensor, y: torch.Tensor, draws: int = 500) -> Dict[str, float]:
    """Mean over samples of Tr(d^2 CE / dz^2), by Rademacher Hutchinson with double backprop.

    The batch's summed loss has a block-diagonal Hessian in the batched z, so one trace over
    the batch is the sum of the per-sample traces.
    """
    generator = torch.Generator().manual_seed(1)
    outputs, tensors = forward({"x": x})
    loss = nn.functional.cross_entropy(outputs[0], y, reduction="sum")
    traces = {}
    for name, z in tensors.items():
        (grad,) = torch.autograd.grad(loss, z, create_graph=True)
        v = torch.randint(0, 2, (draws, *z.shape), generator=generator).float() * 2 - 1
        (hv,) = torch.autograd.grad(grad, z, grad_outputs=v, is_grads_batched=True, retain_graph=True)
        traces[name] = float((v * hv).sum()) / draws / len(x)
    return traces


def test_lfh_ranks_layers_like_the_true_hessian_on_digits() -> None:
    net, x_test, y_test = train_digits_mlp()
    accuracy = float((net(x_test).argmax(1) == y_test).float().mean())
    assert accuracy > 0.9

    forward = sequential_forward(net, list(range(len(net))))  # pre- and post-activation of every layer
    pick = torch.randperm(len(x_test), generator=torch.Generator().manual_seed(1))[:16]
    x, y = x_test[pick], y_test[pick]
    lfh = label_free_hessian(forward, [{"x": x[i : i + 1]} for i in range(16)], progress=False)
    true = true_hessian_traces(forward, x, y)

    names = list(true)
    rho = spearmanr([lfh.normalized[n] for n in names], [true[n] for n in names]).statistic
    print(f"accuracy {accuracy:.3f} draws {lfh.draws} spearman {rho:.3f} lfh {lfh.seconds:.2f}s")
    for n in names:
        print(f"  {n}: lfh {lfh.traces[n]:.3g} (normalized {lfh.normalized[n]:.3f})  true {true[n]:.3g}")
    assert rho >= 0.9
    for a, b in combinations(names, 2):  # clear-cut pairs keep their order
        if max(true[a], true[b]) > 3 * min(true[a], true[b]):
            assert (lfh.traces[a] > lfh.traces[b]) == (true[a] > true[b]), (a, b)
