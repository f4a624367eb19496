"""MAP-Elites for a merge of four seeds with one descriptor per skill (issue #22's four-skill setting):
4 descriptor groups of 4 bins (256 cells), the cells against a hand computation of the row-major index."""

from __future__ import annotations

import torch

from m2n2_lightning import MAPElitesStrategy

D, K, PER_SKILL = 300, 4, 5
LABELS = torch.arange(K).repeat_interleave(PER_SKILL)  # the skill of each resource


def hand_cell(scores: list[float]) -> int:
    """floor(4 * accuracy on skill s) (4 -> 3) for each skill, row-major with skill 0 slowest."""
    bins = [min(3, int(4 * sum(scores[s * PER_SKILL : (s + 1) * PER_SKILL]) / PER_SKILL)) for s in range(K)]
    return ((bins[0] * 4 + bins[1]) * 4 + bins[2]) * 4 + bins[3]


def test_four_skill_grid_with_four_seeds_places_every_model_in_its_hand_computed_cell() -> None:
    seeds = list(torch.randn(K, D, generator=torch.Generator().manual_seed(0)))
    strategy = MAPElitesStrategy(D, bins=4, descriptor_labels=LABELS, descriptor_classes=[[0], [1], [2], [3]],
                                 init_models=seeds, seed=1)  # fmt: skip
    assert strategy.archive.capacity == 256 and strategy.mutation_sigma == 0.0
    draws = torch.Generator().manual_seed(5)
    told: list[tuple[torch.Tensor, torch.Tensor]] = []

    def score(children) -> torch.Tensor:  # random 0/1 scores: every model lands in some cell of the grid
        values = children.dense() if hasattr(children, "dense") else children
        scores = (torch.rand(len(values), K * PER_SKILL, generator=draws) < 0.5).float()
        told.extend(zip(values.clone(), scores))
        return scores

    strategy.start(score)
    seed_cells = [hand_cell(s.tolist()) for _, s in told]
    assert strategy.occupied.sum().item() == len(set(seed_cells))
    for _ in range(60):
        children = strategy.ask()
        strategy.tell(children, score(children))
    # Each filled cell holds the first model of highest mean score among those told whose hand-computed cell it is.
    expected: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for values, scores in told:
        cell = hand_cell(scores.tolist())
        if cell not in expected or scores.mean() > expected[cell][1].mean():
            expected[cell] = (values, scores)
    assert sorted(expected) == torch.nonzero(strategy.occupied).flatten().tolist() and len(expected) > 4
    for cell, (values, scores) in expected.items():
        assert torch.equal(strategy.archive.members[cell], values) and torch.equal(strategy.scores[cell], scores)
