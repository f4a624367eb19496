"""MAP-Elites, the paper's quality-diversity baseline, over flat parameter vectors.

The archive is a grid of cells indexed by behaviour descriptors; each cell
keeps one elite. With the paper's settings (docs/ALGORITHM.md) the two descriptors are a
model's accuracy on the training examples of odd digits and on those of even
digits, each cut into 10 bins (a 10 x 10 grid), and the quality of a model is
its accuracy on all of them (its mean score). One step:

1. parents a, b ~ quality / sum(quality) over the filled cells; as in the
   reference, b is drawn among the cells other than a's once the qualities sum
   to 2 or more (the reference then samples the pair without replacement);
2. the child is M2N2's split-point SLERP of a and b, plus Gaussian noise
   (sigma 0.01 from scratch, none when merging given models);
3. the child's cell is bin(d_1) * bins + bin(d_2) with bin(d) = floor(bins * d)
   (d = 1 goes into the last bin); the child becomes that cell's elite if the
   cell is empty or the child's quality is strictly higher than the elite's.

Descriptors need the labels of the resources, which a strategy does not see
(it is told scores [k, N] only). They are given as `descriptor_labels`, the
labels [N] of the N resources in the order they are scored, or later through
`set_descriptor_labels(labels)`; `resource_labels(datamodule)` returns them for
our data modules (what `conf/strategy/map_elites.yaml` uses). Descriptor i is
the mean score on the resources whose label is in `descriptor_classes[i]`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from m2n2_lightning.strategies import operators as ops
from m2n2_lightning.strategies.archive import Archive
from m2n2_lightning.checks import check_positive_int
from m2n2_lightning.strategies.children import Children
from m2n2_lightning.strategies.population import PopulationStrategy

if TYPE_CHECKING:
    from m2n2_lightning.data.base import TensorDataModule

#: The paper's descriptors: accuracy on the odd digits, then on the even digits.
PARITY_CLASSES: tuple[tuple[int, ...], ...] = ((1, 3, 5, 7, 9), (0, 2, 4, 6, 8))


def resource_labels(data: TensorDataModule) -> Tensor:
    """The labels of a data module's training split (the resources), for `descriptor_labels`."""
    return data.train_tensors[1]


def cell_index(scores: Tensor, membership: Tensor, bins: int) -> Tensor:
    """Grid cell [k] of each row of `scores` [k, N].

    `membership` [G, N] is 1 where resource j counts for descriptor g. The
    descriptor is the mean score over those resources, its bin
    floor(bins * descriptor) clipped to bins - 1, and the cell the row-major
    index of the G bins (first descriptor slowest). The bin is computed as
    floor(bins * sum / count), exact for 0/1 scores.
    """
    hits = scores @ membership.mT
    bin_index = torch.floor(hits * bins / membership.sum(dim=1)).long().clamp(0, bins - 1)
    strides = bins ** torch.arange(membership.shape[0] - 1, -1, -1, device=scores.device)
    return (bin_index * strides).sum(dim=-1)


