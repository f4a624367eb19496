"""The four-skill seeds of the small language-model merge (issue #22): the new skills' rules, the presets,
their determinism and `seed_sources` over them."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from m2n2_lightning.lm import seeds
from m2n2_lightning.lm.tasks import (
    MARKERS,
    SKILLS,
    STRING_RULES,
    Skill,
    held_out_prompts,
    prompt_sets,
)
from m2n2_lightning.merge_run import seed_sources
from m2n2_lightning.tasks.skills import SkillTask

TINY4 = replace(seeds.preset(reduced=True, skills=4), n_layer=1, d_model=16, n_head=2, base_steps=8, ft_steps=3,
                batch_size=8)


@pytest.mark.parametrize(
    ("skill", "prompt", "answer"),
    [("sort", "dbca", "abcd"), ("sort", "zaza", "aazz"), ("shift", "abcz", "bcda"), ("shift", "hal", "ibm"),
     ("dup", "abc", "aabbcc"), ("dup", "zz", "zzzz"), ("rev", "abcd", "dcba")],
)
def test_string_rules_by_hand(skill: str, prompt: str, answer: str) -> None:
    assert STRING_RULES[skill](prompt) == answer


def test_new_skills_prompt_sets_follow_their_rules_and_markers() -> None:
    for name, marker in (("sort", "s"), ("shift", "n"), ("dup", "d")):
        train, test = prompt_sets(SKILLS[name])
        assert len(train) == 100 and len(test) == 200
        for prompt, answer in train + test:
            assert prompt.startswith(f"{marker}:") and prompt.endswith("=")
            word = prompt[2:-1]
            expected = {"sort": "".join(sorted(word)), "shift": "".join(chr((ord(c) - 97 + 1) % 26 + 97) for c in word),
                        "dup": "".join(c * 2 for c in word)}[name]
            assert answer == expected
    assert len(set(MARKERS.values())) == len(MARKERS)
    assert len(held_out_prompts()) == 300 * len(SKILLS)  # no prompt of one skill is another's
    with pytest.raises(ValueError, match="unknown skill kind 'mul'"):
        Skill("mul", "mul", (2,))
    assert SkillTask(train=["sort", "shift"], test=["dup", "copy"]).load("skills").tests.keys() == {"dup", "copy"}


def test_two_skill_cache_keys_are_the_ones_before_four_skills() -> None:
    """sha256 of the keys (`_settings_json`, sorted) as the two-skill code wrote them before the generalisation."""
    expected = {False: "31b4a93124ac7efb1123849290a150e3086d65e2f65789f312203339f7b41f35",
                True: "0d49ce268a8d9e7e81564c7f849836f965b5f9dae5e0b73800c604c4920441a4"}
    for reduced, digest in expected.items():
        key = json.dumps(seeds._settings_json(seeds.preset(reduced)), sort_keys=True)
        assert hashlib.sha256(key.encode()).hexdigest() == digest
    assert seeds.seed_names(seeds.preset()) == seeds.SEED_NAMES


def test_four_skill_presets_names_and_caches(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for reduced in (False, True):
        settings = seeds.preset(reduced, seed=2, skills=4)
        assert settings.seed == 2 and len(settings.fine_tunes) == 4
        assert seeds.seed_names(settings) == ("base", "skill_a", "skill_b", "skill_c", "skill_d")
        assert [s.name for s in seeds.measured_skills(settings)] == [s.name for s in settings.fine_tunes] + ["copy"]
    monkeypatch.setenv("M2N2_LM_CACHE", str(tmp_path))
    assert seeds.default_cache(True, 1, skills=4) == tmp_path / "reduced4_seed1"
    assert seeds.default_cache(False, 0) == tmp_path / "full_seed0"
    with pytest.raises(ValueError, match="2 or 4 skills"):
        seeds.preset(skills=3)


def test_four_skill_build_is_deterministic_and_seed_sources_returns_its_fine_tunes(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A build of the tiny four-skill settings, and seed_sources' build of the same settings as the reduced
    four-skill preset: the same bytes, and the four fine-tunes in order."""
    first = seeds.build_seeds(tmp_path / "a", TINY4)
    names = seeds.seed_names(TINY4)
    assert list(first["accuracy"]) == list(names)
    assert set(first["accuracy"]["base"]) == {s.name for s in seeds.measured_skills(TINY4)}
    assert set(seeds.load_seeds(tmp_path / "a")) == set(names)
    assert "| skill_d |" in seeds.format_table(first)

    monkeypatch.setenv("M2N2_LM_CACHE", str(tmp_path))
    monkeypatch.setitem(seeds.PRESETS, (True, 4), TINY4)
    cfg = OmegaConf.create({"merge": {"models": None, "base_model": None},
                            "lm": {"reduced": True, "seed_models_seed": 0, "skills": 4}})
    models, base = seed_sources(cfg)
    cache = tmp_path / "reduced4_seed0"
    assert models == [str(cache / f"skill_{c}") for c in "abcd"] and base == str(cache / "base")
    assert json.loads((cache / "build.json").read_text())["accuracy"] == first["accuracy"]
    for name in names:
        assert (tmp_path / "a" / name / "model.safetensors").read_bytes() == (cache / name / "model.safetensors").read_bytes()


@pytest.mark.slow
def test_reduced_four_skill_preset_builds(tmp_path: Path) -> None:
    """CI's four-skill preset (about 20 s on a quiet core, 48 s on a loaded one)."""
    record = seeds.build_seeds(tmp_path, seeds.preset(reduced=True, skills=4))
    assert list(record["accuracy"]) == ["base", "skill_a", "skill_b", "skill_c", "skill_d"]
    assert list(record["accuracy"]["base"]) == ["add", "rev", "sort", "shift", "copy"]
