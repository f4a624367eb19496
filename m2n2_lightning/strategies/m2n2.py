"""M2N2: a steady-state archive with niche fitness, attraction and split-point SLERP.

With default settings this is the reference algorithm of docs/ALGORITHM.md, operator by
operator: P = 20, alpha = 1, matchmaker on, split-point SLERP crossover,
Gaussian mutation sigma = 0.01 from scratch (none when merging given models),
one child per step, replace-the-worst update. Every departure is a switch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from m2n2_lightning.strategies import operators as ops
from m2n2_lightning.strategies.archive import (
    build_archive,
)
from m2n2_lightning.checks import check_non_negative, check_positive_int
from m2n2_lightning.strategies.children import Children
from m2n2_lightning.strategies.chromosomes import Chromosomes, check_slerp_angle
from m2n2_lightning.strategies.population import PopulationStrategy

#: Per-example capacities of the general fitness (eq. 5): c_j = 1, or c_j = max_i s_ij.
CAPACITIES = ("unit", "max")


def occupied_row(occupied: Tensor) -> Tensor:
    """[1] True: the newcomer's row in the occupancy of archive + child."""
    return occupied.new_ones(1)


def uniform_pairs(occupied: Tensor, num_pairs: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Parent pairs for the warm-up: a uniform among occupied slots, b uniform among the others
    (a itself where a is the only one)."""
    uniforms = torch.rand(num_pairs, 2, generator=generator, device=occupied.device)
    weights = occupied.to(uniforms.dtype)
    first = ops.sample_categorical(weights, uniforms[:, 0])
    others = weights.expand(num_pairs, -1).scatter(1, first.unsqueeze(1), 0.0)
    others = torch.where(others.sum(dim=1, keepdim=True) > 0, others, weights.expand_as(others))
    return first, ops.sample_categorical(others, uniforms[:, 1])


class M2N2Strategy(PopulationStrategy):
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
        validate_scores: (this and the five above are `PopulationStrategy`'s, by keyword) check told scores for NaN and range before any state
            changes (one fused reduction and one host sync per tell).
        capacity: the per-example capacity c_j of the paper's general fitness
            (eq. 5): "unit" (c_j = 1, the reference, for right/wrong scores) or
            "max" (c_j = max_i s_ij, for continuous scores), the maximum taken
            over the rows being compared: the archive when parents are chosen,
            the archive plus the child when the worst row is dropped. It
            weights the fitness, the attraction and the update alike.
        score_shift: subtract from each example's scores the lowest score the
            occupied rows have on it before the fitness (section 4.3), over the
            same rows as `capacity`; empty slots are then filled before any
            member is dropped.
        warmup_steps: the first this many children (forward passes) come from
            parent pairs drawn uniformly among the occupied members, two distinct
            ones where there are two, by split-point SLERP without mutation
            (section 4.2: the seeds merge at random among themselves); they
            count towards the budget.
        chromosomes: name patterns (fnmatch, e.g. ["*attn*"]) of parameter
            groups that each get their own split point and ratio; the
            parameters no pattern matches form one more group. Needs `layout`
            (the entry points pass it). None: one group (the reference).
        layout: (name, numel) of the parameters in vector order
            (`FlatParams.layout`), to resolve `chromosomes`.
        slerp_angle: "whole" (one angle between the whole parents, the
            reference code) or "per_part" (one per sub-array, equation 2).
        storage: where the members live (`archive.build_archive`): "dense"
            ([P, D] buffers), "host" or "mmap" (dense, in host memory or a
            memory-mapped file under `storage_dir`, for archives larger than the
            device), or "coefficients" (mixtures of `init_models`: the seeds
            once and kilobytes per member; refused with mutation).
        storage_dir: the directory of the "mmap" file (None: the temporary one).
        host_seeds: with "coefficients", keep the seeds in host memory when the
            strategy moves to an accelerator: the device then holds only the
            module each child is written into (tensor by tensor, over the bus).
        task_vectors: the last of `init_models` is the base the others were
            fine-tuned from (not a member): crossover SLERPs the parents' task
            vectors, member - base, and adds the base back (task arithmetic's
            space, where SLERP of two near-orthogonal task vectors keeps most
            of each rather than averaging them away). Needs "coefficients".
        dtype: the members' and children's dtype (None: the seeds' own, e.g.
            bfloat16 for bf16 checkpoints, else float32); the SLERP angles are
            computed in float64 whatever it is.

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
        capacity: str = "unit",
        score_shift: bool = False,
        warmup_steps: int = 0,
        chromosomes: Sequence[str] | None = None,
        layout: Sequence[tuple[str, int]] | None = None,
        slerp_angle: str = "whole",
        storage: str = "dense",
        storage_dir: str | None = None,
        host_seeds: bool = False,
        task_vectors: bool = False,
        **population: Any,
    ) -> None:
        super().__init__(num_params, **population)
        if capacity not in CAPACITIES:
            raise ValueError(f"capacity must be one of {CAPACITIES}, got {capacity!r}")
        self.capacity = capacity
        self.score_shift = bool(score_shift)
        self.warmup_steps = check_positive_int("warmup_steps", warmup_steps, 0)
        self.slerp_angle = check_slerp_angle(slerp_angle)
        self.chromosome_patterns = None if chromosomes is None else list(chromosomes)
        if chromosomes is None:
            self.chromosomes = Chromosomes.whole(num_params)
        elif layout is None:
            raise ValueError(
                "chromosomes are parameter name patterns, which need the parameter layout: build the strategy "
                "through M2N2Callback / EvolutionModule / train.py, or pass layout=FlatParams(model).layout"
            )
        else:
            self.chromosomes = Chromosomes.from_patterns(layout, chromosomes)
            if sum(self.chromosomes.sizes) != num_params:
                raise ValueError(f"the layout covers {sum(self.chromosomes.sizes)} parameters, not D = {num_params}")
        self.pop_size = check_positive_int("pop_size", pop_size, 2)
        self.alpha = check_non_negative("alpha", alpha)
        self.use_matchmaker = bool(use_matchmaker)
        self.use_crossover = bool(use_crossover)
        self.use_split_point = bool(use_split_point)
        self.storage = storage
        self.archive = build_archive(
            storage, self.pop_size, self.num_params, self.init_models, self.mutation_sigma, storage_dir, self.dtype,
            host_seeds, task_vectors,
        )
        self.task_vectors = bool(task_vectors)

    @property
    def exact_default(self) -> bool:
        """Whether the fitness is the reference's (unit capacity, no shift), with its faster update."""
        return self.capacity == "unit" and not self.score_shift

    def fitness(self) -> tuple[Tensor, Tensor]:
        """Current niche fitness [P] and shares [P, N] of the archive."""
        return self._niche(self.archive.scores, self.archive.occupied)

    def _niche(self, scores: Tensor, occupied: Tensor) -> tuple[Tensor, Tensor]:
        """The general fitness (eq. 5) of rows `scores`: shifted, then weighted by their capacity."""
        if self.score_shift:
            scores = ops.shift_scores(scores, occupied)
        capacity = scores.amax(dim=0) if self.capacity == "max" else None
        return ops.niche_fitness(scores, self.alpha, capacity)

    def _dropped_row(self, child_scores: Tensor) -> Tensor:
        """The row replace-the-worst drops when the child joins (P: the child itself)."""
        if self.exact_default:
            return ops.worst_after_insert(self.archive.scores, child_scores, self.alpha)
        scores = torch.cat([self.archive.scores, child_scores.unsqueeze(0)])
        occupied = torch.cat([self.archive.occupied, occupied_row(self.archive.occupied)])
        fitness, _ = self._niche(scores, occupied)
        if self.score_shift:  # empty slots first: a shifted member can have fitness 0 too
            fitness = torch.where(occupied, fitness, -1.0)
        return fitness.argmin()

    def population(self) -> tuple[Tensor, Tensor]:
        """Scores and niche fitness of the occupied members (a host sync: for logging)."""
        fitness, _ = self.fitness()
        occupied = self.archive.occupied
        return self.archive.scores[occupied], fitness[occupied]

    @torch.no_grad()
    def ask(self, k: int | None = None) -> Children:
        k = self.check_k(k)
        generator = self.generator
        warmup = self.forward_passes < self.warmup_steps
        # The temporaries need no autograd bookkeeping; dense children are copied out of inference mode.
        with torch.inference_mode():
            if warmup:
                first, second = uniform_pairs(self.archive.occupied, k, generator)
            else:
                fitness, shares = self.fitness()
                first, second = ops.sample_parents(fitness, shares, self.archive.occupied, k, generator, self.use_matchmaker)
            if self.use_crossover or warmup:
                children = self._crossover(first, second, k, generator)
            else:
                children = self.archive.copies(first)
        if children.forms is not None:
            return children
        if self.mutation_sigma == 0 or warmup:
            return Children(values=children.values.clone())
        return Children(values=ops.mutate(children.values, self.mutation_sigma, generator))

    def _crossover(self, first: Tensor, second: Tensor, k: int, generator: torch.Generator) -> Children:
        """Split-point SLERP children: the reference's exact path for one group and the whole angle,
        else piece by piece (`chromosomes`)."""
        members = self.archive.like
        if len(self.chromosomes.groups) == 1 and self.slerp_angle == "whole":
            split, weight = ops.crossover_draws(k, self.num_params, generator, self.use_split_point, members)
            return self.archive.crossover(first, second, split, weight)
        split, weight = self.chromosomes.draw(k, generator, self.use_split_point, members)
        rows = [None] * k if split is None else split.tolist()
        pieces = [self.chromosomes.pieces(row) for row in rows]
        ratios = self.chromosomes.ratios(weight)
        return self.archive.crossover_by_pieces(first, second, pieces, ratios, self.slerp_angle == "per_part")

    def _insert(self, children: Children, scores: Tensor) -> None:
        """Insert the children one by one by the replace-the-worst rule (docs/ALGORITHM.md, "Archive update")."""
        scores = scores.to(self.archive.scores)
        for row, child_scores in enumerate(scores):
            self.archive.write(self._dropped_row(child_scores), children, row, child_scores)

    def settings(self) -> dict[str, Any]:
        return {
            **super().settings(),
            "pop_size": self.pop_size,
            "alpha": self.alpha,
            "use_matchmaker": self.use_matchmaker,
            "use_crossover": self.use_crossover,
            "use_split_point": self.use_split_point,
            "capacity": self.capacity,
            "score_shift": self.score_shift,
            "warmup_steps": self.warmup_steps,
            "chromosomes": self.chromosome_patterns,
            "slerp_angle": self.slerp_angle,
            "storage": self.storage,
            "task_vectors": self.task_vectors,
        }

    def extra_repr(self) -> str:
        return (
            f"pop_size={self.pop_size}, alpha={self.alpha}, matchmaker={self.use_matchmaker}, "
            f"crossover={self.use_crossover}, split_point={self.use_split_point}, "
            f"mutation_sigma={self.mutation_sigma}, k={self.children_per_step}"
        )
