"""Per-example scores s_ij in [0, 1]: how well candidate i does on example j.

A score function maps logits [k, N, C] and labels [N] to scores [k, N]. The
paper's score is correctness (1 if the argmax of the logits is the label);
`true_class_probability` is a smooth alternative. Any callable with the same
signature can be given instead.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

ScoreFn = Callable[[Tensor, Tensor], Tensor]


def correctness(logits: Tensor, targets: Tensor) -> Tensor:
    """1.0 where argmax(logits) == target, else 0.0 (the paper's score).

    `max(...).indices` is argmax (the first maximum; NaN counts as the maximum)
    at half argmax's cost on the CPU, where this is a tenth of a digits step.
    """
    return (logits.max(dim=-1).indices == targets).to(torch.float32)


def true_class_probability(logits: Tensor, targets: Tensor) -> Tensor:
    """Softmax probability given to the correct class."""
    probs = torch.softmax(logits.float(), dim=-1)
    index = targets.expand(probs.shape[:-1]).unsqueeze(-1)
    return probs.gather(-1, index).squeeze(-1)


SCORE_FUNCTIONS: dict[str, ScoreFn] = {
    "correctness": correctness,
    "true_class_probability": true_class_probability,
}


def get_score_fn(score_fn: str | ScoreFn) -> ScoreFn:
    """Resolve a score function given by name or as a callable."""
    if callable(score_fn):
        return score_fn
    try:
        return SCORE_FUNCTIONS[score_fn]
    except KeyError:
        raise ValueError(
            f"unknown score function {score_fn!r}; use one of {sorted(SCORE_FUNCTIONS)} or a callable "
            "(logits [k, N, C], targets [N]) -> scores [k, N] in [0, 1]"
        ) from None
