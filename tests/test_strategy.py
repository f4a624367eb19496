"""M2N2Strategy: start/ask/tell semantics, initialisation, ablations, bad input, state."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import start_with_scores

from m2n2_lightning import MLP, M2N2Strategy, MAPElitesStrategy, Strategy
from m2n2_lightning.strategies import operators as ops

D, N = 12, 9


def random_scores(k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(k, N, generator=g) < 0.4).float()


def run(strategy: M2N2Strategy, steps: int, k: int = 1, start: int = 0) -> None:
    """Drive ask/tell with deterministic pseudo-scores (a function of the step)."""
    if not strategy.started:
        strategy.start(lambda init: random_scores(len(init), 1000))
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
        M2N2Strategy(num_params=23, init_models=[good, bad])
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
        (children.dense()[:, :-1], torch.zeros(1, N), r"D = 12 parameters, got 11"),
        (children, torch.full((1, N), 1.5), r"\[0, 1\]"),
        (children, torch.full((1, N), -0.1), r"\[0, 1\]"),
        (children, torch.full((1, N), float("nan")), "NaN"),
    ]
    for cands, scores, match in bad_cases:
        with pytest.raises(ValueError, match=match):
            strategy.tell(cands, scores)
        state = strategy.state_dict()
        for key in ("archive.members", "archive.scores", "archive.occupied"):
            assert torch.equal(state[key], after_ask[key])
        assert strategy.forward_passes == 3
    assert torch.equal(before["archive.members"], after_ask["archive.members"])  # ask alone changes no archive
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        strategy.ask(0)


def test_init_from_scratch_two_random_members() -> None:
    strategy = M2N2Strategy(num_params=20_000, seed=3)
    init = start_with_scores(strategy, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert init.shape == (2, 20_000)
    assert init.std().item() == pytest.approx(0.01, rel=0.02)
    assert strategy.started and strategy.forward_passes == 0
    assert strategy.occupied.tolist() == [True, True] + [False] * 18
    assert torch.equal(strategy.archive.members[:2], init)


def test_init_from_models_inserts_them_and_does_not_mutate() -> None:
    models = [torch.full((D,), float(i + 1)) for i in range(3)]
    strategy = M2N2Strategy(num_params=D, pop_size=4, init_models=models)
    assert strategy.mutation_sigma == 0.0
    init = start_with_scores(strategy, torch.eye(3, N))
    assert torch.equal(init, torch.stack(models))
    assert torch.equal(strategy.archive.members[:3], torch.stack(models))
    # children are exact SLERPs of members: no noise (parallel members: a linear mix)
    child = strategy.ask().dense()
    # parallel members: the linear mix (1 - t) a + t b with t = w before the split, 1 - w after
    assert child.unique().numel() <= 2
    assert torch.all((child >= 1) & (child <= 3))


def test_seed_models_given_as_one_tensor_are_the_rows() -> None:
    models = torch.stack([torch.full((D,), float(i + 1)) for i in range(3)])  # [3, D]: three seed models
    strategy = M2N2Strategy(num_params=D, pop_size=4, init_models=models)
    assert strategy.mutation_sigma == 0.0
    assert torch.equal(start_with_scores(strategy, torch.eye(3, N)), models)


def test_no_crossover_no_mutation_copies_a_member() -> None:
    strategy = make(use_crossover=False, mutation_sigma=0.0)
    run(strategy, 5)
    child = strategy.ask().dense()
    assert any(torch.equal(child[0], row) for row in strategy.archive.members)


def test_no_split_point_uses_one_ratio() -> None:
    # Orthogonal unit members: a SLERP child with one ratio t has |child| = 1.
    strategy = M2N2Strategy(
        num_params=D, pop_size=2, init_models=[torch.eye(D)[0], torch.eye(D)[1]], use_split_point=False
    )
    strategy.start(lambda init: torch.tensor([[1.0] + [0.0] * (N - 1), [0.0, 1.0] + [0.0] * (N - 2)]))
    for _ in range(20):
        child = strategy.ask().dense()[0]
        assert child.norm().item() == pytest.approx(1.0, abs=1e-6)
        assert torch.all(child[2:] == 0)


def test_children_per_step_inserts_one_by_one_from_one_snapshot() -> None:
    strategy = make(children_per_step=4, seed=5)
    run(strategy, 2, k=4)
    archive = copy.deepcopy(strategy.archive)  # the snapshot, updated below by the rule one child at a time
    children = strategy.ask()
    assert len(children) == 4 and children.dense().shape == (4, D)
    told = random_scores(4, 77)
    strategy.tell(children, told)
    for row, child_scores in enumerate(told):
        archive.write(ops.worst_after_insert(archive.scores, child_scores, 1.0), children, row, child_scores)
    assert torch.equal(strategy.archive.members, archive.members) and torch.equal(strategy.scores, archive.scores)
    assert torch.equal(strategy.occupied, archive.occupied)
    assert strategy.forward_passes == 12


def test_best_member_is_highest_mean_score_first_on_ties() -> None:
    strategy = M2N2Strategy(num_params=D, pop_size=3, init_models=[torch.zeros(D), torch.ones(D), 2 * torch.ones(D)])
    strategy.start(lambda init: torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]))
    # row order after insertion: each model took the first minimum slot
    best = strategy.best_params()
    assert torch.equal(best, torch.ones(D))


def test_same_seed_same_result_and_other_seed_differs() -> None:
    a, b, c = make(seed=11), make(seed=11), make(seed=12)
    for s in (a, b, c):
        run(s, 40)
    assert torch.equal(a.archive.members, b.archive.members) and torch.equal(a.scores, b.scores)
    assert not torch.equal(a.archive.members, c.archive.members)


def test_state_dict_mid_run_continues_identically() -> None:
    reference = make(seed=4, children_per_step=2)
    run(reference, 10, k=2)
    state = copy.deepcopy(reference.state_dict())
    run(reference, 15, k=2, start=10)

    resumed = M2N2Strategy(num_params=D, pop_size=5, seed=999, children_per_step=2)  # N comes from the state
    resumed.load_state_dict(state)
    assert resumed.forward_passes == 20 and resumed.started and resumed.num_resources == N
    run(resumed, 15, k=2, start=10)
    assert torch.equal(resumed.archive.members, reference.archive.members)
    assert torch.equal(resumed.scores, reference.scores)
    assert resumed.forward_passes == reference.forward_passes == 50
    assert torch.equal(resumed.ask().dense(), reference.ask().dense())


def test_state_dict_survives_torch_save(tmp_path) -> None:
    strategy = make(seed=2)
    run(strategy, 5)
    torch.save(strategy.state_dict(), tmp_path / "s.pt")
    restored = make(seed=0)
    restored.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    assert torch.equal(restored.ask().dense(), strategy.ask().dense())


def test_ask_before_start_explains() -> None:
    with pytest.raises(RuntimeError, match=r"has not started: call start\(score\) before ask\(\)"):
        M2N2Strategy(num_params=D).ask()


def test_tell_and_best_params_before_start_explain() -> None:
    strategy = M2N2Strategy(num_params=D)
    with pytest.raises(RuntimeError, match=r"has not started: call start\(score\) before tell\(\)"):
        strategy.tell(torch.zeros(1, D), torch.zeros(1, N))
    with pytest.raises(RuntimeError, match=r"call start\(score\) first"):
        strategy.best_params()
    assert not strategy.started and strategy.forward_passes == 0


def test_start_twice_raises_and_changes_nothing() -> None:
    strategy = make(seed=3)
    run(strategy, 4)
    before = copy.deepcopy(strategy.state_dict())
    calls = []
    with pytest.raises(RuntimeError, match="M2N2Strategy has already started"):
        strategy.start(lambda init: calls.append(init) or random_scores(len(init), 5))
    assert calls == []  # the score function is not even called
    after = strategy.state_dict()
    for key in ("archive.members", "archive.scores", "archive.occupied"):
        assert torch.equal(after[key], before[key])
    assert torch.equal(after["_extra_state"]["rng_state"], before["_extra_state"]["rng_state"])
    assert strategy.forward_passes == 4


BAD_START_SCORES = [
    (torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), r"NaN \(candidates \[0\]\)"),
    (torch.tensor([[1.0, 0.0], [1.5, 1.0]]), r"\[0, 1\], got values in \[0.0, 1.5\]"),
    (torch.tensor([[-0.5, 1.0], [0.0, 1.0]]), r"\[0, 1\], got values in \[-0.5, 1.0\]"),
]


@pytest.mark.parametrize(("scores", "match"), BAD_START_SCORES)
def test_start_with_bad_scores_leaves_the_strategy_unstarted(scores, match) -> None:
    strategy = make(seed=6)
    before = copy.deepcopy(strategy.state_dict())
    with pytest.raises(ValueError, match=match):
        strategy.start(lambda init: scores)
    assert not strategy.started and strategy.num_resources is None and strategy.forward_passes == 0
    after = strategy.state_dict()
    for key in ("archive.members", "archive.scores", "archive.occupied"):
        assert torch.equal(after[key], before[key]), key
    assert after["archive.scores"].shape == (5, 0) and not after["archive.occupied"].any()
    with pytest.raises(RuntimeError, match="has not started"):
        strategy.ask()


@pytest.mark.parametrize(("scores", "match"), BAD_START_SCORES[:2])
def test_start_with_bad_scores_leaves_the_random_stream_unchanged(scores, match) -> None:
    """A failed start is as if it never happened: a retry draws the members a fresh strategy draws."""
    strategy, fresh = make(seed=6), make(seed=6)
    rng_before = strategy.generator.get_state()
    with pytest.raises(ValueError, match=match):
        strategy.start(lambda init: scores)
    assert torch.equal(strategy.generator.get_state(), rng_before)
    good = torch.tensor([[1.0] + [0.0] * (N - 1), [0.0, 1.0] + [0.0] * (N - 2)])
    assert torch.equal(start_with_scores(strategy, good), start_with_scores(fresh, good))
    run(strategy, 5)
    run(fresh, 5)
    assert torch.equal(strategy.archive.members, fresh.archive.members)


@pytest.mark.parametrize("rows", [1, 3])
def test_start_with_scores_for_another_number_of_members_raises(rows: int) -> None:
    # start() scores the two initial members: scores [1, N] or [3, N] cannot be theirs.
    strategy = make()
    with pytest.raises(ValueError, match=r"shape \[k=2, N\]"):
        strategy.start(lambda init: torch.zeros(rows, N))
    assert not strategy.started and not strategy.occupied.any()


def test_state_dict_of_another_d_is_refused() -> None:
    strategy = make()
    run(strategy, 2)
    with pytest.raises(ValueError, match=rf"the saved strategy has D = {D}, this one D = {D + 1}"):
        M2N2Strategy(num_params=D + 1, pop_size=5).load_state_dict(strategy.state_dict())


def test_strategies_are_strategies_but_map_elites_is_not_m2n2() -> None:
    assert issubclass(M2N2Strategy, Strategy) and issubclass(MAPElitesStrategy, Strategy)
    assert not issubclass(MAPElitesStrategy, M2N2Strategy)
