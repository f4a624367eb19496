"""M2N2: a steady-state archive with niche fitness, attraction and split-point SLERP.

With default settings this is the reference algorithm of M2N2.md, operator by
operator: P = 20, alpha = 1, matchmaker on, split-point SLERP crossover,
Gaussian mutation sigma = 0.01 from scratch (none when merging given models),
one child per step, replace-the-worst update. Every departure is a switch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from m2n2_lightning.strategies import operators as ops
from m2n2_lightning.strategies.archive import Archive, initial_members, seed_vectors
from m2n2_lightning.strategies.base import ScoreCandidates, Strategy, check_non_negative, check_positive_int

#: The paper's mutation and initialisation scale when evolving from scratch.
PAPER_SIGMA = 0.01


class M2N2Strategy(Strategy):
    """Model Merging of Natural Niches over flat parameter vectors.

    Args:
        num_params: D, the length of the flat parameter vector.
        pop_size: archive size P (>= 2).
        alpha: competition exponent (>= 0); 0 turns competition off (a GA).
        use_matchmaker: pick the second parent by attraction (else by fitness).
        use_crossover: make children by split-point SLERP (else copy parent a).
        use_split_point: use a random split point (else one ratio everywhere).
        mutation_sigma: std of the Gaussian mutation; None = the paper's choice,
            0.01 from scratch and 0 when `init_models` are merged.
        init_sigma: std of the two random initial members from scratch.
        children_per_step: k, the default for `ask()`; k children come from one
            archive snapshot and are inserted one by one (k = 1 is the paper).
        init_models: modules or flat [D] tensors to start from (two or more).
        seed: seed of the strategy's generator.
        validate_scores: check told scores for NaN and range before any state
            changes (one fused reduction and one host sync per tell).

    `start(score)` scores the initial members (two random ones, or the given
    models) and inserts them by the update rule; they do not count as forward passes.
    """

    def __init__(
        self,
        num_params: int,
        pop_size: int = 20,
        alpha: float = 1.0,
        use_matchmaker: bool = True,
        use_crossover: bool = True,
        use_split_point: bool = True,
        mutation_sigma: float | None = None,
        init_sigma: float = PAPER_SIGMA,
        children_per_step: int = 1,
        init_models: Sequence[nn.Module | Tensor] | None = None,
        seed: int = 0,
        validate_scores: bool = True,
    ) -> None:
        super().__init__(num_params, seed=seed, validate_scores=validate_scores)
        self.pop_size = check_positive_int("pop_size", pop_size, 2)
        self.alpha = check_non_negative("alpha", alpha)
        self.children_per_step = check_positive_int("children_per_step (k)", children_per_step, 1)
        self.init_sigma = check_non_negative("init_sigma", init_sigma)
        if mutation_sigma is not None:
            mutation_sigma = check_non_negative("mutation_sigma", mutation_sigma)
        self.init_models = seed_vectors(init_models, self.num_params)
        self.use_matchmaker = bool(use_matchmaker)
        self.use_crossover = bool(use_crossover)
        self.use_split_point = bool(use_split_point)
        self.mutation_sigma = (
            mutation_sigma if mutation_sigma is not None else (0.0 if init_models else PAPER_SIGMA)
        )
        self.archive = Archive(self.pop_size, self.num_params)

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

    def fitness(self) -> tuple[Tensor, Tensor]:
        """Current niche fitness [P] and shares [P, N] of the archive."""
        return ops.niche_fitness(self.archive.scores, self.alpha)

    def population(self) -> tuple[Tensor, Tensor]:
        """Scores and niche fitness of the occupied members (a host sync: for logging)."""
        fitness, _ = self.fitness()
        occupied = self.archive.occupied
        return self.archive.scores[occupied], fitness[occupied]

    def _start(self, score: ScoreCandidates) -> None:
        members = initial_members(self.num_params, self.init_models, self.init_sigma, self.generator, self.archive.members)
        scores = score(members)
        self.check_scores(scores)
        self.num_resources = scores.shape[1]
        self.archive.allocate(self.num_resources)
        self._insert(members, scores)

    @torch.no_grad()
    def ask(self, k: int | None = None) -> Tensor:
        k = self.check_k(k)
        generator = self.generator
        # The temporaries need no autograd bookkeeping; the returned children are made outside.
        with torch.inference_mode():
            fitness, shares = self.fitness()
            first, second = ops.sample_parents(fitness, shares, self.archive.occupied, k, generator, self.use_matchmaker)
            if self.use_crossover:
                split, weight = ops.crossover_draws(
                    k, self.num_params, generator, self.use_split_point, self.archive.members
                )
                children = self.archive.children(first, second, split, weight)
            else:
                children = self.archive.rows(first)
        if self.mutation_sigma == 0:
            return children.clone()
        return ops.mutate(children, self.mutation_sigma, generator)

    @torch.no_grad()
    def _tell(self, candidates: Tensor, scores: Tensor) -> None:
        self._insert(candidates, scores)
        self.forward_passes += len(candidates)

    def _insert(self, candidates: Tensor, scores: Tensor) -> None:
        """Insert the rows one by one by the replace-the-worst rule (M2N2.md, "Archive update")."""
        candidates, scores = candidates.to(self.archive.members), scores.to(self.archive.scores)
        for child, child_scores in zip(candidates, scores):
            worst = ops.worst_after_insert(self.archive.scores, child_scores, self.alpha)
            self.archive.write(worst, child, child_scores)

    def best_index(self) -> Tensor:
        """Index (1-dim tensor of one) of the member with the highest mean score; first on ties."""
        if not self.started:
            raise RuntimeError("the archive is empty: call start(score) first")
        scores = self.archive.scores
        # sum / N is how torch computes the mean, in two cheaper kernels
        return scores.sum(dim=1).div_(scores.shape[1]).argmax().reshape(1)

    def best_params(self) -> Tensor:
        return self.archive.rows(self.best_index())[0]

    def settings(self) -> dict[str, Any]:
        return {
            **super().settings(),
            "pop_size": self.pop_size,
            "alpha": self.alpha,
            "use_matchmaker": self.use_matchmaker,
            "use_crossover": self.use_crossover,
            "use_split_point": self.use_split_point,
            "mutation_sigma": self.mutation_sigma,
            "init_sigma": self.init_sigma,
            "children_per_step": self.children_per_step,
            "seed_models": 0 if self.init_models is None else len(self.init_models),
        }

    def extra_repr(self) -> str:
        return (
            f"pop_size={self.pop_size}, alpha={self.alpha}, matchmaker={self.use_matchmaker}, "
            f"crossover={self.use_crossover}, split_point={self.use_split_point}, "
            f"mutation_sigma={self.mutation_sigma}, k={self.children_per_step}"
        )
