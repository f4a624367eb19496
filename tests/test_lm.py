"""The small language-model merge's skills, scoring and seed models (m2n2_lightning.lm)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM

from m2n2_lightning.lm import seeds
from m2n2_lightning.lm.tasks import (
    SKILLS,
    TOKENIZER,
    char_fraction,
    char_score,
    exact_match,
    greedy_generate,
    held_out_prompts,
    prompt_sets,
    skill_dataset,
)

TINY = replace(seeds.preset(reduced=True), n_layer=1, d_model=16, n_head=2, base_steps=8, ft_steps=3, batch_size=8)


class ScriptedLM(torch.nn.Module):
    """Replies to each prompt with a fixed string through a causal LM's interface (logits and cache)."""

    def __init__(self, replies: dict[str, str]) -> None:
        super().__init__()
        self.replies = replies

    def forward(self, input_ids: torch.Tensor, cache: dict | None = None, **kwargs: object) -> SimpleNamespace:
        if cache is None:
            prompts = [TOKENIZER.decode(row) for row in input_ids.tolist()]
            cache = {"targets": [TOKENIZER.encode(self.replies[p], eos=True) for p in prompts], "step": 0}
        logits = torch.zeros(input_ids.shape[0], 1, TOKENIZER.vocab_size)
        for row, target in enumerate(cache["targets"]):
            logits[row, 0, target[cache["step"]] if cache["step"] < len(target) else TOKENIZER.eos_id] = 1.0
        cache["step"] += 1
        return SimpleNamespace(logits=logits, cache=cache)


def test_tokenizer_round_trip_and_padding() -> None:
    text = "12+34=r:abcz:"
    assert TOKENIZER.decode(TOKENIZER.encode(text, bos=True, eos=True) + [5, 6]) == text
    ids, mask = TOKENIZER.batch_prompts(["1+2=", "c:abcde="])
    assert ids.shape == mask.shape == (2, 9)
    assert mask[0].tolist() == [0] * 4 + [1] * 5 and ids[0, 4] == TOKENIZER.bos_id
    assert [TOKENIZER.decode(row) for row in ids.tolist()] == ["1+2=", "c:abcde="]
    ids, mask, labels = TOKENIZER.batch_train(["1+2="], ["3"])
    assert labels[0].tolist() == [-100] * 5 + TOKENIZER.encode("3", eos=True)


def test_prompt_sets_deterministic_and_disjoint() -> None:
    for skill in SKILLS.values():
        train, test = prompt_sets(skill)
        assert (train, test) == prompt_sets(skill)
        assert len(train) == 100 and len(test) == 200
        assert not {p for p, _ in train} & {p for p, _ in test}
        assert prompt_sets(skill, seed=1) != (train, test)
    assert {p for p, _ in prompt_sets(SKILLS["add"])[1]} <= held_out_prompts()
    assert all(eval(p[:-1]) == int(a) for p, a in prompt_sets(SKILLS["add"])[0])
    assert all(a == p[2:-1][::-1] for p, a in prompt_sets(SKILLS["rev"])[0])


def test_char_score_by_hand() -> None:
    assert char_score("46", "46") == 1.0
    assert char_score("47", "46") == 0.5
    assert char_score("4", "46") == 0.5
    assert char_score("461", "46") == pytest.approx(2 / 3)
    assert char_score("", "dcba") == 0.0


def test_scoring_on_scripted_generations() -> None:
    prompts, answers = ["12+34=", "r:abcd=", "c:abcde=", "1+2="], ["46", "dcba", "abcde", "3"]
    model = ScriptedLM({"12+34=": "46", "r:abcd=": "dcbb", "c:abcde=": "abcde1", "1+2=": ""})
    assert exact_match(model, (prompts, answers)).tolist() == [1.0, 0.0, 0.0, 0.0]
    assert char_fraction(model, (prompts, answers)).tolist() == pytest.approx([1.0, 0.75, 5 / 6, 0.0])


def test_dataset_batches_score_as_is() -> None:
    data = skill_dataset(("add", "rev"))
    assert len(data) == 200 and data.skills[:100] == ["add"] * 100 and data.skills[100:] == ["rev"] * 100
    batch = next(iter(DataLoader(data, batch_size=200)))
    oracle = ScriptedLM(dict(data.pairs))
    assert exact_match(oracle, batch).tolist() == [1.0] * 200


def test_left_padding_reads_like_one_prompt() -> None:
    model = seeds.make_model(TINY).eval()
    prompts = ["12+34=", "r:abcd=", "c:abcde="]
    assert greedy_generate(model, prompts, 6) == [greedy_generate(model, [p], 6)[0] for p in prompts]


def test_build_deterministic_cached_and_loadable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = seeds.build_seeds(tmp_path / "a", TINY)
    second = seeds.build_seeds(tmp_path / "b", TINY)
    assert first["accuracy"] == second["accuracy"]
    for name in seeds.SEED_NAMES:
        a = AutoModelForCausalLM.from_pretrained(tmp_path / "a" / name)
        b = AutoModelForCausalLM.from_pretrained(tmp_path / "b" / name)
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert (tmp_path / "a" / "base" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "a" / "build.json").read_text())["settings"]["base_steps"] == TINY.base_steps

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cached build was retrained")

    monkeypatch.setattr(seeds, "train", no_training)
    assert seeds.build_seeds(tmp_path / "a", TINY) == first
    with pytest.raises(AssertionError, match="retrained"):
        seeds.build_seeds(tmp_path / "a", replace(TINY, seed=1))


@pytest.mark.slow
def test_reduced_preset_builds(tmp_path: Path) -> None:
    record = seeds.build_seeds(tmp_path, seeds.preset(reduced=True))
    assert set(record["accuracy"]) == set(seeds.SEED_NAMES)
    assert set(seeds.load_seeds(tmp_path)) == set(seeds.SEED_NAMES)


@pytest.mark.parametrize(("target", "max_rounds", "expected_rounds"), [(0.0, 3, 1), (1.01, 3, 3)])
def test_fine_tune_runs_rounds_until_its_target(
    target: float, max_rounds: int, expected_rounds: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    monkeypatch.setattr(seeds, "train", lambda model, mix, steps, lr, batch, seed, progress=None: calls.append(seed))
    settings = replace(TINY, ft_target=target, ft_max_rounds=max_rounds)
    base = seeds.make_model(TINY).eval()
    model, rounds, reached = seeds.fine_tune(base, SKILLS["add"], settings, seed=7)
    assert rounds == expected_rounds and calls == [7 + 1000 * r for r in range(expected_rounds)]
    assert model is not base and reached == seeds.accuracy(model, prompt_sets(SKILLS["add"])[0])


def test_a_fine_tune_short_of_its_target_warns(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match=r"skill_a \(seed 0\) reached 0\.\d\d .* after 2 rounds of 3 steps"):
        record = seeds.build_seeds(tmp_path, replace(TINY, ft_target=1.01, ft_max_rounds=2))
    assert record["fine_tune"]["skill_a"]["rounds"] == 2 and record["fine_tune"]["skill_b"]["rounds"] == 2
