"""Score [k, D] candidates on resources that stay resident on the device."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from m2n2_lightning.params import FlatParams, population_forward
from m2n2_lightning.scoring import ScoreFn, get_score_fn


class Evaluator:
    """Scores candidates on a fixed set of examples (the M2N2 resources).

    The inputs and targets are moved to the model's device once, here, and
    never again. Candidates are processed `chunk_size` at a time (all at once
    when None) to bound the memory of the [k, N, ...] activations.
    """

    def __init__(
        self,
        model: nn.Module,
        inputs: Tensor,
        targets: Tensor,
        score_fn: str | ScoreFn = "correctness",
        chunk_size: int | None = None,
        flat: FlatParams | None = None,
    ) -> None:
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
        if len(inputs) != len(targets):
            raise ValueError(f"{len(inputs)} inputs but {len(targets)} targets")
        self.model = model
        self.flat = flat or FlatParams(model)
        device = next(model.parameters()).device
        self.inputs = inputs.to(device)
        self.targets = targets.to(device)
        self.score_fn = get_score_fn(score_fn)
        self.chunk_size = chunk_size

    @property
    def num_resources(self) -> int:
        return len(self.targets)

    @torch.no_grad()
    def logits(self, candidates: Tensor, inputs: Tensor | None = None) -> Tensor:
        """Model outputs [k, N, ...] of each candidate on `inputs` (default: the resources)."""
        inputs = self.inputs if inputs is None else inputs
        return population_forward(self.model, self.flat, candidates, inputs)

    @torch.no_grad()
    def __call__(self, candidates: Tensor) -> Tensor:
        """Scores [k, N] of each candidate on each resource."""
        step = self.chunk_size or len(candidates)
        parts = [
            self.score_fn(self.logits(chunk), self.targets)
            for chunk in candidates.split(step)
        ]
        return parts[0] if len(parts) == 1 else torch.cat(parts)
