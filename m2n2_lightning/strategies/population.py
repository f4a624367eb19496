"""What M2N2 and MAP-Elites share: an archive of members, started from random members or seed models.

`PopulationStrategy` holds the settings both take (children per step, the
initial and mutation scales, the seed models), the archive's views, the start
(score the initial members and insert them by the subclass's rule), the tell
and the best member (the highest mean training score, first on ties).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from m2n2_lightning.strategies.archive import seed_vectors
from m2n2_lightning.strategies.base import (
    ScoreCandidates,
    Strategy,
)
from m2n2_lightning.checks import check_non_negative, check_positive_int
from m2n2_lightning.strategies.children import Children
from m2n2_lightning.strategies.mixture import Form

#: The paper's mutation and initialisation scale when evolving from scratch.
PAPER_SIGMA = 0.01


def archive_dtype(dtype: torch.dtype | str | None, seeds: Sequence[Tensor] | None) -> torch.dtype:
    """The members' dtype: the one asked for ("bfloat16" or torch.bfloat16), else the seeds', else float32."""
    if dtype is None:
        return getattr(seeds, "dtype", None) or seeds[0].dtype if seeds is not None else torch.float32
    resolved = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch dtype such as 'float32' or 'bfloat16', got {dtype!r}")
    return resolved


class PopulationStrategy(Strategy):
    """An archive strategy: subclasses set `self.archive` and implement `ask` and `_insert`."""

    def __init__(
        self,
        num_params: int,
        mutation_sigma: float | None = None,
        init_sigma: float = PAPER_SIGMA,
        children_per_step: int = 1,
        init_models: Sequence[nn.Module | Tensor] | None = None,
        dtype: torch.dtype | str | None = None,
        seed: int = 0,
        validate_scores: bool = True,
    ) -> None:
        super().__init__(num_params, seed=seed, validate_scores=validate_scores)
        self.children_per_step = check_positive_int("children_per_step (k)", children_per_step, 1)
        self.init_sigma = check_non_negative("init_sigma", init_sigma)
        if mutation_sigma is not None:
            mutation_sigma = check_non_negative("mutation_sigma", mutation_sigma)
        self.init_models = seed_vectors(init_models, self.num_params)
        self.dtype = archive_dtype(dtype, self.init_models)
        # The paper: sigma = 0.01 from scratch, no mutation when merging given models.
        self.mutation_sigma = mutation_sigma if mutation_sigma is not None else (0.0 if self.init_models is not None else PAPER_SIGMA)

    # Views of the archive's storage, for metrics and tests.
    @property
    def scores(self) -> Tensor:
        return self.archive.scores

    @property
    def occupied(self) -> Tensor:
        return self.archive.occupied

    @property
    def candidates_per_step(self) -> int:
        return self.children_per_step

    def _start(self, score: ScoreCandidates) -> None:
        members = self.archive.initial_children(self.init_models, self.init_sigma, self.generator)
        scores = score(members)
        if not isinstance(scores, Tensor) or scores.dim() != 2 or scores.shape[0] != len(members):
            shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
            raise ValueError(f"start: scores must have shape [k={len(members)}, N] for the initial members, got {shape}")
        self.check_scores(scores)
        self.num_resources = scores.shape[1]
        self.archive.allocate(self.num_resources)
        self._insert(members, scores)

    @torch.no_grad()
    def _tell(self, children: Children, scores: Tensor) -> None:
        self._insert(children, scores)

    def _insert(self, children: Children, scores: Tensor) -> None:
        raise NotImplementedError

    def best_index(self) -> Tensor:
        """Index (1-dim tensor of one) of the member with the highest mean score; first on ties."""
        if not self.started:
            raise RuntimeError("the archive is empty: call start(score) first")
        scores = self.archive.scores
        # sum / N is how torch computes the mean, in two cheaper kernels
        return scores.sum(dim=1).div_(scores.shape[1]).argmax().reshape(1)

    def best_params(self) -> Tensor:
        return self.archive.rows(self.best_index())[0]

    def best_children(self) -> Children:
        """The best member as a child of the archive's own kind (a form over the seeds: written, not copied)."""
        return self.archive.member_children(self.best_index())

    def best_token(self) -> tuple[int, int] | None:
        """(slot, how often it was written) of the best member, where reading the slot costs no device sync."""
        if not self.archive.host_side:
            return None
        slot = int(self.best_index())
        return slot, self.archive.versions[slot]

    def best_form(self) -> Form | None:
        """The best member's form over the seeds (a merge's recipe), where the archive keeps forms."""
        forms = getattr(self.archive, "forms", None)
        return None if forms is None else forms[int(self.best_index())]

    def settings(self) -> dict[str, Any]:
        return {
            **super().settings(),
            "mutation_sigma": self.mutation_sigma,
            "init_sigma": self.init_sigma,
            "children_per_step": self.children_per_step,
            "seed_models": 0 if self.init_models is None else len(self.init_models),
            "dtype": str(self.dtype).removeprefix("torch."),
        }
