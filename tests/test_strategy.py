"""M2N2Strategy: ask/tell semantics, initialisation, ablations, bad input, state."""

from __future__ import annotations

import copy

import pytest
import torch

from m2n2_lightning import MLP, M2N2Strategy
from m2n2_lightning.strategies import operators as ops

D, N = 12, 9


def random_scores(k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(k, N, generator=g) < 0.4).float()


def run(strategy: M2N2Strategy, steps: int, k: int = 1, start: int = 0) -> None:
    """Drive ask/tell with deterministic pseudo-scores (a function of the step)."""
    if not strategy.initialized:
        init = strategy.ask()
        strategy.tell(init, random_scores(len(init), 1000))
    for step in range(start, start + steps):
        children = strategy.ask(k)
        strategy.tell(children, random_scores(len(children), step))


def make(**kwargs) -> M2N2Strategy:
    return M2N2Strategy(pop_size=5, num_params=D, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"pop_size": 1}, "pop_size must be an integer >= 2, got 1"),
        ({"pop_size": 2.5}, "pop_size"),
        ({"alpha": -0.5}, "alpha must be a finite number >= 0, got -0.5"),
        ({"alpha": float("nan")}, "alpha"),
        ({"children_per_step": 0}, r"children_per_step \(k\) must be an integer >= 1, got 0"),
        ({"mutation_sigma": -0.01}, "mutation_sigma must be a finite number >= 0, got -0.01"),
        ({"init_sigma": -1.0}, "init_sigma"),
        ({"init_models": [torch.zeros(D)]}, "two or more"),
    ],
)
def test_bad_settings_raise(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        M2N2Strategy(**{"num_params": D, **kwargs})


def test_init_models_with_wrong_parameter_count_raise() -> None:
    good, bad = MLP(4, 3, 2), MLP(4, 5, 2)
    with pytest.raises(ValueError, match=r"init_models\[1\] has 37 parameters but the model being evolved has 23"):
        M2N2Strategy(init_models=[good, bad])
    with pytest.raises(ValueError, match="init_models"):
        M2N2Strategy(init_models=[torch.zeros(5), torch.zeros(5)], num_params=6)


def test_bad_tell_raises_before_any_state_changes() -> None:
    strategy = make()
    run(strategy, 3)
    before = copy.deepcopy(strategy.state_dict())
    children = strategy.ask()
    after_ask = copy.deepcopy(strategy.state_dict())
    bad_cases = [
        (children, torch.zeros(1, N + 1), "same N = 9"),
        (children, torch.zeros(2, N), r"shape \[k=1, N\]"),
        (children[:, :-1], torch.zeros(1, N), r"shape \[k, 12\]"),
        (children, torch.full((1, N), 1.5), r"\[0, 1\]"),
        (children, torch.full((1, N), -0.1), r"\[0, 1\]"),
        (children, torch.full((1, N), float("nan")), "NaN"),
    ]
    for cands, scores, match in bad_cases:
        with pytest.raises(ValueError, match=match):
            strategy.tell(cands, scores)
        state = strategy.state_dict()
        for key in ("archive", "scores", "occupied"):
            assert torch.equal(state[key], after_ask[key])
        assert strategy.forward_passes == 3
    assert torch.equal(before["archive"], after_ask["archive"])  # ask alone changes no archive
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        strategy.ask(0)


def test_init_from_scratch_two_random_members() -> None:
    strategy = M2N2Strategy(num_params=20_000, seed=3)
    init = strategy.ask(k=7)  # k is ignored until the archive is initialised
    assert init.shape == (2, 20_000)
    assert init.std().item() == pytest.approx(0.01, rel=0.02)
    strategy.tell(init, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert strategy.initialized and strategy.forward_passes == 0
    assert strategy.occupied.tolist() == [True, True] + [False] * 18
    assert torch.equal(strategy.archive[:2], init)


def test_init_from_models_inserts_them_and_does_not_mutate() -> None:
    models = [torch.full((D,), float(i + 1)) for i in range(3)]
    strategy = M2N2Strategy(pop_size=4, init_models=models)
    assert strategy.mutation_sigma == 0.0
    init = strategy.ask()
    assert torch.equal(init, torch.stack(models))
    strategy.tell(init, torch.eye(3, N))
    assert torch.equal(strategy.archive[:3], torch.stack(models))
    # children are exact SLERPs of members: no noise (parallel members: a linear mix)
    child = strategy.ask()
    # parallel members: the linear mix (1 - t) a + t b with t = w before the split, 1 - w after
    assert child.unique().numel() <= 2
    assert torch.all((child >= 1) & (child <= 3))


def test_no_crossover_no_mutation_copies_a_member() -> None:
    strategy = make(use_crossover=False, mutation_sigma=0.0)
    run(strategy, 5)
    child = strategy.ask()
    assert any(torch.equal(child[0], row) for row in strategy.archive)


def test_no_split_point_uses_one_ratio() -> None:
    # Orthogonal unit members: a SLERP child with one ratio t has |child| = 1.
    strategy = M2N2Strategy(pop_size=2, init_models=[torch.eye(D)[0], torch.eye(D)[1]], use_split_point=False)
    strategy.tell(strategy.ask(), torch.tensor([[1.0] + [0.0] * (N - 1), [0.0, 1.0] + [0.0] * (N - 2)]))
    for _ in range(20):
        child = strategy.ask()[0]
        assert child.norm().item() == pytest.approx(1.0, abs=1e-6)
        assert torch.all(child[2:] == 0)


def test_children_per_step_inserts_one_by_one_from_one_snapshot() -> None:
    strategy = make(children_per_step=4, seed=5)
    run(strategy, 2, k=4)
    archive, scores, occupied = strategy.archive.clone(), strategy.scores.clone(), strategy.occupied.clone()
    children = strategy.ask()
    assert children.shape == (4, D)
    told = random_scores(4, 77)
    strategy.tell(children, told)
    for child, child_scores in zip(children, told):
        ops.replace_worst(archive, scores, occupied, child, child_scores, 1.0)
    assert torch.equal(strategy.archive, archive) and torch.equal(strategy.scores, scores)
    assert strategy.forward_passes == 12


def test_best_member_is_highest_mean_score_first_on_ties() -> None:
    strategy = M2N2Strategy(pop_size=3, init_models=[torch.zeros(D), torch.ones(D), 2 * torch.ones(D)])
    strategy.tell(strategy.ask(), torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]))
    # row order after insertion: each model took the first minimum slot
    best = strategy.best_params()
    assert torch.equal(best, torch.ones(D))


