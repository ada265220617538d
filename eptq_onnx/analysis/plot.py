"""PNG of the analysis: the error along the graph, the worst points marked (matplotlib, no display needed)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import List

from eptq_onnx.analysis.result import AnalysisResult
from eptq_onnx.plots import _short, plt

MARKED = 5  # worst points marked on the plot
FINITE_CAP_DB = 100.0  # an exact tensor (inf dB) is drawn here


def plot_errors(result: AnalysisResult, path: Path, marked: int = MARKED) -> None:
    """Float-vs-quantized SQNR of every tensor in topological order; quantization points as dots and
    the ``marked`` costliest points as red lines at the tensor where they sit."""
    tensors = result.tensors
    x = [t.index for t in tensors]
    y = [min(t.sqnr_db, FINITE_CAP_DB) if not math.isnan(t.sqnr_db) else float("nan") for t in tensors]
    fig, ax = plt.subplots(figsize=(max(8.0, min(24.0, 0.02 * len(x))), 4.5))
    ax.plot(x, y, "-", color="tab:blue", linewidth=0.8, label="tensor SQNR (float vs quantized)")
    points = [(t.index, yi) for t, yi in zip(tensors, y) if t.point is not None]
    if points:
        ax.plot([p[0] for p in points], [p[1] for p in points], ".", color="tab:green", markersize=4,
                label="activation quantization point")
    where = {t.tensor: t.index for t in tensors}
    for p in result.points[:marked]:
        if p.tensor in where:
            ax.axvline(where[p.tensor], color="tab:red", linewidth=0.8, alpha=0.7)
            ax.annotate(f"#{p.rank} {_short(p.point, 24)} ({p.gain_db:+.1f} dB)", (where[p.tensor], ax.get_ylim()[1]),
                        rotation=90, fontsize=7, color="tab:red", va="top", ha="right")
    ax.set_xlabel("tensor (topological order)")
    ax.set_ylabel("SQNR dB")
    ax.set_title(f"error along the graph: {result.input} (output {result.quantized_worst_db:.1f} dB; red: costliest points)")
    ax.legend(loc="lower left", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_analysis_plots(result: AnalysisResult, folder: Path) -> List[Path]:
    """The analysis plot in ``folder`` (created); returns the files written."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "analysis.png"
    plot_errors(result, path)
    return [path]
