"""The paper's general form against float64 oracles: capacity (eq. 5), score shift, chromosomes and the
per-part SLERP angle (eq. 2), and the warm-up's uniform parent pairs."""

from __future__ import annotations

import math

import pytest
import torch

from m2n2_lightning import MLP, FlatParams, M2N2Strategy
from m2n2_lightning.strategies import operators as ops
from m2n2_lightning.strategies.chromosomes import Chromosomes
from m2n2_lightning.strategies.m2n2 import uniform_pairs


def oracle_fitness(scores: list[list[float]], occupied: list[bool], alpha: float, capacity: str, shift: bool):
    """fit_i = sum_j c_j s'_ij / z_j^alpha in plain Python floats (docs/ALGORITHM.md, "The paper's general form")."""
    rows, n = len(scores), len(scores[0])
    s = [row[:] for row in scores]
    if shift:
        for j in range(n):
            lowest = min((scores[i][j] for i in range(rows) if occupied[i]), default=0.0)
            for i in range(rows):
                s[i][j] = scores[i][j] - lowest if occupied[i] else 0.0
    fitness = []
    for i in range(rows):
        total = 0.0
        for j in range(n):
            z = sum(s[k][j] for k in range(rows))
            z = z**alpha if z > 0 else 1.0
            c = max(s[k][j] for k in range(rows)) if capacity == "max" else 1.0
            total += c * s[i][j] / z
        fitness.append(total)
    return fitness


def oracle_dropped(scores, occupied, child, alpha, capacity, shift) -> int:
    rows, occ = scores + [child], occupied + [True]
    fitness = oracle_fitness(rows, occ, alpha, capacity, shift)
    if shift:
        fitness = [f if o else -1.0 for f, o in zip(fitness, occ)]
    return min(range(len(fitness)), key=lambda i: (fitness[i], i))


def archive_with(scores: torch.Tensor, occupied: torch.Tensor, **settings) -> M2N2Strategy:
    strategy = M2N2Strategy(num_params=3, pop_size=len(scores), **settings).double()
    strategy.start(lambda members: torch.zeros(len(members), scores.shape[1], dtype=torch.float64))
    strategy.archive.scores.copy_(scores)
    strategy.archive.occupied.copy_(occupied)
    return strategy


def test_capacity_changes_which_row_is_dropped() -> None:
    # By hand: unit capacity drops A (0.643 < 0.667 < 0.690); c = max drops B (0.133 < 0.388 < 0.579).
    members = torch.tensor([[0.9, 0.0], [0.0, 0.2]], dtype=torch.float64)
    child = torch.tensor([0.5, 0.1], dtype=torch.float64)
    for capacity, expected in (("unit", 0), ("max", 1)):
        strategy = archive_with(members, torch.tensor([True, True]), capacity=capacity)
        assert oracle_dropped(members.tolist(), [True, True], child.tolist(), 1.0, capacity, False) == expected
        assert int(strategy._dropped_row(child)) == expected
        strategy.tell(torch.full((1, 3), 7.0, dtype=torch.float64), child.unsqueeze(0))
        assert torch.equal(strategy.archive.scores[expected], child)
        assert torch.equal(strategy.archive.members[expected], torch.full((3,), 7.0, dtype=torch.float64))


@pytest.mark.parametrize("capacity", ["unit", "max"])
@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, 2.0])
def test_fitness_and_update_match_the_float64_oracle(capacity: str, shift: bool, alpha: float) -> None:
    generator = torch.Generator().manual_seed(int(alpha * 10) + 3 * shift + 7 * (capacity == "max"))
    for _ in range(40):
        scores = torch.rand(5, 6, generator=generator, dtype=torch.float64)
        scores[torch.rand(5, 6, generator=generator) < 0.3] = 0.0
        occupied = torch.rand(5, generator=generator) < 0.8
        scores[~occupied] = 0.0
        child = torch.rand(6, generator=generator, dtype=torch.float64)
        strategy = archive_with(scores, occupied, alpha=alpha, capacity=capacity, score_shift=shift)
        fitness, shares = strategy.fitness()
        expected = oracle_fitness(scores.tolist(), occupied.tolist(), alpha, capacity, shift)
        torch.testing.assert_close(fitness, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)
        dropped = oracle_dropped(scores.tolist(), occupied.tolist(), child.tolist(), alpha, capacity, shift)
        assert int(strategy._dropped_row(child)) == dropped
        # The attraction carries the same weights: g_k = sum_j c_j / z_j^alpha max(s_kj - s_aj, 0).
        first = torch.tensor([int(fitness.argmax())])
        got = ops.attraction(shares, first)[0]
        want = [sum(max(shares[k, j].item() - shares[first, j].item(), 0.0) for j in range(6)) for k in range(5)]
        torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_the_default_is_the_reference_update() -> None:
    scores = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]], dtype=torch.float64)
    strategy = archive_with(scores, torch.tensor([True, True]))
    assert strategy.exact_default
    child = torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64)
    assert int(strategy._dropped_row(child)) == oracle_dropped(scores.tolist(), [True, True], child.tolist(), 1.0, "unit", False)


