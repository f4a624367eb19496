"""MAPElitesStrategy: cells, the replacement rule and parent sampling against hand-computed cases."""

from __future__ import annotations

import copy

import pytest
import torch

from m2n2_lightning import MLP, FlatParams, M2N2Strategy, MAPElitesStrategy
from m2n2_lightning.data import DigitsDataModule
from m2n2_lightning.engine import EvolutionEngine
from m2n2_lightning.strategies.map_elites import (
    cell_index,
    resource_labels,
    sample_elite_parents,
)

D = 6
#: 10 resources: odd labels at positions 0-4, even labels at 5-9.
LABELS = torch.tensor([1, 3, 5, 7, 9, 0, 2, 4, 6, 8])


def scores_for(odd_hits: int, even_hits: int) -> torch.Tensor:
    """Scores [1, 10] solving the first `odd_hits` odd and `even_hits` even resources."""
    row = torch.zeros(10)
    row[:odd_hits] = 1
    row[5 : 5 + even_hits] = 1
    return row.unsqueeze(0)


def make(**kwargs) -> MAPElitesStrategy:
    return MAPElitesStrategy(num_params=D, descriptor_labels=LABELS, **kwargs)


def initialized(**kwargs) -> MAPElitesStrategy:
    """A strategy whose two initial members landed in cells 0 (0/5 odd, 0/5 even) and 20 (1/5 odd)."""
    strategy = make(**kwargs)
    strategy.start(lambda members: torch.cat([scores_for(0, 0), scores_for(1, 0)]))
    return strategy


def test_cell_index_hand_computed() -> None:
    membership = torch.stack([LABELS % 2 == 1, LABELS % 2 == 0]).float()
    scores = torch.cat([scores_for(0, 0), scores_for(2, 3), scores_for(5, 1), scores_for(5, 5), scores_for(3, 4)])
    # odd 2/5 = 0.4 -> bin 4, even 3/5 = 0.6 -> bin 6: cell 46; accuracy 1.0 goes into the last bin 9.
    assert cell_index(scores, membership, 10).tolist() == [0, 46, 92, 99, 68]
    # 5 bins: 0.4 -> 2, 0.6 -> 3; 3 bins: floor(3 * 2/5) = 1, floor(3 * 3/5) = 1.
    assert cell_index(scores[1:2], membership, 5).tolist() == [2 * 5 + 3]
    assert cell_index(scores[1:2], membership, 3).tolist() == [1 * 3 + 1]
    # Unequal group sizes: 1 of 3 odd (floor(3.33) = 3), 1 of 2 even (bin 5).
    three_odd = torch.tensor([[1.0, 0, 0, 1, 0]])
    membership = torch.tensor([[1.0, 1, 1, 0, 0], [0, 0, 0, 1, 1]])
    assert cell_index(three_odd, membership, 10).tolist() == [35]


def twenty(odd_hits: int, even_hits: int) -> torch.Tensor:
    """Scores [20] on 10 odd resources then 10 even ones, the first hits solved."""
    return torch.cat([torch.arange(10) < odd_hits, torch.arange(10) < even_hits]).float()


TWENTY_LABELS = torch.tensor([1] * 10 + [0] * 10)


def test_child_fills_an_empty_cell() -> None:
    strategy = initialized(mutation_sigma=0.0)
    assert strategy.occupied.nonzero().flatten().tolist() == [0, 20]
    assert strategy.forward_passes == 0
    strategy.tell(torch.full((1, D), 1.0), scores_for(2, 3))  # cell 46, empty
    assert strategy.occupied.nonzero().flatten().tolist() == [0, 20, 46]
    assert torch.equal(strategy.archive.members[46], torch.full((D,), 1.0))
    assert torch.equal(strategy.scores[46], scores_for(2, 3)[0])
    assert strategy.forward_passes == 1


