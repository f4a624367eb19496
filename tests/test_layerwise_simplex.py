"""`LayerwiseSimplexStrategy`: CMA-ES over K - 1 coordinates per layer mapped to mixing weights over K seeds.
The map against a hand computation, the merge against per-group weighted sums in float64, that it optimises,
exact resume with the seeds checked, its errors, its Hydra config and a K = 4 run through M2N2Callback."""

from __future__ import annotations

import functools
import io
import math

import pytest
import torch
from conftest import make_trainer
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint

from m2n2_lightning import (
    LayerwiseSimplexStrategy,
    LayerwiseSlerpStrategy,
    M2N2Callback,
)
from m2n2_lightning.params import FlatParams
from m2n2_lightning.strategies.base import build_strategy
from m2n2_lightning.strategies.layerwise_simplex import (
    helmert_basis,
    simplex_coordinates,
    simplex_weights,
)

pytest.importorskip("transformers")
from test_hf_merge import LanguageModule, tiny_gpt2
from test_layerwise_slerp import DIM, GROUP_OF, LAYOUT
from test_sources import gpt2
from test_train import compose_config

K = 4
#: The flat-vector indices of each of the three groups of LAYOUT.
GROUP_INDEX = [[i for i, (name, numel) in enumerate(n for n in LAYOUT for _ in range(n[1])) if GROUP_OF[name] == g]
               for g in range(3)]  # fmt: skip


def random_seeds(dtype: torch.dtype = torch.float64, count: int = K) -> list[torch.Tensor]:
    return list(torch.randn(count, DIM, generator=torch.Generator().manual_seed(11), dtype=torch.float64).to(dtype))


def make(seeds=None, **kwargs) -> LayerwiseSimplexStrategy:
    seeds = random_seeds() if seeds is None else seeds
    return LayerwiseSimplexStrategy(num_params=DIM, init_models=seeds, layout=LAYOUT, **kwargs)


def started(**kwargs) -> LayerwiseSimplexStrategy:
    strategy = make(**kwargs)
    strategy.start(lambda candidates: torch.zeros(len(candidates), 1))
    return strategy


def hand_weights(x: list[float]) -> list[float]:
    """softmax(H x) with the Helmert columns written out for K = 3 and K = 4, in Python floats."""
    columns = {
        3: [[1 / math.sqrt(2), -1 / math.sqrt(2), 0.0], [1 / math.sqrt(6), 1 / math.sqrt(6), -2 / math.sqrt(6)]],
        4: [[1 / math.sqrt(2), -1 / math.sqrt(2), 0.0, 0.0], [1 / math.sqrt(6), 1 / math.sqrt(6), -2 / math.sqrt(6), 0.0],
            [1 / math.sqrt(12), 1 / math.sqrt(12), 1 / math.sqrt(12), -3 / math.sqrt(12)]],
    }[len(x) + 1]  # fmt: skip
    logits = [sum(c * column[k] for c, column in zip(x, columns)) for k in range(len(x) + 1)]
    exps = [math.exp(v) for v in logits]
    return [e / sum(exps) for e in exps]


def test_map_from_coordinates_to_weights_against_a_hand_computation() -> None:
    for x in ([0.3, -1.2], [0.0, 0.0], [2.5, 0.7, -1.9], [-0.4, 3.0, 0.25]):
        basis = helmert_basis(len(x) + 1)
        got = simplex_weights(torch.tensor(x, dtype=torch.float64), basis)
        assert got.dtype == torch.float64
        assert got.tolist() == pytest.approx(hand_weights(x), rel=1e-14, abs=0)
        assert simplex_coordinates(got, basis).tolist() == pytest.approx(x, abs=1e-13)  # and back
    assert simplex_weights(torch.zeros(3, dtype=torch.float64), helmert_basis(4)).tolist() == [0.25] * 4
    # Scaled weights give the same coordinates (the map ignores the scale of w).
    w = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    assert torch.allclose(simplex_coordinates(w, helmert_basis(4)), simplex_coordinates(5 * w, helmert_basis(4)))
    # Orthonormal and sum-zero: isotropic steps in x are isotropic steps of the centred logits.
    basis = helmert_basis(5)
    assert torch.allclose(basis.mT @ basis, torch.eye(4, dtype=torch.float64), atol=1e-15)
    assert torch.allclose(basis.sum(dim=0), torch.zeros(4, dtype=torch.float64), atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_child_is_the_per_group_weighted_sum_of_the_seeds(dtype: torch.dtype) -> None:
    seeds = random_seeds(dtype)
    strategy = make(seeds)
    assert strategy.coefficient_shape == (3, K - 1)
    coordinates = torch.randn(5, 3, K - 1, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 1.5
    got = strategy.merge(coordinates).dense()
    assert got.dtype == dtype and got.shape == (5, DIM)
    reference = [[float(v) for v in seed.double()] for seed in seeds]  # the seeds' values as written, in float64
    tolerance = 1e-12 if dtype == torch.float64 else 1e-6
    for row, x in zip(got.double().tolist(), coordinates.tolist()):
        for g in range(3):
            w = hand_weights(x[g])
            want = [sum(w[k] * reference[k][i] for k in range(K)) for i in GROUP_INDEX[g]]
            assert [row[i] for i in GROUP_INDEX[g]] == pytest.approx(want, rel=tolerance, abs=tolerance), g


def scores_peaking_at(weights: torch.Tensor, seeds: list[torch.Tensor]):
    """Per-group scores exp(-8 |c_g - m_g|^2 / s_g), m = sum_k weights[g, k] seed_k on group g, s_g = the
    seeds' mean squared norm there: mean 1 only at the target merge."""
    stacked = torch.stack(seeds)

    def score(candidates: torch.Tensor) -> torch.Tensor:
        columns = []
        for g, index in enumerate(GROUP_INDEX):
            target = weights[g] @ stacked[:, index]
            scale = stacked[:, index].square().sum(dim=1).mean()
            columns.append(torch.exp(-8 * (candidates[:, index] - target).square().sum(dim=1) / scale))
        return torch.stack(columns, dim=1)

    return score


def run(strategy: LayerwiseSimplexStrategy, score, generations: int) -> list[torch.Tensor]:
    asked = []
    for _ in range(generations):
        asked.append(strategy.ask())
        strategy.tell(asked[-1], score(asked[-1].dense()))
    return asked


TARGET = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.1, 0.1], [0.25, 0.05, 0.05, 0.65]], dtype=torch.float64)