def sample_elite_parents(
    quality: Tensor, occupied: Tensor, num_pairs: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Draw `num_pairs` parent cell pairs (a, b), each in proportion to quality among filled cells.

    b is drawn among the cells other than a's once the qualities sum to 2 or
    more (the reference's rule; before that a = b is possible). Where every
    filled cell has quality 0 the draw is uniform over the filled cells.
    """
    weights = torch.where(occupied, quality, torch.zeros_like(quality))
    total = weights.sum()
    weights = torch.where(total > 0, weights, occupied.to(weights.dtype))
    uniforms = torch.rand(num_pairs, 2, generator=generator, device=quality.device)
    first = ops.sample_categorical(weights, uniforms[:, 0])
    others = weights.expand(num_pairs, -1).scatter(1, first.unsqueeze(1), 0.0)
    distinct = (total >= 2) & (others.sum(dim=1, keepdim=True) > 0)
    second = ops.sample_categorical(torch.where(distinct, others, weights.expand_as(others)), uniforms[:, 1])
    return first, second


class MAPElitesStrategy(PopulationStrategy):
    """MAP-Elites with M2N2's crossover and mutation (the paper's baseline).

    Its `Archive` has one slot per grid cell (members [bins^G, D], scores
    [bins^G, N], occupancy); it starts like M2N2 (two random members, or the
    given models, each put in its cell), makes children by M2N2's split-point
    SLERP and mutation, and reports as best member the highest mean score (first
    on ties); parent selection and the update are MAP-Elites' (module docstring).

    Args:
        num_params: D, the length of the flat parameter vector.
        bins: bins per descriptor (>= 2); the grid has bins^G cells.
        descriptor_labels: labels [N] of the resources, in scoring order; or
            give them later with `set_descriptor_labels` (before `start`).
        descriptor_classes: the label classes of each of the G descriptors.
        **population: `mutation_sigma`, `init_sigma`, `children_per_step`,
            `init_models`, `seed`, `validate_scores`, as for `M2N2Strategy`
            (`PopulationStrategy`; mutation 0.01 from scratch, none when merging).
    """

    def __init__(
        self,
        num_params: int,
        bins: int = 10,
        descriptor_labels: Tensor | Sequence[int] | None = None,
        descriptor_classes: Sequence[Sequence[int]] = PARITY_CLASSES,
        **population: Any,
    ) -> None:
        super().__init__(num_params, **population)
        self.bins = check_positive_int("bins", bins, 2)
        classes = tuple(tuple(int(c) for c in group) for group in descriptor_classes)
        if not classes or not all(classes):
            raise ValueError(f"descriptor_classes must be one or more non-empty label groups, got {descriptor_classes!r}")
        self.descriptor_classes = classes
        self.archive = Archive(self.bins ** len(classes), self.num_params, self.dtype)
        self.register_buffer("membership", torch.zeros(len(classes), 0))
        if descriptor_labels is not None:
            self.set_descriptor_labels(descriptor_labels)

    def set_descriptor_labels(self, labels: Tensor | Sequence[int]) -> None:
        """Set the labels [N] of the resources that the descriptors are computed from."""
        labels = torch.as_tensor(labels).reshape(-1).to(self.membership.device)
        if self.num_resources is not None and len(labels) != self.num_resources:
            raise ValueError(f"got {len(labels)} descriptor labels for N = {self.num_resources} resources")
        groups = [torch.tensor(group, device=labels.device) for group in self.descriptor_classes]
        membership = torch.stack([torch.isin(labels, group) for group in groups]).to(self.membership.dtype)
        empty = [list(g) for g, count in zip(self.descriptor_classes, membership.sum(dim=1).tolist()) if count == 0]
        if empty:
            raise ValueError(f"no resource has a label in descriptor class(es) {empty}")
        self.membership = membership

    def quality(self) -> Tensor:
        """Quality [cells] of each cell's elite: its mean score (0 for empty cells)."""
        scores = self.archive.scores
        return scores.mean(dim=1) if scores.numel() else scores.new_zeros(self.archive.capacity)

    def cells(self, scores: Tensor) -> Tensor:
        """Grid cell [k] of models with scores [k, N]."""
        return cell_index(scores.to(self.membership), self.membership, self.bins)

    def population(self) -> tuple[Tensor, Tensor]:
        """Scores and quality of the elites of the filled cells (a host sync: for logging)."""
        occupied = self.archive.occupied
        return self.archive.scores[occupied], self.quality()[occupied]

    def check_scores(self, scores: Tensor) -> None:
        """The base checks, and descriptor labels for exactly these N resources."""
        super().check_scores(scores)
        if self.membership.shape[1] == 0:
            raise ValueError(
                "MAPElitesStrategy needs the labels of the resources for its descriptors: pass "
                "descriptor_labels=... or call set_descriptor_labels(targets) before start()"
            )
        if self.membership.shape[1] != scores.shape[1]:
            raise ValueError(f"scores cover N = {scores.shape[1]} resources but {self.membership.shape[1]} labels were given")

    @torch.no_grad()
    def ask(self, k: int | None = None) -> Children:
        k = self.check_k(k)
        first, second = sample_elite_parents(self.quality(), self.archive.occupied, k, self.generator)
        split, weight = ops.crossover_draws(k, self.num_params, self.generator, True, self.archive.like)
        children = self.archive.crossover(first, second, split, weight).values
        return Children(values=ops.mutate(children, self.mutation_sigma, self.generator))

    def _insert(self, children: Children, scores: Tensor) -> None:
        """Each child becomes its cell's elite if the cell is empty or its quality is strictly higher."""
        archive = self.archive
        scores = scores.to(archive.scores)
        for row, (child_scores, cell) in enumerate(zip(scores, self.cells(scores))):
            accept = ~archive.occupied[cell] | (child_scores.mean() > archive.scores[cell].mean())
            archive.write(cell, children, row, child_scores, accept)

    def settings(self) -> dict[str, Any]:
        return {
            **super().settings(),
            "bins": self.bins,
            "descriptor_classes": self.descriptor_classes,
        }

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # Descriptor labels not given again: take the saved ones (their N is the saved run's).
        saved = state_dict.get(prefix + "membership")
        if saved is not None and self.membership.shape[1] == 0:
            self.membership = torch.zeros_like(saved, device=self.membership.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_state(self) -> dict[str, Any]:
        return {"bins": self.bins, "descriptor_classes": self.descriptor_classes}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if (state["bins"], state["descriptor_classes"]) != (self.bins, self.descriptor_classes):
            raise ValueError(
                f"the saved strategy has bins={state['bins']}, descriptor_classes={state['descriptor_classes']}; "
                f"this one bins={self.bins}, descriptor_classes={self.descriptor_classes}"
            )

    def extra_repr(self) -> str:
        return (
            f"bins={self.bins}, descriptor_classes={self.descriptor_classes}, "
            f"mutation_sigma={self.mutation_sigma}, k={self.children_per_step}"
        )
