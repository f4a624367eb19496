"""`LayerwiseSlerpStrategy`: CMA-ES over one SLERP coefficient per layer between two seeds (the paper's LLM
baseline): its groups on real GPT-2 / Llama names, the merge map against the SLERP formula in float64, that it
optimises, exact resume, its errors, its Hydra config and a run through M2N2Callback."""

from __future__ import annotations

import functools
import io
import math

import pytest
import torch
from conftest import make_trainer
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint

from m2n2_lightning import LayerwiseSlerpStrategy, M2N2Callback
from m2n2_lightning.params import FlatParams
from m2n2_lightning.strategies.base import build_strategy, rolled_back_on_error

pytest.importorskip("transformers")
from test_hf_merge import PROMPTS, LanguageModule, generated_first_token, tiny_gpt2
from test_sources import Wrapper, gpt2, llama
from test_train import compose_config

GPT2_LAYER = ["ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
              "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight",
              "mlp.c_proj.bias"]  # fmt: skip
LLAMA_LAYER = ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
               "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
               "input_layernorm.weight", "post_attention_layernorm.weight"]  # fmt: skip

# A synthetic model: "rest" in two pieces around the layers, and group "blocks.layers.1" with b parallel to a.
LAYOUT = [("embed.weight", 40), ("blocks.layers.0.w", 12), ("blocks.layers.0.b", 3), ("blocks.layers.1.w", 9),
          ("norm.weight", 6)]  # fmt: skip
GROUP_OF = {"embed.weight": 2, "blocks.layers.0.w": 0, "blocks.layers.0.b": 0, "blocks.layers.1.w": 1, "norm.weight": 2}
DIM = sum(numel for _, numel in LAYOUT)


def synthetic_seeds(dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    a, b = torch.randn(2, DIM, generator=generator, dtype=dtype)
    b[55:64] = 2 * a[55:64]  # blocks.layers.1.w: the same direction, Omega = 0 (the linear mix)
    return [a, b]


def make(seeds=None, **kwargs) -> LayerwiseSlerpStrategy:
    seeds = synthetic_seeds() if seeds is None else seeds
    return LayerwiseSlerpStrategy(num_params=DIM, init_models=seeds, layout=LAYOUT, **kwargs)


def started(**kwargs) -> LayerwiseSlerpStrategy:
    strategy = make(**kwargs)
    strategy.start(lambda candidates: torch.zeros(len(candidates), 1))
    return strategy


def expected_groups(prefix: str, layer: list[str], layers: int, rest: list[str]) -> dict[str, list[str]]:
    return {f"{prefix}.{i}": [f"{prefix}.{i}.{name}" for name in layer] for i in range(layers)} | {"rest": rest}


@pytest.mark.parametrize("case", ["gpt2", "gpt2_in_lightning", "llama"])
def test_layers_on_real_names_against_hand_built_groups(case: str) -> None:
    if case == "llama":
        a, b = llama(seed=1, layers=2), llama(seed=2, layers=2)
        expected = expected_groups("model.layers", LLAMA_LAYER, 2, ["model.embed_tokens.weight", "model.norm.weight",
                                                                      "lm_head.weight"])  # fmt: skip
    else:
        a, b = gpt2(seed=1, n_layer=3), gpt2(seed=2, n_layer=3)
        expected = expected_groups("transformer.h", GPT2_LAYER, 3, ["transformer.wte.weight", "transformer.wpe.weight",
                                                                    "transformer.ln_f.weight", "transformer.ln_f.bias"])
        if case == "gpt2_in_lightning":  # a LightningModule holding it: every name gains "model."
            a, b = Wrapper(a), Wrapper(b)
            expected = {(g if g == "rest" else f"model.{g}"): [f"model.{n}" for n in v] for g, v in expected.items()}
    flat = FlatParams(a)
    assert sorted(flat.names) == sorted(sum(expected.values(), []))
    strategy = LayerwiseSlerpStrategy(num_params=flat.num_params, init_models=[a, b], layout=flat.layout)
    assert strategy.group_names == list(expected)
    seed_a, seed_b = flat.unflatten(flat.flatten(a)), flat.unflatten(flat.flatten(b))
    for g, members in enumerate(expected.values()):  # coefficient 1 on group g alone: b there, a everywhere else
        merged = flat.unflatten(strategy.merge(torch.eye(len(expected))[g : g + 1]).dense()[0])
        for name in flat.names:
            assert torch.equal(merged[name], (seed_b if name in members else seed_a)[name]), (g, name)


def slerp_reference(a: list[float], b: list[float], t: float) -> list[float]:
    """docs/ALGORITHM.md's SLERP of a and b at ratio t, one angle for the two vectors, in Python floats."""
    cos = sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))
    omega = math.acos(max(-1.0, min(1.0, cos)))
    if math.sin(omega) <= 1e-6:
        return [(1 - t) * x + t * y for x, y in zip(a, b)]
    return [(math.sin((1 - t) * omega) * x + math.sin(t * omega) * y) / math.sin(omega) for x, y in zip(a, b)]


