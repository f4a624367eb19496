"""Niche occupancy and population metrics, computed from per-example scores.

An example counts as solved by a member when its score is at least 0.5 (for
the paper's correctness scores: answered correctly).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

SOLVED = 0.5


def niche_occupancy(scores: Tensor, fitness: Tensor) -> dict[str, Tensor]:
    """Coverage, sole solvers and share entropy of a population.

    scores: [P, N] of the occupied members; fitness: [P], non-negative.
    - coverage: fraction of examples solved by at least one member;
    - sole_solvers: members that alone solve at least one example;
    - fitness_entropy: entropy (nats) of the fitness shares fit_i / sum fit,
      log(P) when all members are equally fit, 0 when one holds everything.
    """
    solved = scores >= SOLVED
    solvers = solved.sum(dim=0)
    sole = (solved & (solvers == 1)).any(dim=1)
    total = fitness.sum()
    share = fitness / total.clamp_min(torch.finfo(fitness.dtype).tiny)
    entropy = -(share * share.clamp_min(1e-30).log()).sum()
    return {
        "coverage": (solvers > 0).float().mean(),
        "sole_solvers": sole.sum().float(),
        "fitness_entropy": entropy,
    }


def class_accuracy(scores: Tensor, targets: Tensor, num_classes: int) -> Tensor:
    """Member-by-class mean score [P, C] (accuracy per class for correctness scores)."""
    onehot = torch.nn.functional.one_hot(targets.long(), num_classes).to(scores.dtype)
    counts = onehot.sum(dim=0).clamp_min(1)
    return scores @ onehot / counts


def save_heatmap(matrix: Tensor, path: str | Path, title: str = "error rate per class on the training resources"):
    """Save a [P, C] member-by-class accuracy matrix as a PNG heatmap of the error rate (1 - accuracy) on a
    logarithmic colour scale over the errors present (at least a decade, within 0.1%-100%), so that members
    near the top (95% vs 99%) stay apart and a low-accuracy run is not all dark; each cell is annotated with
    its accuracy, in white on dark cells. Returns the matplotlib figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import LogNorm

    values = matrix.detach().float().cpu().numpy()
    errors = (1.0 - values).clip(1e-3, 1.0)
    fig, ax = plt.subplots(figsize=(1.5 + 0.6 * values.shape[1], 1.2 + 0.32 * values.shape[0]))
    low = min(float(errors.min()), 0.1)
    norm = LogNorm(vmin=low, vmax=max(float(errors.max()), 10 * low))
    image = ax.imshow(errors, norm=norm, cmap="magma_r", aspect="auto")
    if values.size <= 400:
        for (row, column), value in np.ndenumerate(values):
            ax.text(column, row, f"{100 * value:.0f}", ha="center", va="center", fontsize=8 if values.size <= 200 else 6,
                    color="white" if norm(errors[row, column]) > 0.55 else "black")
    ax.set_xlabel("class")
    ax.set_ylabel("member (best first)")
    ax.set_xticks(range(values.shape[1]))
    ax.set_yticks(range(0, values.shape[0], max(1, values.shape[0] // 20)))
    ax.set_title(title + " (numbers: accuracy %)", fontsize=9)
    fig.colorbar(image, ax=ax, label="error rate (log scale)")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return fig


#: The curves of the accuracy plot, and their legends.
CURVES = {"train/best_score": "best member, training accuracy", "val/acc": "best member, validation accuracy"}


def save_accuracy_plot(
    series: Mapping[str, Sequence[Sequence[float]]], path: str | Path, test_acc: float | None = None, title: str = ""
) -> Path | None:
    """Plot (forward passes, accuracy) points of `CURVES` and the final test accuracy, with a title; None when
    there is no training point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not series.get("train/best_score"):
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in CURVES.items():
        if series.get(key):
            ax.plot(*zip(*series[key]), label=label, marker="." if key == "val/acc" else None)
    if test_acc is not None:
        end = series["train/best_score"][-1][0]
        ax.scatter([end], [test_acc], color="black", zorder=3, label=f"test accuracy at the end: {test_acc:.4f}")
    ax.set_title("Accuracy of the best member against forward passes" + (f"\n{title}" if title else ""), fontsize=10)
    ax.set_xlabel("forward passes")
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