def test_optimises_towards_known_weights() -> None:
    strategy = started(popsize=12, seed=1)
    score = scores_peaking_at(TARGET, random_seeds())
    start = score(strategy.best_params()[None]).mean().item()  # the uniform average, before any tell
    assert strategy.best_weights().tolist() == [[0.25] * K] * 3
    run(strategy, score, generations=60)
    assert strategy.forward_passes == 720 and strategy.num_resources == 3
    assert strategy.search.best_score.item() > max(0.99, start)
    assert torch.allclose(strategy.best_weights(), TARGET, atol=0.02)
    assert torch.allclose(strategy.best_weights().sum(dim=1), torch.ones(3, dtype=torch.float64))


def test_state_dict_round_trip_mid_run_continues_bit_identically() -> None:
    score = scores_peaking_at(TARGET, random_seeds())
    first = started(popsize=6, seed=3)
    run(first, score, generations=3)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    # The checkpoint holds the inner CMA-ES and the seeds' Gram entries [G, K(K+1)/2], nothing of size D.
    assert state["gram"].shape == (3, K * (K + 1) // 2)
    assert "seeds" not in state and not any(DIM in v.shape for v in state.values() if isinstance(v, torch.Tensor))
    assert state["search.C"].shape == (3 * (K - 1), 3 * (K - 1))
    second = make(popsize=6, seed=99)  # the seed comes back from the state too
    second.load_state_dict(state)
    expected, got = run(first, score, generations=3), run(second, score, generations=3)
    assert all(torch.equal(x.dense(), y.dense()) for x, y in zip(expected, got))
    assert torch.equal(first.best_params(), second.best_params()) and second.forward_passes == 36
    assert second.settings() == first.settings()
    seeds = random_seeds()
    with pytest.raises(ValueError, match="not those the saved LayerwiseSimplexStrategy"):
        make([seeds[1], seeds[0], *seeds[2:]], popsize=6).load_state_dict(state)
    with pytest.raises(ValueError, match="num_seeds = 4, this one 3"):
        make(seeds[:3], popsize=6).load_state_dict(state)
    with pytest.raises(ValueError, match="LayerwiseSimplexStrategy's, not a LayerwiseSlerpStrategy's"):
        LayerwiseSlerpStrategy(DIM, init_models=seeds[:2], layout=LAYOUT, popsize=6).load_state_dict(state)


def test_x0_starts_at_given_weights_and_errors() -> None:
    strategy = started(x0=[1.0, 2.0, 3.0, 4.0])  # normalised: 0.1, 0.2, 0.3, 0.4 on every group
    assert torch.allclose(strategy.best_weights(), TARGET[:1].expand(3, K), atol=1e-15)
    strategy = started(x0=TARGET.tolist())
    assert torch.allclose(strategy.best_weights(), TARGET, atol=1e-15)
    for x0 in ([0.5, 0.5], [0.0, 0.2, 0.3, 0.5], [[0.25] * K] * 2, "uniform", [math.nan] * K):
        with pytest.raises(ValueError, match="x0 must be None .* positive weights over the 4 seeds"):
            make(x0=x0)
    with pytest.raises(ValueError, match="K >= 2 seed models, got 1"):
        make(random_seeds()[:1])
    with pytest.raises(ValueError, match="merges K >= 2 seed models: pass init_models"):
        LayerwiseSimplexStrategy(num_params=DIM, layout=LAYOUT)
    with pytest.raises(ValueError, match=r"coefficients must have shape \[k, 3, 3\]"):
        make().merge(torch.zeros(2, 3))


def test_hydra_config_builds_it_for_four_seeds() -> None:
    seeds = [gpt2(seed=i) for i in range(1, K + 1)]
    flat = FlatParams(seeds[0])
    cfg = compose_config("strategy=cmaes_layerwise_simplex", "seed=4")
    built = build_strategy(instantiate(cfg.strategy), flat.num_params, init_models=seeds, layout=flat.layout)
    assert isinstance(built, LayerwiseSimplexStrategy)
    assert built.settings() == {"seed": 4, "num_params": flat.num_params, "popsize": 25, "sigma0": 1.0, "x0": None,
                                "groups": "layers", "num_groups": 3, "num_seeds": K}  # fmt: skip
    assert built.search.num_params == 3 * (K - 1) and built.candidates_per_step == 25


def test_four_seed_run_through_m2n2_callback_improves_on_the_uniform_average(tmp_path) -> None:
    seeds = []
    for i in range(1, K + 1):
        seeds.append(tmp_path / f"seed_{i}")
        tiny_gpt2(i).save_pretrained(seeds[-1])
    vectors = [FlatParams(m).flatten(m).double() for m in (LanguageModule(tiny_gpt2(i)) for i in range(1, K + 1))]
    flat = FlatParams(LanguageModule(tiny_gpt2(1)))
    groups = {"model.transformer.h.0": 0, "model.transformer.h.1": 1}
    owner = torch.tensor([g for name, numel in flat.layout
                          for g in [next((v for k, v in groups.items() if name.startswith(k + ".")), 2)] * numel])
    target = torch.zeros(flat.num_params, dtype=torch.float64)
    for g in range(3):  # TARGET's weights on each group, by hand
        target[owner == g] = sum(TARGET[g, k] * vectors[k][owner == g] for k in range(K))

    def closeness(module: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        """Resource g scores how near the module's group g is to the target merge's (the simple score)."""
        values = flat.flatten(module).double()
        scale = (torch.stack(vectors) - sum(vectors) / K).square().mean(dim=0)  # the seeds' spread (LN's 1s: 0)
        return torch.stack([torch.exp(-8 * (values - target)[owner == g].square().sum() / scale[owner == g].sum())
                            for g in batch.tolist()]).float()  # fmt: skip

    def fit(name: str, ckpt_path=None) -> tuple[LanguageModule, M2N2Callback]:
        module = LanguageModule(tiny_gpt2(K + 1))
        callback = M2N2Callback(strategy=functools.partial(LayerwiseSimplexStrategy, popsize=8, seed=0),
                                init_from=seeds, evaluate=closeness, resources=list(range(3)), resource_batch_size=3)
        saver = ModelCheckpoint(dirpath=tmp_path / name, every_n_train_steps=5, save_top_k=-1)
        make_trainer(tmp_path, 15, [callback, saver], enable_checkpointing=True).fit(module, ckpt_path=ckpt_path)
        return module, callback

    module, callback = fit("whole")
    strategy = callback.strategy
    assert isinstance(strategy, LayerwiseSimplexStrategy) and strategy.num_seeds == K
    assert strategy.group_names == ["model.transformer.h.0", "model.transformer.h.1", "rest"]
    assert strategy.forward_passes == 120
    # The module ends holding the best merge, scoring better than the uniform average of the four seeds.
    assert torch.equal(flat.flatten(module), strategy.best_params())
    best = closeness(module, torch.arange(3)).double().mean().item()
    assert best == pytest.approx(strategy.search.best_score.item(), abs=1e-6)
    module.model.load_state_dict(LanguageModule(tiny_gpt2(1)).model.state_dict())
    flat.load_into(module, strategy.merge(torch.zeros(1, 3, K - 1)).dense()[0])
    uniform = closeness(module, torch.arange(3)).double().mean().item()
    assert best > uniform + 0.1, (best, uniform)
    # Resumed from the checkpoint of step 5 (onto other weights), it ends where the whole run did.
    resumed, resumed_callback = fit("resumed", ckpt_path=next((tmp_path / "whole").glob("*-step=5.ckpt")))
    assert resumed_callback.strategy.forward_passes == 120
    assert torch.equal(resumed_callback.strategy.best_params(), strategy.best_params())
    assert torch.equal(flat.flatten(resumed), strategy.best_params())
    for key, value in strategy.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(resumed_callback.strategy.state_dict()[key], value), key
