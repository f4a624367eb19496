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

from m2n2_lightning.params import flat_vector
from m2n2_lightning.strategies import operators as ops
from m2n2_lightning.strategies.base import Strategy

#: The paper's mutation and initialisation scale when evolving from scratch.
PAPER_SIGMA = 0.01


class M2N2Strategy(Strategy):
    """Model Merging of Natural Niches over flat parameter vectors.

    Args:
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
        num_params: D; may instead be given later through `setup(D)`.
        validate_scores: True: check told scores for NaN and range before any
            state changes (one fused reduction and one host sync per tell).
            "deferred": no sync: a candidate with bad scores is not inserted,
            and the ValueError is raised at the next `population()` (the
            logging step) or `check_scores()`. False: no check.

    Before the archive is initialised, `ask()` returns the initial members
    (two random ones, or the given models) whatever k is; they are told like
    any candidates and do not count as forward passes.
    """

    resizable_buffers = ("archive", "scores", "occupied")

    def __init__(
        self,
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
        num_params: int | None = None,
        validate_scores: bool | str = True,
    ) -> None:
        if validate_scores not in (True, False, "deferred"):
            raise ValueError(f"validate_scores must be True, False or 'deferred', got {validate_scores!r}")
        super().__init__(seed=seed, validate_scores=validate_scores is True)
        self.deferred_validation = validate_scores == "deferred"
        #: Deferred validation: count (a device tensor) of candidates with bad scores not yet reported.
        self._rejected: Tensor | None = None
        self.pop_size = self.check_positive_int("pop_size", pop_size, 2)
        self.alpha = self.check_non_negative("alpha", alpha)
        self.children_per_step = self.check_positive_int("children_per_step (k)", children_per_step, 1)
        self.init_sigma = self.check_non_negative("init_sigma", init_sigma)
        if mutation_sigma is not None:
            mutation_sigma = self.check_non_negative("mutation_sigma", mutation_sigma)
        if init_models is not None and len(init_models) < 2:
            raise ValueError(f"init_models must hold two or more models to merge, got {len(init_models)}")
        self.use_matchmaker = bool(use_matchmaker)
        self.use_crossover = bool(use_crossover)
        self.use_split_point = bool(use_split_point)
        self._init_models = list(init_models) if init_models is not None else None
        self.mutation_sigma = (
            mutation_sigma if mutation_sigma is not None else (0.0 if init_models else PAPER_SIGMA)
        )
        self._initialized = False
        self.register_buffer("archive", torch.zeros(self.pop_size, 0))
        self.register_buffer("scores", torch.zeros(self.pop_size, 0))
        self.register_buffer("occupied", torch.zeros(self.pop_size, dtype=torch.bool))
        if num_params is not None or init_models:
            self.setup(num_params if num_params is not None else flat_vector(self._init_models[0]).numel())

    def setup(self, num_params: int) -> None:
        """Fix D and allocate the [P, D] archive (a no-op when D is already set)."""
        if not self.claim_num_params(num_params):
            return
        for i, model in enumerate(self._init_models or []):
            count = flat_vector(model).numel()
            if count != num_params:
                raise ValueError(
                    f"init_models[{i}] has {count} parameters but the model being evolved "
                    f"has {num_params}; give models of the same architecture"
                )
        self.num_params = num_params
        self.archive = torch.zeros(self.pop_size, num_params, device=self.device, dtype=self.archive.dtype)

    @property
    def initialized(self) -> bool:
        return self._initialized

    def fitness(self) -> tuple[Tensor, Tensor]:
        """Current niche fitness [P] and shares [P, N] of the archive."""
        return ops.niche_fitness(self.scores, self.alpha)

    @property
    def candidates_per_step(self) -> int:
        return self.children_per_step

    def population(self) -> tuple[Tensor, Tensor]:
        """Scores and niche fitness of the occupied members (a host sync: for logging)."""
        self.check_scores()
        fitness, _ = self.fitness()
        return self.scores[self.occupied], fitness[self.occupied]

    @torch.no_grad()
    def ask(self, k: int | None = None) -> Tensor:
        dim = self.require_setup()
        if not self._initialized:
            return self._initial_members(dim)
        k = self.children_per_step if k is None else self.check_positive_int("k", k, 1)
        generator = self.generator
        # The temporaries need no autograd bookkeeping (about 10% of this method on the CPU);
        # the returned children are made outside, as ordinary tensors.
        with torch.inference_mode():
            fitness, shares = self.fitness()
            first, second = ops.sample_parents(fitness, shares, self.occupied, k, generator, self.use_matchmaker)
            children = self.archive.index_select(0, first)
            if self.use_crossover:
                children = ops.crossover(children, self.archive.index_select(0, second), generator, self.use_split_point)
        if self.mutation_sigma == 0:
            return children.clone()
        return ops.mutate(children, self.mutation_sigma, generator)

    def _initial_members(self, dim: int) -> Tensor:
        if self._init_models is not None:
            return torch.stack([flat_vector(m).to(self.archive) for m in self._init_models])
        noise = torch.randn(2, dim, generator=self.generator, device=self.device, dtype=self.archive.dtype)
        return noise * self.init_sigma

    def _as_archive_rows(self, candidates: Tensor, scores: Tensor) -> tuple[Tensor, Tensor]:
        """Told rows in the archive's dtype and device; the [P, N] scores are allocated on the first tell."""
        if self.num_resources is None:
            self.num_resources = scores.shape[1]
            self.scores = torch.zeros(self.pop_size, self.num_resources, device=self.device)
        return candidates.to(self.archive), scores.to(self.scores)

    @torch.no_grad()
    def _tell(self, candidates: Tensor, scores: Tensor) -> None:
        candidates, scores = self._as_archive_rows(candidates, scores)
        valid = [None] * len(scores)
        if self.deferred_validation:
            low, high = scores.aminmax(dim=1)
            ok = (low >= 0) & (high <= 1)  # False for NaN rows too
            rejected = (~ok).sum()
            self._rejected = rejected if self._rejected is None else self._rejected + rejected
            valid = ok.unbind()
        for child, child_scores, child_valid in zip(candidates, scores, valid):
            ops.replace_worst(self.archive, self.scores, self.occupied, child, child_scores, self.alpha, valid=child_valid)
        if self._initialized:
            self.forward_passes += len(candidates)
        self._initialized = True

    def best_index(self) -> Tensor:
        """Index (1-dim tensor of one) of the member with the highest mean score; first on ties."""
        if not self._initialized:
            raise RuntimeError("the archive is empty: tell() the initial members first")
        # sum / N is how torch computes the mean, in two cheaper kernels
        return self.scores.sum(dim=1).div_(self.scores.shape[1]).argmax().reshape(1)

    def best_params(self) -> Tensor:
        return self.archive.index_select(0, self.best_index())[0]

    def check_scores(self) -> None:
        """With deferred validation: raise the ValueError for bad scores told since the last check (one host sync)."""
        if self._rejected is None:
            return
        count, self._rejected = int(self._rejected), None
        if count:
            raise ValueError(
                f"{count} candidates were told scores that are NaN or outside [0, 1] and were not inserted; "
                "check the model and the score function (validate_scores=True raises at the tell itself)"
            )

    def extra_state(self) -> dict[str, Any]:
        return {"initialized": self._initialized}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self._initialized = state["initialized"]

    def extra_repr(self) -> str:
        return (
            f"pop_size={self.pop_size}, alpha={self.alpha}, matchmaker={self.use_matchmaker}, "
            f"crossover={self.use_crossover}, split_point={self.use_split_point}, "
            f"mutation_sigma={self.mutation_sigma}, k={self.children_per_step}"
        )
