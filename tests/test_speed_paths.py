"""Every fast path of the strategies (ask, sampling, crossover, mutation, archive writes, the Archive's host and
device paths) and eager score validation, against the plain computation it replaces (float64 where the path allows
it). The forward and scoring paths are in test_speed_paths_forward.py."""

from __future__ import annotations

import pytest
import torch
from conftest import archive_of, split_point_ratios_reference

from m2n2_lightning import M2N2Strategy
from m2n2_lightning.strategies import operators as ops
from m2n2_lightning.strategies.archive import Archive
from m2n2_lightning.strategies.children import Children


# ------------------------------------------------------------------ the plain M2N2 step, written out
def plain_categorical(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse CDF with the guard of the first implementation (the last positive entry on round-up)."""
    weights = weights.expand(u.shape[0], -1) if weights.dim() == 1 else weights
    cdf = weights.cumsum(-1)
    index = torch.searchsorted(cdf, u.to(cdf.dtype)[:, None] * cdf[:, -1:], right=True)[:, 0]
    last_positive = weights.shape[-1] - 1 - (weights > 0).flip(-1).to(torch.int8).argmax(-1)
    return torch.minimum(index, last_positive)


def plain_ask(archive: torch.Tensor, scores: torch.Tensor, occupied: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
    """docs/ALGORITHM.md's ask, formula by formula, drawing the same numbers in the same order."""
    taken = scores.sum(0)
    shares = scores / torch.where(taken > 0, taken, torch.ones_like(taken))
    fitness = shares.sum(1)
    u = torch.rand(k, 2, generator=g)
    by_fitness = fitness if fitness.sum() > 0 else occupied.to(fitness.dtype)
    first = plain_categorical(by_fitness, u[:, 0])
    gain = (shares[None] - shares[first][:, None]).clamp_min(0).sum(-1)
    gain = torch.where(gain.sum(-1, keepdim=True) <= 0, by_fitness.expand_as(gain), gain)
    second = plain_categorical(gain, u[:, 1])
    a, b = archive[first], archive[second]
    dim = a.shape[1]
    split = torch.randint(0, dim, (k,), generator=g)
    w = torch.rand(k, generator=g, dtype=a.dtype)
    t = torch.where(torch.arange(dim) < split[:, None], w[:, None], 1 - w[:, None])
    cos = (a * b).sum(-1, keepdim=True) / (a.norm(dim=-1, keepdim=True) * b.norm(dim=-1, keepdim=True))
    omega = torch.arccos(cos.clamp(-1, 1))
    sin = torch.sin(omega)
    child = torch.where(
        sin > ops.SLERP_EPS, (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / sin, (1 - t) * a + t * b
    )
    return child + 0.01 * torch.randn(child.shape, generator=g, dtype=child.dtype)


def test_strategy_steps_equal_the_plain_formulas_float64() -> None:
    """Same parents, split points, ratios and noise as the formulas: the random stream is unchanged."""
    D, N, P = 40, 30, 6
    strategy = M2N2Strategy(pop_size=P, num_params=D, seed=7).double()
    g = torch.Generator().manual_seed(7)
    truth = torch.Generator().manual_seed(99)
    initial = []
    strategy.start(lambda members: initial.append(members.dense()) or (torch.rand(2, N, generator=truth) < 0.3).double())
    assert torch.equal(initial[0], 0.01 * torch.randn(2, D, generator=g, dtype=torch.float64))
    for step in range(150):
        k = 1 + step % 3
        archive, scores, occupied = strategy.archive.members.clone(), strategy.scores.clone(), strategy.occupied.clone()
        children = strategy.ask(k)
        torch.testing.assert_close(children.dense(), plain_ask(archive, scores, occupied, k, g), rtol=1e-12, atol=1e-15)
        strategy.tell(children, (torch.rand(k, N, generator=truth) < 0.3).double())


def test_sample_categorical_matches_the_plain_guard() -> None:
    g = torch.Generator().manual_seed(0)
    weights = torch.rand(500, 8, generator=g) * (torch.rand(500, 8, generator=g) < 0.6)
    weights[:, 0] += 0.1  # a positive entry in every row; zeros anywhere else, trailing ones included
    u = torch.rand(500 * 40, generator=g)
    u[:2] = torch.tensor([0.0, 1 - 2**-24])  # the ends of [0, 1)
    rows = weights.repeat(40, 1)
    got = ops.sample_categorical(rows, u)
    assert torch.equal(got, plain_categorical(rows, u))
    assert torch.all(rows.gather(1, got[:, None]) > 0)
    # u * total rounding up to total: the last positive entry, never a trailing zero
    edge = torch.tensor([[1.0, 3.0, 0.0, 0.0]])
    assert ops.sample_categorical(edge, torch.tensor([1.0])).tolist() == [1]


def test_crossover_two_value_weights_equal_per_entry_slerp_float64() -> None:
    a = torch.randn(6, 50, dtype=torch.float64)
    b = torch.randn(6, 50, dtype=torch.float64)
    b[0] = 3 * a[0]  # parallel pair: the linear mix
    archive = archive_of(torch.cat([a, b]))
    first, second = torch.arange(6), torch.arange(6, 12)
    for use_split_point in (True, False):
        g = torch.Generator().manual_seed(4)
        split, weight = ops.crossover_draws(6, 50, g, use_split_point, archive.like)
        child = archive.crossover(first, second, split, weight).dense()
        g = torch.Generator().manual_seed(4)
        split = torch.randint(0, 50, (6,), generator=g) if use_split_point else None
        w = torch.rand(6, generator=g, dtype=torch.float64)
        expected = ops.slerp(a, b, split_point_ratios_reference(w, split, 50))
        torch.testing.assert_close(child, expected, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_slices_equal_device_masks_bitwise(dtype: torch.dtype) -> None:
    """The CPU crossover (host split points, slices) is the device one (masks) bit for bit."""
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(5, 1000, generator=g, dtype=dtype), torch.randn(5, 1000, generator=g, dtype=dtype)
    coef_a, coef_b = ops.slerp_weights(ops.cosine(a, b), torch.rand(5, 2, generator=g, dtype=dtype))
    split = torch.tensor([0, 1, 17, 999, 500])  # both ends, and cuts off the vector-width grid
    by_mask = ops.combine_by_mask(a, b, coef_a, coef_b, split)
    assert torch.equal(ops.combine_by_slices(a, b, coef_a, coef_b, split.tolist()), by_mask)
    assert torch.equal(by_mask[0], coef_a[0, 1] * a[0] + coef_b[0, 1] * b[0])  # split 0: all "after"


def test_cpu_row_copies_equal_device_selects(monkeypatch) -> None:
    """`Archive.write` on the host (row copies) and the device path (masked selects) write the same."""
    scores0 = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    cases = [(torch.tensor([0.0, 1.0, 0.0]), None), (torch.zeros(3), None), (torch.tensor([1.0, 0.0, 1.0]), torch.tensor(False))]
    for child_scores, accept in cases:
        results = []
        for host_side in (True, False):
            monkeypatch.setattr(Archive, "host_side", property(lambda self, value=host_side: value))
            archive = archive_of(torch.arange(6.0).reshape(3, 2))
            archive.allocate(3)
            archive.scores.copy_(scores0)
            archive.occupied.copy_(torch.tensor([True, True, False]))
            worst = ops.worst_after_insert(archive.scores, child_scores, 1.0)
            archive.write(worst, Children.of(torch.full((1, 2), 9.0)), 0, child_scores, accept)
            results.append((archive.members, archive.scores, archive.occupied))
        for host, device in zip(*results):
            assert torch.equal(host, device)


def test_mutation_draws_exactly_sigma_times_randn() -> None:
    x = torch.randn(3, 1000)
    got = ops.mutate(x, 0.01, torch.Generator().manual_seed(1))
    assert torch.equal(got, x + 0.01 * torch.randn(3, 1000, generator=torch.Generator().manual_seed(1)))


# ------------------------------------------------------------------------------- score validation
def test_eager_validation_reports_range() -> None:
    strategy = M2N2Strategy(pop_size=4, num_params=5)
    with pytest.raises(ValueError, match=r"\[0, 1\], got values in \[-0.5, 1.0\]"):
        strategy.start(lambda members: torch.tensor([[-0.5, 1.0], [0.0, 1.0]]))
    assert not strategy.started
    with pytest.raises(ValueError, match="NaN"):
        strategy.start(lambda members: torch.tensor([[float("nan"), 1.0], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="validate_scores"):
        M2N2Strategy(num_params=5, validate_scores="later")


# ------------------------------------------------------------ the Archive's host path against its device path
def force_device_path(monkeypatch) -> None:
    """Make every Archive take its accelerator path (masks, no host reads) on the CPU."""
    monkeypatch.setattr(Archive, "host_side", property(lambda self: False))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_archive_crossover_by_slices_equals_by_mask_bitwise(monkeypatch, dtype: torch.dtype) -> None:
    """`Archive.crossover` on the host (host split points, slices) and its device path (masks) agree bit for bit."""
    g = torch.Generator().manual_seed(5)
    members = torch.randn(8, 1000, generator=g, dtype=dtype)
    members[7] = 2 * members[6]  # a parallel pair: the linear mix
    archive = archive_of(members)
    first, second = torch.tensor([0, 1, 2, 3, 6, 5]), torch.tensor([4, 5, 2, 7, 7, 0])  # (2, 2): a self-pair
    split, weight = ops.crossover_draws(6, 1000, g, True, archive.like)
    split[:3] = torch.tensor([0, 999, 1])  # both ends
    used = []
    for name in ("combine_by_slices", "combine_by_mask"):
        original = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *args, _f=original, _n=name: used.append(_n) or _f(*args))
    on_host = archive.crossover(first, second, split, weight).dense()
    force_device_path(monkeypatch)
    on_device = archive.crossover(first, second, split, weight).dense()
    assert used == ["combine_by_slices", "combine_by_mask"]  # each path ran once
    assert torch.equal(on_host, on_device)
    # and both are the per-entry SLERP of the definition
    expected = ops.slerp(members[first], members[second], split_point_ratios_reference(weight[:, 0], split, 1000))
    torch.testing.assert_close(on_host, expected, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=1e-6)


def drive(strategy, steps: int, n: int) -> None:
    """Start and step `strategy` with pseudo-scores that depend only on the step."""
    truth = torch.Generator().manual_seed(31)
    strategy.start(lambda members: (torch.rand(len(members), n, generator=truth) < 0.3).float())
    for step in range(steps):
        children = strategy.ask(1 + step % 3)
        strategy.tell(children, (torch.rand(len(children), n, generator=truth) < 0.3 + 0.4 * step / steps).float())


@pytest.mark.parametrize("kind", ["m2n2", "map_elites"])
def test_whole_runs_on_the_device_path_equal_the_host_path_bitwise(monkeypatch, kind: str) -> None:
    from m2n2_lightning import MAPElitesStrategy

    def make():
        if kind == "m2n2":
            return M2N2Strategy(num_params=64, pop_size=6, seed=3)
        return MAPElitesStrategy(num_params=64, bins=4, descriptor_labels=torch.arange(20) % 10, seed=3)

    host = make()
    drive(host, 120, 20)
    force_device_path(monkeypatch)
    device = make()
    assert not device.archive.host_side
    drive(device, 120, 20)
    for name in ("members", "scores", "occupied"):
        assert torch.equal(getattr(host.archive, name), getattr(device.archive, name)), name
    assert host.occupied.sum() >= 3 and host.forward_passes == device.forward_passes == 240
    assert torch.equal(host.ask().dense(), device.ask().dense())