def oracle_child(a: list[float], b: list[float], t: list[float], angle_groups: list[list[int]] | None) -> list[float]:
    """child_d = sin((1 - t_d) W)/sin W a_d + sin(t_d W)/sin W b_d, W the angle of the whole vectors or of each group."""
    groups = angle_groups or [list(range(len(a)))]
    child = [0.0] * len(a)
    for group in groups:
        dot = sum(a[d] * b[d] for d in group)
        norm = math.sqrt(sum(a[d] ** 2 for d in group)) * math.sqrt(sum(b[d] ** 2 for d in group))
        omega = math.acos(max(-1.0, min(1.0, dot / norm)))
        for d in group:
            if math.sin(omega) > ops.SLERP_EPS:
                child[d] = math.sin((1 - t[d]) * omega) / math.sin(omega) * a[d] + math.sin(t[d] * omega) / math.sin(omega) * b[d]
            else:
                child[d] = (1 - t[d]) * a[d] + t[d] * b[d]
    return child


@pytest.mark.parametrize("slerp_angle", ["whole", "per_part"])
def test_chromosome_children_match_the_formulas(slerp_angle: str) -> None:
    model = MLP(3, 4, 2)
    flat = FlatParams(model)
    patterns = ["w2", "w1"]  # groups: {w2}, {w1}, the rest {b1, b2}
    seeds = [torch.randn(flat.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    strategy = M2N2Strategy(
        flat.num_params, pop_size=4, init_models=seeds, chromosomes=patterns, layout=flat.layout, slerp_angle=slerp_angle
    ).double()
    strategy.start(lambda members: torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64))
    chromosomes = strategy.chromosomes
    offsets = {s.name: range(s.offset, s.offset + s.numel) for s in flat.specs}
    coordinates = [list(offsets["w2"]), list(offsets["w1"]), list(offsets["b1"]) + list(offsets["b2"])]
    assert [sorted(d for start, stop in g for d in range(start, stop)) for g in chromosomes.groups] == coordinates
    for trial in range(20):
        state = strategy.generator.get_state()
        children = strategy.ask(3)
        replay = torch.Generator().set_state(state)
        first, second = ops.sample_parents(*strategy.fitness(), strategy.archive.occupied, 3, replay)
        split, weight = chromosomes.draw(3, replay, True, strategy.archive.members)
        for i in range(3):
            a, b = strategy.archive.members[first[i]].tolist(), strategy.archive.members[second[i]].tolist()
            t, parts = [0.0] * flat.num_params, [[] for _ in range(6)]
            for g, coords in enumerate(coordinates):
                for position, d in enumerate(coords):  # the split counts along the group's own coordinates
                    before = position < split[i, g]
                    t[d] = weight[i, g].item() if before else 1 - weight[i, g].item()
                    parts[2 * g + (not before)].append(d)
            groups = [p for p in parts if p] if slerp_angle == "per_part" else None
            expected = torch.tensor(oracle_child(a, b, t, groups), dtype=torch.float64)
            torch.testing.assert_close(children.dense()[i], expected, rtol=1e-10, atol=1e-12)
        strategy.tell(children, (torch.rand(3, 2, generator=torch.Generator().manual_seed(trial)) < 0.5).double())


def test_one_group_by_pieces_equals_the_exact_crossover() -> None:
    strategy = M2N2Strategy(50, pop_size=4, seed=3).double()
    strategy.start(lambda members: torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64))
    first, second = torch.tensor([0, 1, 1]), torch.tensor([1, 0, 1])
    split, weight = torch.tensor([0, 17, 49]), torch.tensor([[0.3], [0.6], [0.9]], dtype=torch.float64)
    exact = strategy.archive.crossover(first, second, split, weight).dense()
    whole = Chromosomes.whole(50)
    pieces = [whole.pieces([cut]) for cut in split.tolist()]
    by_pieces = strategy.archive.crossover_by_pieces(first, second, pieces, whole.ratios(weight), per_part=False).dense()
    torch.testing.assert_close(by_pieces, exact, rtol=1e-12, atol=1e-14)


