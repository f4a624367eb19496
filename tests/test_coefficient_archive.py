"""The archive storages: members as mixtures of the seeds ("coefficients") against the dense archive, and the
dense members in host memory or a memory-mapped file ("host", "mmap"), bit for bit against "dense"."""

from __future__ import annotations

import io
import math

import pytest
import torch

from m2n2_lightning import M2N2Strategy
from m2n2_lightning.strategies.archive import HostArchive

#: Parameter layout for the chromosome runs: the "attn*" group interleaves with the rest.
LAYOUT = [("w1", 700), ("attn1", 300), ("w2", 500), ("attn2", 200), ("b", 300)]
D = sum(numel for _, numel in LAYOUT)
N = 12


def seed_models(k: int, dim: int = D) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + k)
    return [torch.randn(dim, generator=generator, dtype=torch.float64) + 0.3 * i for i in range(k)]


def told_scores(generator: torch.Generator, rows: int, kind: str) -> torch.Tensor:
    """Random 0/1 or continuous scores in [0, 1] (some exact zeros), the same for both archives."""
    scores = torch.rand(rows, N, generator=generator, dtype=torch.float64)
    if kind == "binary":
        return (scores < 0.5).double()
    return torch.where(scores < 0.2, 0.0, scores)


def pair(k: int, **settings) -> tuple[M2N2Strategy, M2N2Strategy]:
    """The same float64 run with dense and with coefficient storage."""
    seeds = seed_models(k)
    dense, coefficients = (
        M2N2Strategy(D, init_models=seeds, storage=storage, **settings).double() for storage in ("dense", "coefficients")
    )
    return dense, coefficients


def assert_same_members(dense: M2N2Strategy, coefficients: M2N2Strategy) -> None:
    slots = torch.arange(dense.pop_size)
    torch.testing.assert_close(coefficients.archive.rows(slots), dense.archive.rows(slots), rtol=1e-9, atol=1e-9)


def run_side_by_side(dense: M2N2Strategy, coefficients: M2N2Strategy, steps: int, kind: str, seed: int) -> None:
    """Ask both, tell both the same scores; children, decisions and members must agree throughout."""
    generator = torch.Generator().manual_seed(seed)
    first = told_scores(generator, len(dense.init_models), kind)
    dense.start(lambda members: first)
    coefficients.start(lambda members: first)
    for step in range(steps):
        children, mixtures = dense.ask(), coefficients.ask()
        torch.testing.assert_close(mixtures.dense(), children.dense(), rtol=1e-9, atol=1e-9)
        scores = told_scores(generator, len(children), kind)
        dropped = [int(s._dropped_row(scores[0])) for s in (dense, coefficients)]
        assert dropped[0] == dropped[1]
        dense.tell(children, scores)
        coefficients.tell(mixtures, scores)
        assert torch.equal(dense.scores, coefficients.scores) and torch.equal(dense.occupied, coefficients.occupied)
        if step % 100 == 99:
            assert_same_members(dense, coefficients)
    assert torch.equal(dense.generator.get_state(), coefficients.generator.get_state())


@pytest.mark.parametrize(
    ("k", "chromosomes", "kind"),
    [
        (2, None, "binary"),
        (3, None, "continuous"),
        (2, "whole", "continuous"),
        (3, "whole", "binary"),
        (2, "per_part", "binary"),
        (3, "per_part", "continuous"),
    ],
)
def test_coefficients_make_the_dense_archives_run(k: int, chromosomes: str | None, kind: str) -> None:
    settings = {} if chromosomes is None else {"chromosomes": ["attn*"], "layout": LAYOUT, "slerp_angle": chromosomes}
    dense, coefficients = pair(k, pop_size=15, seed=k, **settings)
    run_side_by_side(dense, coefficients, 300, kind, seed=len(settings) + k)


@pytest.mark.parametrize(
    "settings",
    [
        {"use_split_point": False},
        {"children_per_step": 3, "warmup_steps": 30},
        {"use_crossover": False, "warmup_steps": 10},
        {"alpha": 0.0, "use_matchmaker": False, "capacity": "max", "score_shift": True},
    ],
)
def test_coefficients_follow_the_switches(settings: dict) -> None:
    dense, coefficients = pair(3, pop_size=6, seed=5, **settings)
    run_side_by_side(dense, coefficients, 100, "continuous", seed=9)
    assert_same_members(dense, coefficients)


def test_a_resumed_coefficient_archive_continues_exactly() -> None:
    seeds = seed_models(3)
    settings = {"pop_size": 8, "init_models": seeds, "storage": "coefficients"}
    settings.update(chromosomes=["attn*"], layout=LAYOUT)
    whole = M2N2Strategy(D, seed=2, **settings).double()
    generator = torch.Generator().manual_seed(4)
    whole.start(lambda members: told_scores(generator, len(members), "binary"))
    for _ in range(120):
        children = whole.ask()
        whole.tell(children, told_scores(generator, 1, "binary"))
    buffer = io.BytesIO()
    torch.save(whole.state_dict(), buffer)
    buffer.seek(0)
    resumed = M2N2Strategy(D, seed=2, **settings).double()
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for _ in range(120):
        children, again = whole.ask(), resumed.ask()
        assert torch.equal(children.dense(), again.dense())
        scores = told_scores(generator, 1, "binary")
        whole.tell(children, scores)
        resumed.tell(again, scores)
    slots = torch.arange(8)
    assert torch.equal(whole.archive.rows(slots), resumed.archive.rows(slots))
    assert torch.equal(whole.generator.get_state(), resumed.generator.get_state())
    assert torch.equal(whole.scores, resumed.scores)