def test_child_replaces_the_elite_only_with_strictly_higher_quality() -> None:
    # 4 bins over 10 per group: 5/10 and 6/10 both fall in bin 2 (0.5 .. 0.75), so cell 2 * 4 + 2 = 10.
    strategy = MAPElitesStrategy(num_params=D, bins=4, descriptor_labels=TWENTY_LABELS, mutation_sigma=0.0)
    strategy.start(lambda members: torch.stack([twenty(0, 0), twenty(0, 0)]))

    def tell(value: float, odd_hits: int, even_hits: int) -> None:
        strategy.tell(torch.full((1, D), value), twenty(odd_hits, even_hits).unsqueeze(0))

    tell(1.0, 5, 5)  # cell 10, quality 0.50: fills it
    tell(2.0, 6, 5)  # cell 10, quality 0.55: replaces
    tell(3.0, 5, 5)  # cell 10, quality 0.50: rejected
    tell(4.0, 5, 6)  # cell 10, quality 0.55, equal: rejected
    assert strategy.archive.members[10, 0].item() == 2.0
    assert strategy.scores[10].mean().item() == pytest.approx(0.55)
    tell(5.0, 8, 5)  # odd 0.8 -> bin 3: cell 14, lower cells keep their elites
    assert strategy.occupied.nonzero().flatten().tolist() == [0, 10, 14]
    assert strategy.archive.members[10, 0].item() == 2.0 and strategy.archive.members[14, 0].item() == 5.0
    assert strategy.forward_passes == 5


def test_children_of_one_step_are_inserted_one_by_one() -> None:
    strategy = MAPElitesStrategy(num_params=D, bins=4, descriptor_labels=TWENTY_LABELS, mutation_sigma=0.0)
    strategy.start(lambda members: torch.stack([twenty(0, 0), twenty(0, 0)]))
    children = torch.arange(3.0).unsqueeze(1).expand(3, D)
    strategy.tell(children, torch.stack([twenty(6, 5), twenty(7, 5), twenty(5, 5)]))  # all cell 10
    assert strategy.archive.members[10, 0].item() == 1.0  # the best of the three, whatever their order
    assert strategy.forward_passes == 3


def test_parents_are_drawn_in_proportion_to_quality_among_filled_cells() -> None:
    generator = torch.Generator().manual_seed(0)
    quality = torch.tensor([0.2, 0.0, 0.6, 0.9])
    occupied = torch.tensor([True, False, True, False])  # cell 3 is empty: its value is ignored
    first, second = sample_elite_parents(quality, occupied, 40_000, generator)
    # Sum of qualities 0.8 < 2: both drawn independently, 1/4 and 3/4.
    for parents in (first, second):
        assert set(parents.tolist()) == {0, 2}
        assert (parents == 0).float().mean().item() == pytest.approx(0.25, abs=0.01)
    assert (first == second).float().mean().item() == pytest.approx(0.25**2 + 0.75**2, abs=0.01)


def test_second_parent_differs_once_qualities_sum_to_two() -> None:
    generator = torch.Generator().manual_seed(1)
    quality = torch.tensor([0.5, 1.0, 1.0, 0.0])
    occupied = torch.tensor([True, True, True, False])
    first, second = sample_elite_parents(quality, occupied, 60_000, generator)
    assert not (first == second).any()
    assert (first == 0).float().mean().item() == pytest.approx(0.2, abs=0.01)
    # P(b = 0) = P(a = 1) 0.5/1.5 + P(a = 2) 0.5/1.5 = 0.4/1.5.
    assert (second == 0).float().mean().item() == pytest.approx(0.4 / 1.5, abs=0.01)
    # P(b = 2 | a = 0) = 1/2.
    assert (second[first == 0] == 2).float().mean().item() == pytest.approx(0.5, abs=0.02)


def test_all_zero_quality_draws_uniformly_among_filled_cells() -> None:
    generator = torch.Generator().manual_seed(2)
    occupied = torch.tensor([False, True, False, True])
    first, second = sample_elite_parents(torch.zeros(4), occupied, 10_000, generator)
    assert set(first.tolist()) == set(second.tolist()) == {1, 3}
    assert (first == 1).float().mean().item() == pytest.approx(0.5, abs=0.02)


