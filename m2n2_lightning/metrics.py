"""Niche occupancy and population metrics, computed from per-example scores.

An example counts as solved by a member when its score is at least 0.5 (for
the paper's correctness scores: answered correctly).
"""

from __future__ import annotations

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


def save_heatmap(matrix: Tensor, path: str | Path, title: str = "member x class accuracy"):
    """Save a [P, C] matrix as a PNG heatmap; returns the matplotlib figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = matrix.detach().float().cpu().numpy()
    fig, ax = plt.subplots(figsize=(1 + 0.5 * values.shape[1], 1 + 0.3 * values.shape[0]))
    image = ax.imshow(values, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_xlabel("class")
    ax.set_ylabel("member (best first)")
    ax.set_xticks(range(values.shape[1]))
    ax.set_yticks(range(0, values.shape[0], max(1, values.shape[0] // 20)))
    ax.set_title(title)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return fig
