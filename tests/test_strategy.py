"""M2N2Strategy: start/ask/tell semantics, initialisation, ablations, bad input, state; build_strategy."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from conftest import start_with_scores

from m2n2_lightning import MLP, FlatParams, MAPElitesStrategy, M2N2Strategy, Strategy
from m2n2_lightning.strategies import operators as ops
from m2n2_lightning.strategies.archive import Archive
from m2n2_lightning.strategies.base import build_strategy

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
        (children[:, :-1], torch.zeros(1, N), r"shape \[k, 12\]"),
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
    child = strategy.ask()
    # parallel members: the linear mix (1 - t) a + t b with t = w before the split, 1 - w after
    assert child.unique().numel() <= 2
    assert torch.all((child >= 1) & (child <= 3))


def test_no_crossover_no_mutation_copies_a_member() -> None:
    strategy = make(use_crossover=False, mutation_sigma=0.0)
    run(strategy, 5)
    child = strategy.ask()
    assert any(torch.equal(child[0], row) for row in strategy.archive.members)


def test_no_split_point_uses_one_ratio() -> None:
    # Orthogonal unit members: a SLERP child with one ratio t has |child| = 1.
    strategy = M2N2Strategy(
        num_params=D, pop_size=2, init_models=[torch.eye(D)[0], torch.eye(D)[1]], use_split_point=False
    )
    strategy.start(lambda init: torch.tensor([[1.0] + [0.0] * (N - 1), [0.0, 1.0] + [0.0] * (N - 2)]))
    for _ in range(20):
        child = strategy.ask()[0]
        assert child.norm().item() == pytest.approx(1.0, abs=1e-6)
        assert torch.all(child[2:] == 0)


def test_children_per_step_inserts_one_by_one_from_one_snapshot() -> None:
    strategy = make(children_per_step=4, seed=5)
    run(strategy, 2, k=4)
    archive = copy.deepcopy(strategy.archive)  # the snapshot, updated below by the rule one child at a time
    children = strategy.ask()
    assert children.shape == (4, D)
    told = random_scores(4, 77)
    strategy.tell(children, told)
    for child, child_scores in zip(children, told):
        archive.write(ops.worst_after_insert(archive.scores, child_scores, 1.0), child, child_scores)
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
    assert torch.equal(resumed.ask(), reference.ask())


def test_state_dict_survives_torch_save(tmp_path) -> None:
    strategy = make(seed=2)
    run(strategy, 5)
    torch.save(strategy.state_dict(), tmp_path / "s.pt")
    restored = make(seed=0)
    restored.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    assert torch.equal(restored.ask(), strategy.ask())


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


# ------------------------------------------------------------------------------------------ build_strategy
def test_build_strategy_returns_a_built_strategy_of_the_model_d_and_refuses_another() -> None:
    built = M2N2Strategy(num_params=D, pop_size=4)
    assert build_strategy(built, D) is built
    with pytest.raises(
        ValueError, match=rf"built for D = {D} parameters, but the model has {D + 1}; build it with num_params={D + 1}"
    ):
        build_strategy(built, D + 1)


def test_build_strategy_calls_a_factory_with_num_params_and_the_seed_models() -> None:
    calls = []

    def factory(**kwargs) -> M2N2Strategy:
        calls.append(kwargs)
        return M2N2Strategy(pop_size=3, **kwargs)

    strategy = build_strategy(factory, D)
    assert calls == [{"num_params": D}]
    assert strategy.num_params == D and strategy.pop_size == 3
    models = (torch.zeros(D), torch.ones(D))  # a tuple: the factory receives a list
    merged = build_strategy(factory, D, init_models=models)
    assert sorted(calls[1]) == ["init_models", "num_params"] and calls[1]["num_params"] == D
    assert isinstance(calls[1]["init_models"], list) and len(calls[1]["init_models"]) == 2
    assert all(torch.equal(got, want) for got, want in zip(merged.init_models, models))
    assert merged.mutation_sigma == 0.0

    partial = build_strategy(functools.partial(M2N2Strategy, pop_size=8, seed=1), D)
    assert isinstance(partial, M2N2Strategy)
    assert (partial.num_params, partial.pop_size, partial.seed) == (D, 8, 1)
    assert build_strategy(M2N2Strategy, D).settings() == M2N2Strategy(num_params=D).settings()  # the class itself


def test_build_strategy_refuses_seed_models_for_a_built_strategy() -> None:
    with pytest.raises(ValueError, match=r"pass a factory instead, e\.g\. strategy=functools\.partial\(M2N2Strategy, \.\.\.\)"):
        build_strategy(M2N2Strategy(num_params=D), D, init_models=[torch.zeros(D), torch.ones(D)])


def test_build_strategy_refuses_what_is_not_a_strategy() -> None:
    with pytest.raises(ValueError, match="returned object, not a Strategy"):
        build_strategy(lambda num_params: object(), D)
    with pytest.raises(ValueError, match="must be a Strategy or a factory returning one, got 3"):
        build_strategy(3, D)


def test_build_strategy_gives_the_layout_to_factories_that_take_one() -> None:
    flat = FlatParams(MLP(3, 4, 2))  # w1 [3, 4] is entries 0-11, then b1, w2, b2 up to 26
    strategy = build_strategy(functools.partial(M2N2Strategy, chromosomes=["w1"]), flat.num_params, layout=flat.layout)
    assert strategy.chromosomes.groups == (((0, 12),), ((12, 26),))
    calls = []

    def factory(num_params: int) -> M2N2Strategy:
        calls.append(num_params)
        return M2N2Strategy(num_params=num_params)

    assert build_strategy(factory, flat.num_params, layout=flat.layout).num_params == 26
    assert calls == [26]


def test_seed_models_given_as_one_tensor_are_the_rows() -> None:
    models = torch.stack([torch.full((D,), float(i + 1)) for i in range(3)])  # [3, D]: three seed models
    strategy = M2N2Strategy(num_params=D, pop_size=4, init_models=models)
    assert strategy.mutation_sigma == 0.0
    assert torch.equal(start_with_scores(strategy, torch.eye(3, N)), models)


# ------------------------------------------------------------------------------------------------- Archive
def started_archive() -> Archive:
    """Archive(4, 3) with N = 5 and two rows written by hand: slot 2 = 7s, slot 0 = -1s."""
    archive = Archive(4, 3)
    archive.allocate(5)
    archive.write(torch.tensor(2), torch.full((3,), 7.0), torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0]))
    archive.write(torch.tensor(0), torch.full((3,), -1.0), torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0]))
    archive.write(torch.tensor(4), torch.full((3,), 9.0), torch.ones(5))  # slot P: the newcomer lost
    archive.write(torch.tensor(1), torch.full((3,), 9.0), torch.ones(5), accept=torch.tensor(False))
    return archive


def test_archive_allocate_and_write_by_hand() -> None:
    archive = Archive(4, 3)
    assert archive.num_resources == 0 and archive.scores.shape == (4, 0) and not archive.occupied.any()
    archive = started_archive()
    assert archive.num_resources == 5
    assert archive.occupied.tolist() == [True, False, True, False]
    expected = torch.tensor([[-1.0] * 3, [0.0] * 3, [7.0] * 3, [0.0] * 3])
    assert torch.equal(archive.members, expected)
    assert archive.scores.sum(dim=1).tolist() == [1.0, 0.0, 3.0, 0.0]
    assert torch.equal(archive.rows(torch.tensor([2, 0])), expected[[2, 0]])


def test_unstarted_archive_takes_n_from_a_started_archives_state_dict() -> None:
    state = copy.deepcopy(started_archive().state_dict())
    fresh = Archive(4, 3)
    fresh.load_state_dict(state)
    assert fresh.num_resources == 5
    for name in ("members", "scores", "occupied"):
        assert torch.equal(getattr(fresh, name), state[name]), name
    # and continues like the original
    original = started_archive()
    for archive in (original, fresh):
        archive.write(torch.tensor(3), torch.full((3,), 4.0), torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0]))
    assert torch.equal(fresh.members, original.members) and torch.equal(fresh.scores, original.scores)


def test_archive_state_dict_of_another_n_or_capacity_is_refused() -> None:
    state = started_archive().state_dict()
    other_n = Archive(4, 3)
    other_n.allocate(6)  # started with N = 6: keeps it and refuses N = 5
    with pytest.raises(RuntimeError, match="size mismatch for scores"):
        other_n.load_state_dict(state)
    with pytest.raises(RuntimeError, match="size mismatch for members"):
        Archive(5, 3).load_state_dict(state)