def checkpoint_bytes(strategy: M2N2Strategy) -> int:
    buffer = io.BytesIO()
    torch.save(strategy.state_dict(), buffer)
    return len(buffer.getvalue())


def test_the_coefficient_checkpoint_is_kilobytes() -> None:
    dim, pop = 10_000, 15
    seeds = seed_models(2, dim)
    strategies = [M2N2Strategy(dim, pop_size=pop, init_models=seeds, storage=s) for s in ("dense", "coefficients")]
    generator = torch.Generator().manual_seed(0)
    first = told_scores(generator, 2, "binary").float()
    for strategy in strategies:
        strategy.start(lambda members: first)
    for _ in range(300):
        scores = told_scores(generator, 1, "binary").float()
        for strategy in strategies:
            strategy.tell(strategy.ask(), scores)
    dense, coefficients = (checkpoint_bytes(strategy) for strategy in strategies)
    assert dense > pop * dim * 4
    assert coefficients < 64 * 1024


def test_refusals() -> None:
    seeds = seed_models(2)
    with pytest.raises(ValueError, match="mutated children"):
        M2N2Strategy(D, init_models=seeds, mutation_sigma=0.01, storage="coefficients")
    with pytest.raises(ValueError, match="give init_models"):
        M2N2Strategy(D, storage="coefficients")
    with pytest.raises(ValueError, match="storage must be one of"):
        M2N2Strategy(D, storage="disk")
    with pytest.raises(ValueError, match="storage_dir"):
        M2N2Strategy(D, storage_dir="/tmp")
    strategy = M2N2Strategy(D, pop_size=4, init_models=seeds, storage="coefficients")
    strategy.start(lambda members: torch.eye(2, N))
    state = strategy.state_dict()
    other = M2N2Strategy(D, pop_size=4, init_models=seed_models(2, D)[::-1], storage="coefficients")
    with pytest.raises(ValueError, match="other seed models"):
        other.load_state_dict(state)
    nudged = [seed.clone() for seed in seeds]  # one value one ulp away: the SHA-256 of the seeds' bytes differs
    nudged[1][0] = torch.nextafter(nudged[1][0], torch.tensor(math.inf, dtype=torch.float64))
    with pytest.raises(ValueError, match="other seed models"):
        M2N2Strategy(D, pop_size=4, init_models=nudged, storage="coefficients").load_state_dict(state)
    child = strategy.ask()
    # a coefficient archive stores only its own children: neither a tensor of values nor another archive's children
    with pytest.raises(ValueError, match="stores only the children it made"):
        strategy.tell(child.dense() + 1, torch.ones(1, N))
    twin = M2N2Strategy(D, pop_size=4, init_models=seeds, storage="coefficients")
    twin.start(lambda members: torch.eye(2, N))
    with pytest.raises(ValueError, match="stores only the children it made"):
        strategy.tell(twin.ask(), torch.ones(1, N))
    assert strategy.forward_passes == 0 and strategy.occupied.sum() == 2


@pytest.mark.parametrize("storage", ["host", "mmap"])
def test_host_and_mapped_members_are_bit_identical_to_dense(storage: str, tmp_path) -> None:
    extra = {"storage_dir": str(tmp_path)} if storage == "mmap" else {}
    dense = M2N2Strategy(500, pop_size=6, seed=3).double()
    other = M2N2Strategy(500, pop_size=6, seed=3, storage=storage, **extra).double()
    assert isinstance(other.archive, HostArchive) and other.archive.members.dtype == torch.float64
    assert list(tmp_path.iterdir()) == []  # the mapped file is unlinked at once
    generator = torch.Generator().manual_seed(1)
    first = told_scores(generator, 2, "binary")
    dense.start(lambda members: first)
    other.start(lambda members: first)
    for _ in range(60):
        children = dense.ask()
        assert torch.equal(children.dense(), other.ask().dense())
        scores = told_scores(generator, 1, "binary")
        dense.tell(children, scores)
        other.tell(children, scores)
    assert torch.equal(dense.archive.members, other.archive.members)
    state = dense.state_dict()
    assert state.keys() == other.state_dict().keys()
    resumed = M2N2Strategy(500, pop_size=6, seed=3, storage=storage, **extra).double()
    resumed.load_state_dict(state)  # a dense checkpoint resumes in host or mapped storage
    assert torch.equal(resumed.ask().dense(), dense.ask().dense())


def test_host_members_stay_on_the_host() -> None:
    strategy = M2N2Strategy(40, pop_size=3, storage="host").to("meta")
    archive = strategy.archive
    assert archive.members.device.type == "cpu" and archive.scores.device.type == "meta"
    assert strategy.device.type == "meta"
    assert archive.like.device.type == "meta" and archive.like.dtype == torch.float32
