"""The gradient baseline of the LM merge (m2n2_lightning/lm/gradient.py): budget, determinism, training data only."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from m2n2_lightning.lm.gradient import (
    batch_schedule,
    gradient_fine_tune,
    train_run,
    warmup_cosine,
)
from m2n2_lightning.lm.tasks import SKILLS, TOKENIZER, prompt_sets
from m2n2_lightning.tasks.base import TaskSet
from m2n2_lightning.tasks.skills import SkillTask


def tiny_model(seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=TOKENIZER.vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                         pad_token_id=TOKENIZER.pad_id, bos_token_id=TOKENIZER.bos_id, eos_token_id=TOKENIZER.eos_id)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


TRAIN = prompt_sets(SKILLS["add"])[0][:7] + prompt_sets(SKILLS["rev"])[0][:3]  # N = 10 training pairs
TESTS = {"add": prompt_sets(SKILLS["add"])[1][:2], "copy": prompt_sets(SKILLS["copy"])[1][:2]}


class Recorder:
    """The skills' encoder, recording every batch of prompts it is asked to encode (all the loop ever trains on)."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []

    def __call__(self, prompts, answers):
        self.batches.append(list(prompts))
        return TOKENIZER.batch_train(prompts, answers)


def weight_norm(model: torch.nn.Module, data: object) -> float:
    """A cheap stand-in test_fn (no generation): the parameters' norm."""
    return float(sum(p.detach().double().pow(2).sum() for p in model.parameters()).sqrt())


def test_batch_schedule_spends_the_budget_exactly_in_whole_epochs():
    batches = list(batch_schedule(10, 25, 4, seed=3))
    assert [len(b) for b in batches] == [4, 4, 4, 4, 4, 4, 1]  # 25 = 6 x 4 + 1: the last batch cut short
    stream = [i for b in batches for i in b]
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))  # each epoch all once
    assert stream[:10] != stream[10:20]  # reshuffled each epoch
    assert len(set(stream[20:])) == 5
    assert batches == list(batch_schedule(10, 25, 4, seed=3))
    assert batches != list(batch_schedule(10, 25, 4, seed=4))


@pytest.mark.parametrize("bad", [{"n": 0}, {"example_passes": 0}, {"batch_size": 0}])
def test_batch_schedule_refuses_an_empty_budget(bad):
    with pytest.raises(ValueError):
        next(batch_schedule(**{"n": 10, "example_passes": 5, "batch_size": 2, "seed": 0, **bad}))


def test_warmup_cosine_by_hand():
    f = warmup_cosine(40)  # warm-up of 2 steps
    assert f(0) == pytest.approx(0.5)
    assert f(1) == pytest.approx(0.5 * (1 + math.cos(math.pi / 40)))
    assert f(20) == pytest.approx(0.5)
    assert f(40) == pytest.approx(0.0)


def test_steps_and_test_points_follow_the_budget():
    encode = Recorder()
    model = tiny_model()
    points, at = train_run(model, TRAIN, {"norm": None}, example_passes=33, lr=1e-3, test_fn=weight_norm,
                           batch_size=4, test_every=1, encode=encode)
    sizes = [len(b) for b in encode.batches]
    assert sizes == [4] * 8 + [1] and sum(sizes) == 33  # ceil(33 / 4) = 9 steps
    # At the start, after the steps that complete 10, 20 and 30 passes (12, 20, 32), and at the end (33).
    assert at == [0, 12, 20, 32, 33]
    assert [p.forward_passes for p in points] == [0, 1, 2, 3, 3]
    assert points[0].test["norm"] == pytest.approx(weight_norm(tiny_model(), None))
    assert points[-1].test["norm"] == pytest.approx(weight_norm(model, None))
    assert points[0].wall_seconds == 0.0 and all(a.wall_seconds < b.wall_seconds for a, b in itertools.pairwise(points))


def test_trains_only_on_the_training_pairs():
    encode = Recorder()
    tasks = TaskSet({"skills": SkillTask(train=["add", "rev"], test=["add", "rev", "copy"])}, 50).load()
    loader = tasks.loader()
    pairs = [example for _, example in loader.dataset]
    assert len(pairs) == 200
    train_run(tiny_model(), pairs, {}, example_passes=500, lr=1e-3, batch_size=64, encode=encode)
    seen = [p for b in encode.batches for p in b]
    assert len(seen) == 500 and set(seen[:200]) == {p for p, _ in pairs}  # the first epoch: every pair once
    test_prompts = {p for _, examples in tasks.test_sets().values() for p, _ in examples}
    assert not set(seen) & test_prompts


