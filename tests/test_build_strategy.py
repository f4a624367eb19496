"""build_strategy: a built strategy, a factory or the class becomes the Strategy for the model's D (and its
seed models and layout), and anything else is refused with the fix."""

from __future__ import annotations

import functools

import pytest
import torch

from m2n2_lightning import MLP, FlatParams, M2N2Strategy
from m2n2_lightning.strategies.base import build_strategy

D = 12  # the model's parameter count in these tests


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
