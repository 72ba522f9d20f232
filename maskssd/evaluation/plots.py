"""Plots of an evaluation as PNG files (MLflow artifacts): PR curves per class, the confusion matrix."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from maskssd.evaluation.metrics import EvalResult
from maskssd.evaluation.voc import APResult

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["plot_confusion_matrix", "plot_pr_curves"]


def _new_figure(figsize: tuple[float, float]) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=100)
    FigureCanvasAgg(fig)  # Agg canvas, no pyplot global state (safe in servers and threads)
    return fig


def plot_pr_curves(result: EvalResult | APResult, path: str | Path) -> Path:
    """Save one precision-recall curve per class, AP in the legend, as a PNG; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = _new_figure((6.0, 5.0))
    ax = fig.add_subplot(1, 1, 1)
    for name, prec in result.precision.items():
        rec = result.recall[name]
        ap = result.ap.get(name, math.nan)
        ax.plot(rec.tolist(), prec.tolist(), label=f"{name} (AP {ap:.3f})", drawstyle="steps-post")
    title = "Precision-recall"
    if not math.isnan(result.map):
        title += f" (mAP {result.map:.3f})"
    ax.set(xlabel="recall", ylabel="precision", xlim=(0.0, 1.0), ylim=(0.0, 1.05), title=title)
    ax.grid(True, alpha=0.3)
    if result.precision:
        ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def plot_confusion_matrix(confusion: Tensor, class_names: Sequence[str], path: str | Path) -> Path:
    """Save the confusion matrix (rows true, columns predicted, index 0 background) with counts as a PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    counts = torch.as_tensor(confusion).detach().cpu().long()
    labels = ["background", *class_names]
    if counts.shape != (len(labels), len(labels)):
        raise ValueError(f"confusion has shape {tuple(counts.shape)}, expected {(len(labels), len(labels))}")
    n = len(labels)
    fig = _new_figure((1.6 + 1.1 * n, 1.2 + 1.0 * n))
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(counts.numpy(), cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    threshold = counts.max().item() / 2 if counts.numel() else 0
    for i in range(n):
        for j in range(n):
            value = int(counts[i, j])
            ax.text(
                j, i, str(value), ha="center", va="center", color="white" if value > threshold else "black"
            )
    ax.set_xticks(range(n), labels, rotation=30, ha="right")
    ax.set_yticks(range(n), labels)
    ax.set(xlabel="predicted", ylabel="true", title="Confusion matrix")
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path
