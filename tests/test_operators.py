"""Each M2N2 operator against a float64 computation written from the formulas in docs/ALGORITHM.md."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import crossover, replace_worst, split_point_ratios_reference

from m2n2_lightning.strategies import operators as ops


def niche_fitness_reference(s: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Element by element: n_j, z_j (1 where n_j = 0), F_ij = s_ij / z_j, fit_i = sum_j F_ij."""
    P, N = s.shape
    F = np.zeros((P, N))
    for j in range(N):
        n = sum(s[i, j] for i in range(P))
        z = 1.0 if n == 0 else n**alpha
        for i in range(P):
            F[i, j] = s[i, j] / z
    return F.sum(axis=1), F


ARCHIVE_SCORES = np.array(
    [
        [1, 1, 0, 0, 1, 0],
        [1, 0, 1, 0, 0, 0],
        [0, 0, 1, 0, 1, 0],  # column 3 and column 5: nobody solves them (z = 1)
        [1, 1, 1, 0, 1, 0],
    ],
    dtype=np.float64,
)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, 2.0])
def test_niche_fitness_matches_definition(alpha: float) -> None:
    fit, shares = ops.niche_fitness(torch.tensor(ARCHIVE_SCORES), alpha)
    ref_fit, ref_shares = niche_fitness_reference(ARCHIVE_SCORES, alpha)
    np.testing.assert_allclose(fit.numpy(), ref_fit, rtol=1e-12)
    np.testing.assert_allclose(shares.numpy(), ref_shares, rtol=1e-12)


def test_niche_fitness_by_hand() -> None:
    # n = [3, 2, 3, 0, 3, 0]; member 0 solves columns 0, 1, 4: 1/3 + 1/2 + 1/3.
    fit, _ = ops.niche_fitness(torch.tensor(ARCHIVE_SCORES), 1.0)
    assert fit[0].item() == pytest.approx(1 / 3 + 1 / 2 + 1 / 3, abs=1e-15)
    # alpha = 0: plain count of examples solved.
    fit0, _ = ops.niche_fitness(torch.tensor(ARCHIVE_SCORES), 0.0)
    np.testing.assert_array_equal(fit0.numpy(), ARCHIVE_SCORES.sum(axis=1))


def test_niche_fitness_capacity_scales_each_resource() -> None:
    capacity = torch.tensor([2.0, 1.0, 0.5, 1.0, 3.0, 1.0], dtype=torch.float64)
    fit, _ = ops.niche_fitness(torch.tensor(ARCHIVE_SCORES), 1.0, capacity)
    _, F = niche_fitness_reference(ARCHIVE_SCORES, 1.0)
    np.testing.assert_allclose(fit.numpy(), (F * capacity.numpy()).sum(axis=1), rtol=1e-12)


def test_attraction_matches_definition() -> None:
    _, F = niche_fitness_reference(ARCHIVE_SCORES, 1.0)
    shares = torch.tensor(F)
    got = ops.attraction(shares, torch.tensor([0, 2]))
    for row, a in enumerate([0, 2]):
        expected = [sum(max(0.0, F[k, j] - F[a, j]) for j in range(F.shape[1])) for k in range(F.shape[0])]
        np.testing.assert_allclose(got[row].numpy(), expected, rtol=1e-12)
    assert got[0, 0] == 0 and got[1, 2] == 0  # a parent never attracts itself


def test_sample_categorical_picks_by_cdf() -> None:
    weights = torch.tensor([0.0, 1.0, 0.0, 3.0], dtype=torch.float64)
    # CDF 0, 1, 1, 4 -> u*4 in [0, 1) is index 1, [1, 4) is index 3.
    u = torch.tensor([0.0, 0.2, 0.2499, 0.25, 0.9999999, 1 - 1e-17])
    assert ops.sample_categorical(weights, u).tolist() == [1, 1, 1, 3, 3, 3]
    trailing_zero = torch.tensor([1.0, 1.0, 0.0])
    assert ops.sample_categorical(trailing_zero, torch.tensor([1 - 1e-9])).tolist() == [1]