def test_same_seed_same_result_and_other_seed_differs() -> None:
    a, b, c = make(seed=11), make(seed=11), make(seed=12)
    for s in (a, b, c):
        run(s, 40)
    assert torch.equal(a.archive, b.archive) and torch.equal(a.scores, b.scores)
    assert not torch.equal(a.archive, c.archive)


def test_state_dict_mid_run_continues_identically() -> None:
    reference = make(seed=4, children_per_step=2)
    run(reference, 10, k=2)
    state = copy.deepcopy(reference.state_dict())
    run(reference, 15, k=2, start=10)

    resumed = M2N2Strategy(pop_size=5, seed=999, children_per_step=2)  # D and N come from the state
    resumed.load_state_dict(state)
    assert resumed.forward_passes == 20 and resumed.initialized
    run(resumed, 15, k=2, start=10)
    assert torch.equal(resumed.archive, reference.archive)
    assert torch.equal(resumed.scores, reference.scores)
    assert resumed.forward_passes == reference.forward_passes == 50
    assert torch.equal(resumed.ask(), reference.ask())


def test_state_dict_survives_torch_save(tmp_path) -> None:
    strategy = make(seed=2)
    run(strategy, 5)
    torch.save(strategy.state_dict(), tmp_path / "s.pt")
    restored = make(seed=0)
    restored.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    assert torch.equal(restored.ask(), strategy.ask())


def test_ask_before_setup_explains() -> None:
    with pytest.raises(RuntimeError, match="setup"):
        M2N2Strategy().ask()
