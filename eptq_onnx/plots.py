"""PNG plots of a run (matplotlib, no display needed)."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from eptq_onnx.report import Report  # noqa: E402


def _short(name: str, width: int = 28) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1):]


def plot_lfh(hessian: Dict, path: Path) -> None:
    """Bar chart of the log-normalized Label-Free Hessian per tensor, in graph order."""
    names: List[str] = list(hessian["normalized"])
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(names)), 4.0))
    ax.bar(range(len(names)), [hessian["normalized"][n] for n in names], color="tab:blue")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([_short(n) for n in names], rotation=90, fontsize=7)
    ax.set_ylabel("normalized LFH (log scale mapped to [0, 1])")
    ax.set_title("Label-Free Hessian per quantization point (graph order)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_loss(optimization: Dict, path: Path) -> None:
    """Reconstruction and regularizer terms of the EPTQ loss over the steps."""
    steps = [c[0] for c in optimization["curve"]]
    fig, ax = plt.subplots(figsize=(7.0, 4.0))
    ax.plot(steps, [c[1] for c in optimization["curve"]], label="reconstruction (weighted, Eq. 6)")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("reconstruction loss")
    twin = ax.twinx()
    twin.plot(steps, [c[2] for c in optimization["curve"]], color="tab:orange", label="rounding regularizer")
    twin.set_ylabel("regularizer")
    ax.set_title("EPTQ optimization")
    fig.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_bits(mixed: Dict, path: Path) -> None:
    """Bar chart of the chosen bits per weight (graph order) over the LFH of each layer's output."""
    layers = mixed["layers"]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.4 * len(layers)), 4.5))
    x = range(len(layers))
    ax.bar(x, [layer["bits"] for layer in layers], color="tab:green", label="bits")
    ax.set_yticks(sorted(set(mixed["bit_options"])))
    ax.set_ylabel("weight bits")
    ax.set_xticks(list(x))
    ax.set_xticklabels([_short(layer["weight"]) for layer in layers], rotation=90, fontsize=7)
    lfh = [layer["lfh"] for layer in layers]
    if any(v is not None for v in lfh):
        other = ax.twinx()
        other.plot(list(x), [float("nan") if v is None else v for v in lfh], "o-", color="tab:blue", label="LFH")
        other.set_ylim(-0.05, 1.05)
        other.set_ylabel("normalized LFH of the layer's output")
    ax.set_title(f"bits per layer (bars) and LFH (dots): {mixed['memory_bytes']:.0f} of {mixed['budget_bytes']:.0f} bytes")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_plots(report: Report, folder: Path) -> List[Path]:
    """Every plot this run has data for; returns the files written."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    if report.hessian:
        plot_lfh(report.hessian, folder / "lfh.png")
        written.append(folder / "lfh.png")
    if report.mixed_precision:
        plot_bits(report.mixed_precision, folder / "bits.png")
        written.append(folder / "bits.png")
    if report.optimization:
        plot_loss(report.optimization, folder / "loss.png")
        written.append(folder / "loss.png")
    return written