def test_same_seed_same_weights():
    def run(seed: int) -> list[torch.Tensor]:
        model = tiny_model()
        gradient_fine_tune(model, TRAIN, {}, example_passes=30, test_fn=weight_norm, lrs=(1e-3,), batch_size=4,
                           seed=seed)
        return [p.detach().clone() for p in model.parameters()]

    first, again, other = run(0), run(0), run(1)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))  # another shuffle: other weights


def test_grid_keeps_the_best_training_score_and_reports_each():
    start = tiny_model()
    initial = {k: v.clone() for k, v in start.state_dict().items()}
    lrs = (1e-4, 1e-2, 1e-3)
    result = gradient_fine_tune(start, TRAIN, {"norm": None}, example_passes=30, test_fn=weight_norm, lrs=lrs,
                                batch_size=4, train_data=None)
    # Each grid point from the start weights, alone: the same runs done one by one.
    alone = {}
    for lr in lrs:
        model = tiny_model()
        train_run(model, TRAIN, {}, 30, lr, batch_size=4)
        alone[lr] = weight_norm(model, None)
    chosen = max(lrs, key=lambda lr: alone[lr])
    assert result.settings["lr"] == chosen
    assert {lr: run["train"] for lr, run in result.settings["grid"].items()} == pytest.approx(alone)
    assert weight_norm(start, None) == pytest.approx(alone[chosen])  # the module holds the chosen run
    assert not torch.equal(start.state_dict()["lm_head.weight"], initial["lm_head.weight"])
    assert result.train == pytest.approx(alone[chosen]) and result.test["norm"] == pytest.approx(alone[chosen])
    assert result.forward_passes == 3  # 30 example passes over 10 pairs: 3 evaluation-equivalents
    s = result.settings
    assert (s["steps"], s["example_passes"], s["forward_pass_equivalents"], s["grid_example_passes"]) == (8, 30, 90, 90)


def test_exact_match_on_real_prompts():
    """The default test_fn (exact match of greedy generation) scores the tests and the training pairs."""
    result = gradient_fine_tune(tiny_model(), TRAIN[:2], TESTS, example_passes=4, lrs=(1e-3,), batch_size=2)
    assert set(result.test) == {"add", "copy"}
    assert all(v in (0.0, 0.5, 1.0) for v in [*result.test.values(), result.train])  # 2 prompts each


@pytest.mark.parametrize("bad", [{"pairs": []}, {"lrs": ()}, {"lrs": (0.0,)}, {"example_passes": 0}])
def test_refuses_bad_input(bad):
    args = {"pairs": TRAIN, "lrs": (1e-3,), "example_passes": 10}
    with pytest.raises(ValueError):
        gradient_fine_tune(tiny_model(), tests={}, test_fn=weight_norm, **{**args, **bad})


def load_benchmark():
    """benchmarks/gradient_lm.py as a module (the baselines compare_lm.py runs)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gradient_lm.py"
    spec = importlib.util.spec_from_file_location("gradient_lm", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_compare_baseline_spends_evaluations_times_prompts(tmp_path):
    from types import SimpleNamespace

    bench = load_benchmark()
    tiny_model(seed=5).save_pretrained(tmp_path / "skill_a")
    tasks = TaskSet({"skills": SkillTask(train=["add", "rev"], test=["copy"])}, 50).load()
    resources = tasks.loader()
    cfg = SimpleNamespace(forward_passes=2, seed=0, merge=SimpleNamespace(test_every=1))
    experiment = SimpleNamespace(seeds=[str(tmp_path / "skill_a"), "unused"], resources=resources,
                                 tests={"train": resources}, test_fn=weight_norm)
    result = bench.gradient_skill_a(cfg, experiment)
    s = result.settings
    assert (s["example_passes"], s["steps"], result.forward_passes) == (400, 7, 2)  # 2 x 200 prompts, ceil(400 / 64)
    assert [p.forward_passes for p in result.test_points] == [0, 1, 2]
    assert result.test_points[0].test["train"] == pytest.approx(weight_norm(tiny_model(seed=5), None))
    assert bench.training_pairs(resources) == [example for _, example in resources.dataset]


def test_compare_baseline_refuses_examples_that_are_not_text_pairs():
    from torch.utils.data import DataLoader

    bench = load_benchmark()
    with pytest.raises(ValueError, match="text pairs"):
        bench.training_pairs(DataLoader([("task", {"question": "1+1"})]))
