"""Per-example scores s_ij in [0, 1]: how well candidate i does on example j.

A score function maps the population's outputs (leading dimension k: logits
[k, N, C], or a dict / `ModelOutput` holding "logits") and the resources batch
(`(inputs, targets)`, or a dict holding "labels") to scores [k, N]. The paper's
score is correctness (1 if the argmax of the logits is the label);
`true_class_probability` is a smooth alternative. Any callable with the same
signature can be given instead.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

#: (outputs with a leading candidate dimension, resources batch) -> scores [k, N] in [0, 1].
ScoreFn = Callable[[Any, Any], Tensor]


def logits_of(outputs: Any) -> Tensor:
    """The logits in a model's outputs: the tensor itself, or its "logits" entry / attribute."""
    if isinstance(outputs, Tensor):
        return outputs
    if isinstance(outputs, Mapping) and "logits" in outputs:
        return outputs["logits"]
    if hasattr(outputs, "logits"):
        return outputs.logits
    raise TypeError(
        f"cannot find logits in outputs of type {type(outputs).__name__}: return a Tensor, or a dict / "
        "dataclass with a 'logits' entry, or pass a score_fn(outputs, batch) that reads them"
    )


def targets_of(batch: Any) -> Tensor:
    """The labels of a resources batch: `batch[1]` of a tuple, or its "labels" / "label" / "target(s)" entry."""
    if isinstance(batch, Mapping):
        for key in ("labels", "label", "targets", "target", "y"):
            if key in batch:
                return batch[key]
        raise TypeError(
            f"a dict batch needs a 'labels' entry for the built-in scores (it has {sorted(batch)}); "
            "or pass a score_fn(outputs, batch) that reads the targets"
        )
    return batch[1]


def correctness(outputs: Any, batch: Any) -> Tensor:
    """1.0 where argmax(logits) == target, else 0.0 (the paper's score).

    Logits that are not all finite (NaN or infinite, e.g. a diverged candidate)
    are wrong on that example: such a candidate solves nothing there, rather
    than the argmax of NaN picking a class. `max(...).values` gives that check
    at no extra pass: it is finite exactly when all logits are (NaN propagates
    into the max, and an infinite max is refused too), apart from -inf entries
    below a finite maximum, which cannot make a wrong class win.
    """
    top = logits_of(outputs).max(dim=-1)
    return ((top.indices == targets_of(batch)) & top.values.isfinite()).to(torch.float32)


def true_class_probability(outputs: Any, batch: Any) -> Tensor:
    """Softmax probability given to the correct class."""
    probs = torch.softmax(logits_of(outputs).float(), dim=-1)
    index = targets_of(batch).expand(probs.shape[:-1]).unsqueeze(-1)
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
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown score function {score_fn!r}; use one of {sorted(SCORE_FUNCTIONS)} or a callable "
            "(outputs [k, N, ...], batch (inputs, targets)) -> scores [k, N] in [0, 1]"
        ) from None