def test_chromosome_patterns_are_checked() -> None:
    layout = FlatParams(MLP(3, 4, 2)).layout
    with pytest.raises(ValueError, match=r"\['attn'\] match no parameter"):
        Chromosomes.from_patterns(layout, ["w1", "attn"])
    with pytest.raises(ValueError, match="matches chromosome patterns"):
        Chromosomes.from_patterns(layout, ["w*", "*1"])
    with pytest.raises(ValueError, match="need the parameter layout"):
        M2N2Strategy(10, chromosomes=["w1"])
    with pytest.raises(ValueError, match="slerp_angle"):
        M2N2Strategy(10, slerp_angle="half")
    with pytest.raises(ValueError, match="capacity"):
        M2N2Strategy(10, capacity="min")


def chi_square_of_pairs(draw, num_slots: int, occupied: torch.Tensor, num_pairs: int) -> float:
    first, second = draw(occupied, num_pairs)
    slots = occupied.nonzero().flatten().tolist()
    cells = [(a, b) for a in slots for b in slots if a != b]
    counts = {cell: 0 for cell in cells}
    for a, b in zip(first.tolist(), second.tolist()):
        assert (a, b) in counts, f"pair {(a, b)} is not two distinct occupied slots"
        counts[(a, b)] += 1
    expected = num_pairs / len(cells)
    return sum((count - expected) ** 2 / expected for count in counts.values())


def test_warmup_pairs_are_uniform_over_distinct_occupied_slots() -> None:
    occupied = torch.tensor([True, False, True, True, False])
    generator = torch.Generator().manual_seed(0)
    uniform = chi_square_of_pairs(lambda occ, n: uniform_pairs(occ, n, generator), 5, occupied, 6000)
    # 5 degrees of freedom: P(chi2 > 20.5) = 0.001.
    assert uniform < 20.5
    # A sampler biased towards slot 0 (what fitness-proportional parents would give a strong member) fails the test.
    biased_weights = torch.tensor([3.0, 0.0, 1.0, 1.0, 0.0])

    def biased(occ: torch.Tensor, n: int):
        u = torch.rand(n, 2, generator=generator)
        a = ops.sample_categorical(biased_weights, u[:, 0])
        others = biased_weights.expand(n, -1).scatter(1, a.unsqueeze(1), 0.0)
        return a, ops.sample_categorical(others, u[:, 1])

    assert chi_square_of_pairs(biased, 5, occupied, 6000) > 20.5


def test_warmup_merges_without_mutation_then_evolves() -> None:
    seeds = [torch.full((6,), float(v), dtype=torch.float64) + torch.arange(6.0, dtype=torch.float64) for v in (1, -2, 3)]
    strategy = M2N2Strategy(6, pop_size=5, init_models=seeds, mutation_sigma=0.5, warmup_steps=4, seed=1).double()
    strategy.start(lambda members: torch.eye(3, dtype=torch.float64))
    for step in range(6):
        state = strategy.generator.get_state()
        child = strategy.ask()
        replay = torch.Generator().set_state(state)
        if step < 4:  # uniform pair, split-point SLERP, no noise
            first, second = uniform_pairs(strategy.archive.occupied, 1, replay)
            split, weight = ops.crossover_draws(1, 6, replay, True, strategy.archive.members)
            assert torch.equal(child.dense(), strategy.archive.crossover(first, second, split, weight).dense())
        else:  # the paper's selection, and the mutation
            first, second = ops.sample_parents(*strategy.fitness(), strategy.archive.occupied, 1, replay)
            split, weight = ops.crossover_draws(1, 6, replay, True, strategy.archive.members)
            noiseless = strategy.archive.crossover(first, second, split, weight).dense()
            assert torch.equal(child.dense(), ops.mutate(noiseless, 0.5, replay))
        strategy.tell(child, torch.rand(1, 3, generator=torch.Generator().manual_seed(step), dtype=torch.float64))
    assert strategy.forward_passes == 6
