"""`m2n2-merge recipe.yaml --out DIR` on two tiny seeds and two tasks: a JSON-lines dataset task and the toy skills.

The per-example scores are recomputed here without the task code: the dataset task's
`answer_probability` from the saved merge's logits over the package's own character
tokenizer, the skills by the toy exact match. (The tiny seeds answer every prompt the same
way, so a generated answer would score 0 everywhere; the probability is a continuous check.)
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from test_lm_merge import tiny  # noqa: F401  (the tiny seed models, a module fixture)
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from m2n2_lightning.lm.tasks import SKILLS, TOKENIZER, CharTokenizer, accuracy, prompt_sets
from m2n2_lightning.merge_cli import quoted, recipe_overrides

ROOT = Path(__file__).resolve().parents[1]


def char_tokenizer() -> PreTrainedTokenizerFast:
    """The toy models' character tokenizer as a Hugging Face tokenizer (bos first, as the toy one)."""
    vocab = {s: i for i, s in enumerate(CharTokenizer.SPECIALS)}
    vocab |= {c: i + len(CharTokenizer.SPECIALS) for i, c in enumerate(CharTokenizer.ALPHABET)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


def write_rows(path: Path, pairs: list[tuple[str, str]]) -> None:
    path.write_text("".join(json.dumps({"question": p.rstrip("="), "answer": a}) + "\n" for p, a in pairs))


@pytest.fixture
def recipe(tiny: Path, tmp_path: Path) -> Path:  # noqa: F811
    base = tmp_path / "base"
    shutil.copytree(tiny / "base", base)
    char_tokenizer().save_pretrained(base)
    train, test = prompt_sets(SKILLS["add"])
    write_rows(tmp_path / "train.jsonl", train[:10])
    write_rows(tmp_path / "test.jsonl", test[:6])
    skills = {"type": "skills", "train": ["rev"], "test": ["rev"], "score": "char_fraction"}
    return write_recipe(tiny, base, tmp_path, {"math": probability_task(tmp_path), "skills": skills})


def probability_task(folder: Path) -> dict:
    """A dataset task over folder/train.jsonl and folder/test.jsonl scored by the answer's probability."""
    return {"type": "dataset", "path": "json", "template": "{question}=", "answer": "answer", "extract": None,
            "metric": "answer_probability",
            "data_files": {"train": str(folder / "train.jsonl"), "test": str(folder / "test.jsonl")}}


def write_recipe(tiny: Path, base: Path, folder: Path, tasks: dict) -> Path:
    """folder/recipe.yaml: the two tiny seeds merged by M2N2 (4 members) for 6 evaluations on `tasks`."""
    recipe = {
        "models": [{"model": str(tiny / "skill_a")}, {"model": str(tiny / "skill_b")}],
        "base_model": str(base),
        "merge_method": "m2n2_merge",
        "parameters": {"pop_size": 4, "warmup_steps": 2},
        "evaluations": 6,
        "batch_size": 4,
        "tasks": tasks,
    }
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def merge(recipe: Path, out: Path, *overrides: str, ok: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "m2n2_lightning.merge_cli", str(recipe), "--out", str(out),
         "trainer.enable_progress_bar=false", *overrides],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    if ok:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


@torch.no_grad()
def answer_probability(model: torch.nn.Module, rows: list[tuple[str, str]]) -> float:
    """Mean over rows of P(answer | bos + prompt), by the toy tokenizer and plain logits (float64)."""
    total = 0.0
    for prompt, answer in rows:
        head, tail = TOKENIZER.encode(prompt, bos=True), TOKENIZER.encode(answer)
        logits = model(input_ids=torch.tensor([head + tail])).logits[0].double().log_softmax(-1)
        total += math.exp(sum(float(logits[len(head) - 1 + i, t]) for i, t in enumerate(tail)))
    return total / len(rows)


@pytest.mark.slow  # a whole train.py / m2n2-merge run in a subprocess (CI runs it)
def test_m2n2_merge_runs_a_recipe_with_a_dataset_task_and_the_skills(recipe: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    merge(recipe, out)
    summary = json.loads((out / "summary.json").read_text())
    merged = AutoModelForCausalLM.from_pretrained(out / "best_model").eval()
    train, test = prompt_sets(SKILLS["add"])
    assert set(summary["test"]) == {"math", "rev"} and summary["forward_passes"] == 6
    assert summary["test"]["math"] == pytest.approx(answer_probability(merged, test[:6]), rel=1e-5)
    assert summary["test"]["rev"] == accuracy(merged, prompt_sets(SKILLS["rev"])[1])
    rev_train = prompt_sets(SKILLS["rev"])[0]
    expected_train = (answer_probability(merged, train[:10]) * 10 + accuracy(merged, rev_train) * 100) / 110
    assert summary["best_train_acc"] == pytest.approx(expected_train, rel=1e-5) and summary["resources"] == 110
    assert 0 < summary["test"]["math"] < 1 and summary["strategy_settings"]["pop_size"] == 4
    assert yaml.safe_load((out / "recipe.yaml").read_text()) == yaml.safe_load(recipe.read_text())
    assert (out / "best_model" / "tokenizer.json").is_file()


@pytest.mark.slow
def test_m2n2_merge_resumes_exactly_and_refuses_changed_task_data(recipe: Path, tmp_path: Path) -> None:
    whole, half = tmp_path / "whole", tmp_path / "half"
    merge(recipe, whole)
    merge(recipe, half, "forward_passes=3")
    last = half / "checkpoints" / "last.ckpt"
    merge(recipe, tmp_path / "resumed", f"ckpt_path={last}")
    done = [json.loads((d / "summary.json").read_text()) for d in (whole, tmp_path / "resumed")]
    assert done[1]["test"] == done[0]["test"] and done[1]["best_train_acc"] == done[0]["best_train_acc"]
    rows = [(d / "curves.csv").read_text().splitlines() for d in (whole, tmp_path / "resumed")]
    assert [r.split(",")[:1] + r.split(",")[2:] for r in rows[1]] == [r.split(",")[:1] + r.split(",")[2:] for r in rows[0]]
    # one answer changed in the training data: same count, other content
    path = tmp_path / "train.jsonl"
    lines = path.read_text().splitlines()
    lines[3] = json.dumps({**json.loads(lines[3]), "answer": "0"})
    path.write_text("\n".join(lines) + "\n")
    refused = merge(recipe, tmp_path / "changed", f"ckpt_path={last}", ok=False)
    assert refused.returncode != 0 and "other task data" in refused.stderr


@pytest.mark.slow  # a whole train.py / m2n2-merge run in a subprocess (CI runs it)
def test_bad_recipes_and_tasks_fail_before_any_model_loads(recipe: Path, tmp_path: Path) -> None:
    content = yaml.safe_load(recipe.read_text())
    with pytest.raises(ValueError, match="unknown recipe keys \\['merge_methd'\\]"):
        recipe_overrides({**content, "merge_methd": "m2n2"})
    content["tasks"]["math"]["template"] = "{nope}="
    content["base_model"] = str(tmp_path / "no_such_model")  # never reached: the task fails first
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(content))
    result = merge(bad, tmp_path / "bad_run", ok=False)
    assert result.returncode != 0 and "the template or answer names ['nope']" in result.stderr
    assert "OSError" not in result.stderr and "model identifier" not in result.stderr  # the base was never opened


def test_values_are_quoted_for_hydra() -> None:
    assert quoted("it's") == "'it\\'s'" and quoted("a\\") == "'a\\\\'" and quoted(r"#### (\d+)") == r"'#### (\d+)'"
    assert quoted([1, None, True]) == "[1,null,true]" and quoted({"a": "b"}) == "{a:'b'}"