def _draw_many(fitness, shares, occupied, n, matchmaker, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ops.sample_parents(fitness, shares, occupied, n, g, use_matchmaker=matchmaker)


def test_first_parent_is_fitness_proportional() -> None:
    fit, shares = ops.niche_fitness(torch.tensor(ARCHIVE_SCORES), 1.0)
    n = 200_000
    first, _ = _draw_many(fit, shares, torch.ones(4, dtype=torch.bool), n, True)
    counts = torch.bincount(first, minlength=4).double() / n
    expected = fit / fit.sum()
    # 5 standard errors of a binomial proportion: a wrong sampler (uniform, argmax) fails.
    tol = 5 * torch.sqrt(expected * (1 - expected) / n)
    assert torch.all((counts - expected).abs() < tol), (counts, expected)


def test_second_parent_is_attraction_proportional() -> None:
    fit, shares = ops.niche_fitness(torch.tensor(ARCHIVE_SCORES), 1.0)
    n = 200_000
    first, second = _draw_many(fit, shares, torch.ones(4, dtype=torch.bool), n, True, seed=1)
    g = ops.attraction(shares, torch.arange(4))
    for a in range(4):
        picked = second[first == a]
        m = len(picked)
        counts = torch.bincount(picked, minlength=4).double() / m
        if g[a].sum() == 0:  # member 3 solves a superset of everyone: fitness fallback
            assert a == 3
            expected = fit / fit.sum()
        else:
            expected = g[a] / g[a].sum()
            assert not torch.any(picked == a)  # g_a = 0: never its own mate
        tol = 5 * torch.sqrt(expected * (1 - expected) / m) + 1e-12
        assert torch.all((counts - expected).abs() <= tol), (a, counts, expected)


def test_without_matchmaker_both_parents_fitness_proportional() -> None:
    fit, shares = ops.niche_fitness(torch.tensor(ARCHIVE_SCORES), 1.0)
    n = 200_000
    first, second = _draw_many(fit, shares, torch.ones(4, dtype=torch.bool), n, False, seed=2)
    expected = fit / fit.sum()
    tol = 5 * torch.sqrt(expected * (1 - expected) / n)
    for draws in (first, second):
        counts = torch.bincount(draws, minlength=4).double() / n
        assert torch.all((counts - expected).abs() < tol)
    # independent draws: the pair (0, 0) occurs with probability p0^2
    both = ((first == 0) & (second == 0)).double().mean()
    assert abs(both - expected[0] ** 2) < 5 * math.sqrt(expected[0] ** 2 / n)


def test_zero_attraction_falls_back_to_fitness() -> None:
    # Member 0 dominates member 1 everywhere: g = 0 for every candidate mate of a = 0.
    scores = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    fit, shares = ops.niche_fitness(scores, 1.0)
    assert ops.attraction(shares, torch.tensor([0])).sum() == 0
    n = 100_000
    first, second = _draw_many(fit, shares, torch.tensor([True, True, False]), n, True, seed=3)
    picked = second[first == 0]
    expected = fit[0] / fit.sum()  # fitness-proportional: 0.5 / (0.5 + 1.5) ... by hand below
    assert fit.tolist() == [1.5, 0.5, 0.0]
    share0 = (picked == 0).double().mean()
    assert abs(share0 - 0.75) < 5 * math.sqrt(0.75 * 0.25 / len(picked))
    assert not torch.any(picked == 2)  # the empty slot (fitness 0) is never a parent
    assert expected == pytest.approx(0.75)


def test_zero_total_fitness_is_uniform_over_occupied() -> None:
    scores = torch.zeros(4, 3)
    fit, shares = ops.niche_fitness(scores, 1.0)
    occupied = torch.tensor([True, False, True, False])
    first, second = _draw_many(fit, shares, occupied, 20_000, True, seed=4)
    assert set(first.tolist()) == {0, 2} and set(second.tolist()) == {0, 2}
    assert abs((first == 0).double().mean() - 0.5) < 0.02


def slerp_reference(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    cos = np.dot(a / np.linalg.norm(a), b / np.linalg.norm(b))
    omega = math.acos(min(1.0, max(-1.0, cos)))
    s = math.sin(omega)
    out = np.empty_like(a)
    for d in range(len(a)):
        if s <= 1e-6:
            out[d] = (1 - t[d]) * a[d] + t[d] * b[d]
        else:
            out[d] = math.sin((1 - t[d]) * omega) / s * a[d] + math.sin(t[d] * omega) / s * b[d]
    return out


@pytest.mark.parametrize("split", [0, 3, 6])  # 0 and D - 1 = 6 are the ends
def test_split_point_slerp_matches_definition(split: int) -> None:
    rng = np.random.default_rng(split)
    a, b = rng.normal(size=7), rng.normal(size=7)
    w = 0.3
    t_ref = np.array([w if d < split else 1 - w for d in range(7)])
    t = split_point_ratios_reference(torch.tensor([w], dtype=torch.float64), torch.tensor([split]), 7)
    np.testing.assert_array_equal(t[0].numpy(), t_ref)
    child = ops.slerp(torch.tensor(a)[None], torch.tensor(b)[None], t)
    np.testing.assert_allclose(child[0].numpy(), slerp_reference(a, b, t_ref), rtol=1e-12, atol=1e-14)


def test_split_point_zero_uses_one_minus_w_everywhere() -> None:
    t = split_point_ratios_reference(torch.tensor([0.2], dtype=torch.float64), torch.tensor([0]), 5)
    assert torch.all(t == 0.8)
    t = split_point_ratios_reference(torch.tensor([0.2], dtype=torch.float64), torch.tensor([4]), 5)
    assert t[0].tolist() == [0.2, 0.2, 0.2, 0.2, 0.8]


def test_slerp_linear_fallback_for_parallel_parents() -> None:
    a = np.array([1.0, 2.0, 3.0])
    b = 2.5 * a  # same direction: Omega = 0, sin(Omega) = 0 <= 1e-6
    t = np.array([0.25, 0.25, 0.25])
    child = ops.slerp(torch.tensor(a)[None], torch.tensor(b)[None], torch.tensor(t)[None])
    np.testing.assert_allclose(child[0].numpy(), 0.75 * a + 0.25 * b, rtol=1e-12)


def test_slerp_without_split_point_is_plain_slerp() -> None:
    rng = np.random.default_rng(7)
    a, b = rng.normal(size=9), rng.normal(size=9)
    t = split_point_ratios_reference(torch.tensor([0.6], dtype=torch.float64), None, 9)
    child = ops.slerp(torch.tensor(a)[None], torch.tensor(b)[None], t)
    np.testing.assert_allclose(child[0].numpy(), slerp_reference(a, b, np.full(9, 0.6)), rtol=1e-12)


def test_slerp_endpoints_and_norm() -> None:
    # t = 0 gives a, t = 1 gives b; for unit vectors the SLERP stays on the sphere.
    a = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)
    b = torch.tensor([[0.0, 1.0, 0.0]], dtype=torch.float64)
    assert torch.allclose(ops.slerp(a, b, torch.tensor([[0.0]], dtype=torch.float64)), a)
    assert torch.allclose(ops.slerp(a, b, torch.tensor([[1.0]], dtype=torch.float64)), b)
    mid = ops.slerp(a, b, torch.tensor([[0.5]], dtype=torch.float64))
    assert torch.allclose(mid, torch.tensor([[math.sqrt(0.5), math.sqrt(0.5), 0.0]], dtype=torch.float64))


def test_crossover_draws_split_in_range() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.ones(5000, 4, dtype=torch.float64)
    b = -torch.ones(5000, 4, dtype=torch.float64)  # antiparallel: sin(Omega) = 0, linear mix
    child = crossover(a, b, g)
    # linear mix of +1 and -1 with ratio t: 1 - 2t, so t = (1 - child) / 2
    t = (1 - child) / 2
    w = t[:, 0]  # column 0 is always before the split unless split = 0
    # every row is w on a prefix and 1 - w on the rest
    prefix = torch.isclose(t, t[:, :1]).sum(1)
    assert prefix.min() >= 1 and prefix.max() <= 4
    assert 0 <= w.min() and w.max() < 1


def test_mutation_statistics() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(200_000, dtype=torch.float64)
    y = ops.mutate(x, 0.01, g)
    assert abs(y.mean().item()) < 5 * 0.01 / math.sqrt(len(x))
    assert y.std().item() == pytest.approx(0.01, rel=0.01)
    assert torch.equal(ops.mutate(x, 0.0, g), x)


def test_replace_worst_drops_lowest_fitness() -> None:
    scores = torch.tensor(ARCHIVE_SCORES)
    archive = torch.arange(4, dtype=torch.float64)[:, None].repeat(1, 3)
    occupied = torch.ones(4, dtype=torch.bool)
    child_scores = torch.tensor([0, 0, 0, 1, 0, 1], dtype=torch.float64)  # solves what nobody solves
    ref_fit, _ = niche_fitness_reference(np.vstack([ARCHIVE_SCORES, child_scores.numpy()]), 1.0)
    expected_worst = int(np.argmin(ref_fit))
    child = torch.full((3,), 9.0, dtype=torch.float64)
    worst = replace_worst(archive, scores, occupied, child, child_scores, 1.0)
    assert worst.item() == expected_worst
    assert torch.equal(archive[expected_worst], child)
    assert torch.equal(scores[expected_worst], child_scores)


def test_child_that_is_worst_leaves_archive_unchanged() -> None:
    scores = torch.tensor(ARCHIVE_SCORES)
    archive = torch.randn(4, 3, dtype=torch.float64)
    before = (archive.clone(), scores.clone())
    worst = replace_worst(
        archive, scores, torch.ones(4, dtype=torch.bool), torch.zeros(3, dtype=torch.float64),
        torch.zeros(6, dtype=torch.float64), 1.0,
    )
    assert worst.item() == 4
    assert torch.equal(archive, before[0]) and torch.equal(scores, before[1])


def test_ties_drop_the_first_minimum() -> None:
    # Rows 1 and 2 tie with the lowest fitness; the child ties too: row 1 goes.
    scores = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    archive = torch.zeros(3, 2)
    worst = replace_worst(
        archive, scores, torch.ones(3, dtype=torch.bool), torch.ones(2), torch.tensor([0.0, 0.0, 1.0]), 1.0
    )
    assert worst.item() == 1
    assert torch.equal(archive[1], torch.ones(2)) and torch.equal(archive[2], torch.zeros(2))


def test_empty_slots_fill_first() -> None:
    scores = torch.zeros(3, 2)
    archive = torch.zeros(3, 2)
    occupied = torch.zeros(3, dtype=torch.bool)
    # a child that solves nothing still takes slot 0 (all fitness 0: the first minimum)
    replace_worst(archive, scores, occupied, torch.ones(2), torch.tensor([0.0, 0.0]), 1.0)
    assert occupied.tolist() == [True, False, False]
    # the next child solves something; row 0 (fitness 0) is again the first minimum
    replace_worst(archive, scores, occupied, 2 * torch.ones(2), torch.tensor([1.0, 0.0]), 1.0)
    assert occupied.tolist() == [True, False, False]
    assert torch.equal(archive[0], 2 * torch.ones(2))
    # a third child: rows 1 and 2 (empty, fitness 0) go before row 0 (fitness 1)
    replace_worst(archive, scores, occupied, 3 * torch.ones(2), torch.tensor([0.0, 1.0]), 1.0)
    assert occupied.tolist() == [True, True, False]
    assert torch.equal(archive[1], 3 * torch.ones(2))