def test_merge_is_the_slerp_of_each_group_coordinate_by_coordinate() -> None:
    a, b = synthetic_seeds()
    strategy = make([a, b])
    coefficients = torch.rand(6, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 1.6 - 0.3
    got = strategy.merge(coefficients).dense()
    assert got.dtype == torch.float64 and got.shape == (6, DIM)
    offsets, start = {}, 0
    for name, numel in LAYOUT:
        offsets[name], start = range(start, start + numel), start + numel
    for row, t in zip(got.tolist(), coefficients.tolist()):
        for g in range(3):
            index = [i for name, span in offsets.items() if GROUP_OF[name] == g for i in span]
            u = min(1.0, max(0.0, t[g]))  # the coefficient clipped to [0, 1]
            want = slerp_reference([a[i].item() for i in index], [b[i].item() for i in index], u)
            assert [row[i] for i in index] == pytest.approx(want, rel=1e-12, abs=1e-12), g


def test_coefficients_zero_and_one_give_the_seeds_exactly() -> None:
    a, b = gpt2(seed=1), gpt2(seed=2)
    flat = FlatParams(a)
    strategy = LayerwiseSlerpStrategy(num_params=flat.num_params, init_models=[a, b], layout=flat.layout)
    ends = strategy.merge(torch.tensor([[0.0] * 3, [1.0] * 3, [-0.4] * 3, [1.7] * 3])).dense()
    assert ends.dtype == torch.float32
    for row, seed in zip(ends, (a, b, a, b)):
        assert torch.equal(row, flat.flatten(seed))


def scores_peaking_at(target: torch.Tensor, seeds: list[torch.Tensor]):
    """Per-group scores exp(-8 |c_g - m_g|^2 / |a_g - b_g|^2), m = the merge at `target`: mean 1 only there."""
    truth = make(seeds).merge(target[None]).dense()[0]
    masks = [torch.tensor([GROUP_OF[name] == g for name, numel in LAYOUT for _ in range(numel)]) for g in range(3)]

    def score(candidates: torch.Tensor) -> torch.Tensor:
        columns = []
        for mask in masks:
            scale = (seeds[0][mask] - seeds[1][mask]).square().sum()
            columns.append(torch.exp(-8 * (candidates[:, mask] - truth[mask]).square().sum(dim=1) / scale))
        return torch.stack(columns, dim=1)

    return score


def run(strategy: LayerwiseSlerpStrategy, score, generations: int) -> list[torch.Tensor]:
    asked = []
    for _ in range(generations):
        asked.append(strategy.ask())
        strategy.tell(asked[-1], score(asked[-1].dense()))
    return asked


def test_optimises_towards_known_coefficients() -> None:
    target = torch.tensor([0.2, 0.65, 1.0], dtype=torch.float64)  # the last on a bound: reached through the clip
    strategy = started(popsize=10, seed=1)
    run(strategy, scores_peaking_at(target, synthetic_seeds()), generations=40)
    assert strategy.forward_passes == 400 and strategy.num_resources == 3
    assert torch.allclose(strategy.best_coefficients(), target, atol=0.005)
    scores, fitness = strategy.population()
    assert scores.shape == (10, 3) and torch.equal(fitness, scores.mean(dim=1))


def test_state_dict_round_trip_mid_run_continues_bit_identically() -> None:
    score = scores_peaking_at(torch.tensor([0.3, 0.8, 0.5], dtype=torch.float64), synthetic_seeds())
    first = started(popsize=6, seed=3)
    run(first, score, generations=3)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    # The checkpoint holds the inner CMA-ES and the seeds' fingerprint, nothing of size D.
    assert not any(key == "seeds" or key.startswith("seed_") for key in state)
    assert max(v.numel() for v in state.values() if isinstance(v, torch.Tensor)) < DIM
    second = make(popsize=6, seed=99)  # the seed comes back from the state too
    second.load_state_dict(state)
    expected, got = run(first, score, generations=3), run(second, score, generations=3)
    assert all(torch.equal(x.dense(), y.dense()) for x, y in zip(expected, got))
    assert torch.equal(first.best_params(), second.best_params()) and second.forward_passes == 36
    assert second.settings() == first.settings()
    with pytest.raises(ValueError, match="not those the saved"):
        make(synthetic_seeds()[::-1], popsize=6).load_state_dict(state)
    with pytest.raises(ValueError, match="popsize = 6, this one 25"):
        make().load_state_dict(state)
    with pytest.raises(ValueError, match="group_names"):
        make(groups=["embed|norm", "layers"], popsize=6).load_state_dict(state)


def test_generator_is_the_inner_searchs_so_a_rolled_back_step_repeats() -> None:
    strategy, fresh = started(popsize=4), started(popsize=4)
    with pytest.raises(KeyboardInterrupt), rolled_back_on_error(strategy.generator):
        strategy.ask()
        raise KeyboardInterrupt
    assert torch.equal(strategy.ask().dense(), fresh.ask().dense())


def test_seed_layout_and_setting_errors() -> None:
    a, b = synthetic_seeds()
    with pytest.raises(ValueError, match="exactly two seed models: pass init_models"):
        LayerwiseSlerpStrategy(num_params=DIM, layout=LAYOUT)
    for seeds, count in (([a], 1), ([a, b, a], 3), (a, 1)):
        with pytest.raises(ValueError, match=f"exactly two seed models, got {count}"):
            make(seeds)
    with pytest.raises(ValueError, match=rf"init_models\[1\] has {DIM - 1} .* D = {DIM}"):
        make([a, b[1:]])
    with pytest.raises(ValueError, match="non-finite"):
        make([a, torch.full_like(b, math.inf)])
    with pytest.raises(ValueError, match="needs layout"):
        LayerwiseSlerpStrategy(num_params=DIM, init_models=[a, b])
    with pytest.raises(ValueError, match=f"layout covers {DIM - 6} parameters, but D = {DIM}"):
        LayerwiseSlerpStrategy(num_params=DIM, init_models=[a, b], layout=LAYOUT[:-1])
    for x0 in (1.5, [0.5, 0.5], "0.5", True):
        with pytest.raises(ValueError, match="x0 must be one value or 3 values"):
            make(x0=x0)
    with pytest.raises(ValueError, match="popsize must be an integer >= 2"):
        make(popsize=1)


def test_group_errors() -> None:
    bad_groups = {
        r"'blocks.layers.0.w' matches the group patterns \['layers', 'layers\\\\.0'\]":
            ["layers", r"layers\.0", "embed|norm"],
        r"\['nothing'\] match no parameter": ["layers", "embed|norm", "nothing"],
        r"\['embed.weight', 'norm.weight'\] match no group pattern": ["layers"],
        "not a valid regular expression": ["("],
        "must be 'layers' or a list": "blocks",
    }  # fmt: skip
    for message, groups in bad_groups.items():
        with pytest.raises(ValueError, match=message):
            make(groups=groups)
    with pytest.raises(ValueError, match="found no parameter name with '.layers.<i>.' or '.h.<i>.'"):
        LayerwiseSlerpStrategy(num_params=3, init_models=[torch.ones(3), torch.ones(3)], layout=[("w", 3)])


def test_tell_errors_change_nothing() -> None:
    strategy = started(popsize=4)
    with pytest.raises(RuntimeError, match="nothing was asked"):
        strategy.tell(torch.zeros(4, DIM, dtype=torch.float64), torch.zeros(4, 1))
    candidates = strategy.ask()
    with pytest.raises(ValueError, match="takes the 4 candidates of the last ask"):
        strategy.tell(candidates.dense()[:3], torch.zeros(3, 1))
    with pytest.raises(ValueError, match=r"scores must lie in \[0, 1\]"):
        strategy.tell(candidates, torch.full((4, 1), 2.0))
    assert strategy.search.generation == 0 and strategy.forward_passes == 0  # refused tells changed nothing


def test_hydra_config_builds_it() -> None:
    a, b = gpt2(seed=1), gpt2(seed=2)
    flat = FlatParams(a)
    cfg = compose_config("strategy=cmaes_layerwise_slerp", "seed=4")
    built = build_strategy(instantiate(cfg.strategy), flat.num_params, init_models=[a, b], layout=flat.layout)
    assert isinstance(built, LayerwiseSlerpStrategy)
    assert built.settings() == {"seed": 4, "num_params": flat.num_params, "popsize": 25, "sigma0": 0.2, "x0": 0.5,
                                "groups": "layers", "num_groups": 3}  # fmt: skip
    cfg = compose_config("strategy=cmaes_layerwise_slerp", "strategy.x0=[0.1,0.2,0.3]", "strategy.popsize=6")
    built = build_strategy(instantiate(cfg.strategy), flat.num_params, init_models=[a, b], layout=flat.layout)
    built.start(lambda candidates: torch.zeros(len(candidates), 1))
    assert built.best_coefficients().tolist() == [0.1, 0.2, 0.3] and built.candidates_per_step == 6


def test_runs_through_m2n2_callback_and_resumes_exactly(tmp_path) -> None:
    seeds = []
    for i in (1, 2):
        seeds.append(tmp_path / f"seed_{i}")
        tiny_gpt2(i).save_pretrained(seeds[-1])

    def fit(name: str, ckpt_path=None) -> tuple[LanguageModule, M2N2Callback]:
        module = LanguageModule(tiny_gpt2(3))
        callback = M2N2Callback(strategy=functools.partial(LayerwiseSlerpStrategy, popsize=4, seed=0), init_from=seeds,
                                evaluate=generated_first_token, resources=PROMPTS, resource_batch_size=5)  # fmt: skip
        saver = ModelCheckpoint(dirpath=tmp_path / name, every_n_train_steps=2, save_top_k=-1)
        make_trainer(tmp_path, 4, [callback, saver], enable_checkpointing=True).fit(module, ckpt_path=ckpt_path)
        return module, callback

    module, callback = fit("whole")
    strategy, flat = callback.strategy, callback.engine.flat
    assert isinstance(strategy, LayerwiseSlerpStrategy)
    assert strategy.group_names == ["model.transformer.h.0", "model.transformer.h.1", "rest"]
    assert strategy.forward_passes == 16 and strategy.num_resources == len(PROMPTS)
    for seed_vector, i in ((strategy.seeds[0], 1), (strategy.seeds[1], 2)):  # the seeds, in init_from's order
        assert torch.equal(seed_vector, flat.flatten(LanguageModule(tiny_gpt2(i))))
    # The module ends holding the best merge, and its score is the best told, recomputed here.
    assert torch.equal(flat.flatten(module), strategy.best_params())
    module.eval()
    collate = torch.utils.data.default_collate
    recomputed = torch.cat([generated_first_token(module, collate(PROMPTS[s : s + 5])) for s in range(0, 12, 5)])
    assert recomputed.mean().item() == pytest.approx(strategy.search.best_score.item(), abs=1e-6)
    # Resumed from the checkpoint of step 2 (onto other weights), it ends where the whole run did.
    resumed, resumed_callback = fit("resumed", ckpt_path=tmp_path / "whole" / "epoch=0-step=2.ckpt")
    state, expected = resumed_callback.strategy.state_dict(), strategy.state_dict()
    assert state.keys() == expected.keys() and resumed_callback.strategy.forward_passes == 16
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(state[key], value), key
    assert torch.equal(flat.flatten(resumed), flat.flatten(module))
