"""Score [k, D] candidates on resources that stay resident on the device."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from m2n2_lightning.params import FlatParams, population_forward
from m2n2_lightning.scoring import ScoreFn, get_score_fn

#: Scoring dtypes other than the model's own.
LOW_PRECISION = (torch.bfloat16, torch.float16)


class Evaluator:
    """Scores candidates on a fixed set of examples (the M2N2 resources).

    The inputs and targets are moved to the model's device once, here, and
    never again. Candidates are processed `chunk_size` at a time (all at once
    when None) to bound the memory of the [k, N, ...] activations.

    `dtype=torch.bfloat16` (or float16; what the Trainer's `precision` sets):
    candidates and inputs are cast to it and the forward runs in it (under
    `torch.autocast` for modules whose buffers stay float32). The scores, hence
    the archive, are then those of the rounded network.
    """

    def __init__(
        self,
        model: nn.Module,
        inputs: Tensor,
        targets: Any,
        score_fn: str | ScoreFn = "correctness",
        chunk_size: int | None = None,
        flat: FlatParams | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be an integer >= 1 or None, got {chunk_size!r}")
        if len(inputs) != len(targets):
            raise ValueError(f"{len(inputs)} inputs but {len(targets)} targets")
        if dtype is not None and dtype not in LOW_PRECISION:
            raise ValueError(f"dtype must be None, torch.bfloat16 or torch.float16, got {dtype!r}")
        self.model = model
        self.flat = flat or FlatParams(model)
        device = next(model.parameters()).device
        self.dtype = dtype
        self.inputs = inputs.to(device)
        if dtype is not None and self.inputs.is_floating_point():
            self.inputs = self.inputs.to(dtype)
        self.targets = targets.to(device)
        self.score_fn = get_score_fn(score_fn)
        self.chunk_size = chunk_size

    @property
    def num_resources(self) -> int:
        return len(self.targets)

    @torch.no_grad()
    def __call__(self, candidates: Tensor) -> Tensor:
        """Scores [k, N] of each candidate on each resource."""
        chunks = [candidates] if self.chunk_size is None else candidates.split(self.chunk_size)
        scores = []
        for chunk in chunks:
            if self.dtype is None:
                outputs = population_forward(self.model, self.flat, chunk, self.inputs)
            else:
                with torch.autocast(self.inputs.device.type, dtype=self.dtype):
                    outputs = population_forward(self.model, self.flat, chunk.to(self.dtype), self.inputs)
            scores.append(self.score_fn(outputs, (self.inputs, self.targets)))
        return scores[0] if len(scores) == 1 else torch.cat(scores)
