"""A user's own score function named in the recipe as `module:function` (m2n2_lightning/tasks/function.py).

The user's module here scores each (prompt, answer) pair by the probability the model gives the
answer's first character; the merge's summary is checked against that function run on the
saved merge, and bad names are refused before the base model is opened.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from test_lm_eval_task import base_with_tokenizer
from test_lm_merge import tiny  # noqa: F401  (the tiny seed models, a module fixture)
from test_merge_cli import merge, write_recipe
from transformers import AutoModelForCausalLM

from m2n2_lightning.lm.tasks import SKILLS, prompt_sets
from m2n2_lightning.tasks.function import FunctionTask

USER_MODULE = '''
import torch
from m2n2_lightning.lm.tasks import TOKENIZER

@torch.no_grad()
def first_char(model, examples):
    """P(the answer's first character | bos + prompt) for each [prompt, answer] pair."""
    scores = []
    for prompt, answer in examples:
        ids = TOKENIZER.encode(prompt, bos=True)
        probs = model(input_ids=torch.tensor([ids])).logits[0, -1].double().softmax(-1)
        scores.append(float(probs[TOKENIZER.encode(answer[0])[0]]))
    return scores

NOT_A_FUNCTION = 3

def one_argument(model):
    return []
'''


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "my_scoring.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("my_scoring", None)


def pairs(split: int, count: int) -> list[list[str]]:
    return [list(pair) for pair in prompt_sets(SKILLS["add"])[split][:count]]


def expected(model: torch.nn.Module, rows: list[list[str]]) -> list[float]:
    """The user's score written out again: the softmax of the last logits at the answer's first character."""
    from m2n2_lightning.lm.tasks import TOKENIZER

    out = []
    for prompt, answer in rows:
        logits = model(input_ids=torch.tensor([TOKENIZER.encode(prompt, bos=True)])).logits[0, -1].double()
        out.append(float(logits.softmax(-1)[TOKENIZER.encode(answer[0])[0]]))
    return out


def test_the_named_function_scores_the_examples(tiny: Path, user_module: Path) -> None:  # noqa: F811
    (user_module / "train.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs(0, 5)))
    task = FunctionTask("my_scoring:first_char", train=str(user_module / "train.jsonl"), test=pairs(1, 3))
    data = task.load("mine")
    model = AutoModelForCausalLM.from_pretrained(tiny / "skill_a").eval()
    with torch.no_grad():
        assert data.train == pairs(0, 5) and data.tests == {"mine": pairs(1, 3)} and data.headline == ["mine"]
        assert task.score(model, data.train).tolist() == pytest.approx(expected(model, data.train), abs=1e-7)
        assert task.test_score(model, data.tests["mine"]).tolist() == pytest.approx(expected(model, pairs(1, 3)), abs=1e-7)


@pytest.mark.parametrize(
    ("score", "message"),
    [
        ("my_scoring.first_char", "must name an object as module:attribute"),
        ("no_such_module:score", "module 'no_such_module' does not import"),
        ("my_scoring:missing", "my_scoring has no attribute 'missing'"),
        ("my_scoring:NOT_A_FUNCTION", "is a int, not a function"),
        ("my_scoring:one_argument", r"cannot be called as f\(model, examples\)"),
    ],
)
def test_a_bad_function_name_is_refused(user_module: Path, score: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FunctionTask(score, train=pairs(0, 2))


def test_examples_that_cannot_be_read_are_refused(user_module: Path) -> None:
    with pytest.raises(ValueError, match="no such file"):
        FunctionTask("my_scoring:first_char", train=str(user_module / "none.jsonl")).load("mine")
    (user_module / "bad.jsonl").write_text("[1, 2]\n{oops\n")
    with pytest.raises(ValueError, match="is not JSON lines"):
        FunctionTask("my_scoring:first_char", train=str(user_module / "bad.jsonl")).load("mine")
    with pytest.raises(ValueError, match="gives a int; it must give a list"):
        FunctionTask("my_scoring:first_char", train="my_scoring:NOT_A_FUNCTION").load("mine")


def recipe_file(tiny: Path, folder: Path, score: str, base: Path) -> Path:  # noqa: F811
    return write_recipe(tiny, base, folder, {"mine": {"type": "function", "score": score, "train": pairs(0, 6),
                                                      "test": pairs(1, 4)}})


@pytest.mark.slow  # a whole train.py / m2n2-merge run in a subprocess (CI runs it)
def test_m2n2_merge_with_a_function_task(tiny: Path, user_module: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    monkeypatch.setenv("PYTHONPATH", str(user_module))
    out = user_module / "run"
    merge(recipe_file(tiny, user_module, "my_scoring:first_char", base_with_tokenizer(tiny, user_module)), out)
    summary = json.loads((out / "summary.json").read_text())
    merged = AutoModelForCausalLM.from_pretrained(out / "best_model").eval()
    with torch.no_grad():
        assert summary["test"]["mine"] == pytest.approx(sum(expected(merged, pairs(1, 4))) / 4, rel=1e-6)
        assert summary["best_train_acc"] == pytest.approx(sum(expected(merged, pairs(0, 6))) / 6, rel=1e-6)
    bad = recipe_file(tiny, user_module, "my_scoring:missing", user_module / "no_such_model")
    result = merge(bad, user_module / "bad_run", ok=False)
    assert result.returncode != 0 and "my_scoring has no attribute 'missing'" in result.stderr
    assert "OSError" not in result.stderr and "model identifier" not in result.stderr