def test_ask_makes_children_of_filled_cells_and_best_is_highest_quality() -> None:
    strategy = initialized()
    strategy.tell(torch.full((1, D), 1.0), scores_for(2, 3))
    best = strategy.best_params()
    assert torch.equal(best, torch.full((D,), 1.0))
    children = strategy.ask(4)
    assert len(children) == 4 and children.dense().shape == (4, D)
    assert strategy.mutation_sigma == 0.01


def test_merging_given_models_inserts_them_without_mutation() -> None:
    a, b = torch.full((D,), 1.0), torch.full((D,), -2.0)
    strategy = make(init_models=[a, b])
    assert strategy.mutation_sigma == 0.0
    seen = []
    strategy.start(lambda members: seen.append(members.dense().clone()) or torch.cat([scores_for(0, 0), scores_for(3, 3)]))
    assert torch.equal(seen[0], torch.stack([a, b]))
    assert torch.equal(strategy.archive.members[0], a) and torch.equal(strategy.archive.members[66], b)


def test_missing_or_mismatched_labels_fail_before_any_state_changes() -> None:
    strategy = MAPElitesStrategy(num_params=D)
    with pytest.raises(ValueError, match="set_descriptor_labels"):
        strategy.start(lambda members: torch.zeros(2, 10))
    assert not strategy.started and not strategy.occupied.any()
    strategy.set_descriptor_labels(LABELS[:8])
    with pytest.raises(ValueError, match="N = 10 resources but 8 labels"):
        strategy.start(lambda members: torch.zeros(2, 10))
    with pytest.raises(ValueError, match=r"no resource has a label in descriptor class\(es\) \[\[0, 2, 4, 6, 8\]\]"):
        strategy.set_descriptor_labels(torch.tensor([1, 3]))
    initialized_strategy = initialized()
    with pytest.raises(ValueError, match="got 4 descriptor labels for N = 10"):
        initialized_strategy.set_descriptor_labels(LABELS[:4])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"bins": 1}, "bins must be an integer >= 2, got 1"),
        ({"descriptor_classes": []}, "descriptor_classes"),
        ({"descriptor_classes": [[1], []]}, "descriptor_classes"),
        ({"init_models": [torch.zeros(D)]}, "two or more"),
        ({"validate_scores": "deferred"}, "validate_scores must be True or False"),
    ],
)
def test_bad_settings_raise(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        MAPElitesStrategy(num_params=D, **kwargs)


def test_is_not_an_m2n2_subclass() -> None:
    assert not issubclass(MAPElitesStrategy, M2N2Strategy)


def test_state_dict_mid_run_continues_identically() -> None:
    def drive(strategy: MAPElitesStrategy, steps: int, start: int) -> None:
        for step in range(start, start + steps):
            g = torch.Generator().manual_seed(step)
            children = strategy.ask(2)
            strategy.tell(children, (torch.rand(2, 10, generator=g) < 0.5).float())

    strategy = initialized()
    drive(strategy, 5, 0)
    saved = copy.deepcopy(strategy.state_dict())
    drive(strategy, 5, 5)
    restored = MAPElitesStrategy(num_params=D)
    restored.load_state_dict(saved)
    drive(restored, 5, 5)
    for key, value in strategy.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, restored.state_dict()[key]), key
    assert restored.forward_passes == strategy.forward_passes == 20
    assert torch.equal(restored.ask(3).dense(), strategy.ask(3).dense())  # the random stream continues too
    with pytest.raises(ValueError, match="bins=10"):
        MAPElitesStrategy(num_params=D, bins=5).load_state_dict(saved)


def test_learns_on_digits_with_the_engine(one_thread) -> None:
    data = DigitsDataModule()
    model = MLP()
    strategy = MAPElitesStrategy(FlatParams(model).num_params, descriptor_labels=resource_labels(data), seed=0)
    engine = EvolutionEngine(model, strategy)
    engine.attach(*data.train_tensors)
    engine.start()
    start = strategy.quality().max().item()
    for _ in range(300):
        engine.step()
    assert strategy.forward_passes == 300
    assert strategy.quality().max().item() > start + 0.1
    assert strategy.occupied.sum().item() > 2
    scores, quality = strategy.population()
    assert torch.equal(quality, scores.mean(dim=1))
