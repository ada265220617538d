"""PNG plots of a run (matplotlib, no display needed)."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .report import Report  # noqa: E402


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


def write_plots(report: Report, folder: Path) -> List[Path]:
    """Every plot this run has data for; returns the files written."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    if report.hessian:
        plot_lfh(report.hessian, folder / "lfh.png")
        written.append(folder / "lfh.png")
    if report.optimization:
        plot_loss(report.optimization, folder / "loss.png")
        written.append(folder / "loss.png")
    return written
