"""lm-evaluation-harness tasks as the fitness of a merge (m2n2_lightning/tasks/harness.py), on the tiny seeds.

Two local task YAMLs over JSON lines: `toy_add` (generation, exact match) and `toy_choice`
(multiple choice, acc and acc_norm, one few-shot example from `first_n`). Every score is
recomputed here without lm-eval or the task code: the greedy completion by a plain argmax loop
over the package's character tokenizer, each choice's log-likelihood from the logits, and the
few-shot context written out by hand. Then `m2n2-merge` on a recipe with the multiple-choice
task and a JSON-lines dataset task: scores against the saved merge, an exact resume, and a
resume refused after one line of the lm-eval task's data changed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from test_lm_merge import tiny  # noqa: F401  (the tiny seed models, a module fixture)
from test_merge_cli import (
    answer_probability,
    char_tokenizer,
    merge,
    probability_task,
    write_recipe,
    write_rows,
)
from transformers import AutoModelForCausalLM

from m2n2_lightning.lm.tasks import SKILLS, TOKENIZER, prompt_sets
from m2n2_lightning.tasks.harness import HarnessTask

pytest.importorskip("lm_eval")
GEN_TOKENS = 6


def choice_rows(pairs: list[tuple[str, str]]) -> list[dict]:
    """Each sum with three choices (the answer, its last digit changed, its digits reversed), the answer moving."""
    rows = []
    for i, (prompt, answer) in enumerate(pairs):
        wrong = [answer[:-1] + str((int(answer[-1]) + 1) % 10), answer[::-1] + "1"]
        choices = wrong[: i % 3] + [answer] + wrong[i % 3 :]
        rows.append({"question": prompt.rstrip("="), "choices": choices, "label": i % 3})
    return rows


def write_tasks(folder: Path) -> Path:
    """The JSON lines and the two task YAMLs under `folder/tasks`."""
    tasks = folder / "tasks"
    tasks.mkdir()
    train, test = prompt_sets(SKILLS["add"])
    for split, pairs in (("train", train[:8]), ("test", test[:6])):
        write_rows(tasks / f"add_{split}.jsonl", pairs)
        (tasks / f"choice_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in choice_rows(pairs)))
    common = {"dataset_path": "json", "training_split": "train", "test_split": "test", "doc_to_text": "{{question}}=",
              "target_delimiter": "", "fewshot_delimiter": ":"}
    files = {split: str(tasks / f"{{}}_{split}.jsonl") for split in ("train", "test")}
    add = {**common, "task": "toy_add", "output_type": "generate_until", "doc_to_target": "{{answer}}",
           "dataset_kwargs": {"data_files": {k: v.format("add") for k, v in files.items()}},
           "generation_kwargs": {"until": ["<eos>"], "max_gen_toks": GEN_TOKENS, "do_sample": False},
           "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]}
    choice = {**common, "task": "toy_choice", "output_type": "multiple_choice", "doc_to_choice": "choices",
              "doc_to_target": "label", "fewshot_split": "train", "fewshot_config": {"sampler": "first_n"},
              "dataset_kwargs": {"data_files": {k: v.format("choice") for k, v in files.items()}},
              "metric_list": [{"metric": m} for m in ("acc", "acc_norm", "f1")]}
    for task in (add, choice):
        (tasks / f"{task['task']}.yaml").write_text(yaml.safe_dump(task))
    return tasks


@pytest.fixture
def tasks(tmp_path: Path) -> Path:
    return write_tasks(tmp_path)


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@torch.no_grad()
def greedy(model: torch.nn.Module, prompt: str) -> str:
    """bos + prompt, then GEN_TOKENS argmax tokens (the whole sequence re-run each time), cut at eos."""
    ids = TOKENIZER.encode(prompt, bos=True)
    for _ in range(GEN_TOKENS):
        ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return TOKENIZER.decode(ids[len(TOKENIZER.encode(prompt, bos=True)):])


@torch.no_grad()
def loglikelihood(model: torch.nn.Module, context: str, continuation: str) -> float:
    head, tail = TOKENIZER.encode(context, bos=True), TOKENIZER.encode(continuation)
    logits = model(input_ids=torch.tensor([head + tail])).logits[0].double().log_softmax(-1)
    return sum(float(logits[len(head) - 1 + i, t]) for i, t in enumerate(tail))


def choice_scores(model: torch.nn.Module, docs: list[dict], train: list[dict], shots: int = 1) -> dict[str, list[float]]:
    """acc and acc_norm of each document; the context holds the first `shots` training documents other than itself."""
    scores: dict[str, list[float]] = {"acc": [], "acc_norm": []}
    for doc in docs:
        shown = [d for d in train if d != doc][:shots]
        context = "".join(f"{d['question']}={d['choices'][d['label']]}:" for d in shown) + f"{doc['question']}="
        lls = [loglikelihood(model, context, choice) for choice in doc["choices"]]
        scores["acc"].append(float(max(range(3), key=lambda i: lls[i]) == doc["label"]))
        normed = [ll / len(choice) for ll, choice in zip(lls, doc["choices"])]
        scores["acc_norm"].append(float(max(range(3), key=lambda i: normed[i]) == doc["label"]))
    return scores


def test_generation_and_multiple_choice_scores_are_the_documents_metrics(tiny: Path, tasks: Path) -> None:  # noqa: F811
    model = AutoModelForCausalLM.from_pretrained(tiny / "skill_a").eval()
    docs = rows(tasks / "add_train.jsonl")
    docs[4]["answer"] = greedy(model, f"{docs[4]['question']}=")  # one document the model answers right
    (tasks / "add_train.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    add = HarnessTask("toy_add", include_path=str(tasks), batch_size=3)
    data = add.load("add")
    add.bind(char_tokenizer())
    assert [e["doc"] for e in data.train] == docs and add.metric == "exact_match"
    expected = [float(greedy(model, f"{d['question']}=") == d["answer"]) for d in docs]
    assert add.score(model, data.train).tolist() == expected and sum(expected) >= 1
    assert add.score(model, data.train[4:5]).tolist() == [1.0]  # alone or in a batch, the same score
    for metric in ("acc", "acc_norm"):
        choice = HarnessTask("toy_choice", include_path=str(tasks), metric=metric, num_fewshot=1, batch_size=4)
        data = choice.load("choice")
        choice.bind(char_tokenizer())
        train, test = rows(tasks / "choice_train.jsonl"), rows(tasks / "choice_test.jsonl")
        assert choice.score(model, data.train).tolist() == choice_scores(model, train, train)[metric]
        assert choice.test_score(model, data.tests["choice"]).tolist() == choice_scores(model, test, train)[metric]


def test_bad_lm_eval_tasks_are_refused_when_loaded(tasks: Path) -> None:
    with pytest.raises(ValueError, match=r"aggregates 'f1' over the whole set \(f1_score\).*one of \['acc', 'acc_norm'\]"):
        HarnessTask("toy_choice", include_path=str(tasks), metric="f1").load("choice")
    with pytest.raises(ValueError, match="has no metric 'bleu'"):
        HarnessTask("toy_choice", include_path=str(tasks), metric="bleu").load("choice")
    with pytest.raises(ValueError, match="has no filter 'strict-match'; its filters: \\['none'\\]"):
        HarnessTask("toy_add", include_path=str(tasks), filter="strict-match").load("add")
    with pytest.raises(ValueError, match="include_path .*nowhere does not exist"):
        HarnessTask("toy_add", include_path=str(tasks / "nowhere")).load("add")
    no_train = yaml.safe_load((tasks / "toy_add.yaml").read_text()) | {"task": "toy_add_no_train", "training_split": None}
    (tasks / "toy_add_no_train.yaml").write_text(yaml.safe_dump(no_train))
    with pytest.raises(ValueError, match="has no training split"):
        HarnessTask("toy_add_no_train", include_path=str(tasks)).load("add")
    with pytest.raises(ValueError, match="limit must be an integer >= 1"):
        HarnessTask("toy_add", limit=0)


def base_with_tokenizer(tiny: Path, folder: Path) -> Path:  # noqa: F811
    """The tiny base model with the character tokenizer saved beside it."""
    base = folder / "base"
    base.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        (base / name).write_bytes((tiny / "base" / name).read_bytes())
    char_tokenizer().save_pretrained(base)
    return base


@pytest.fixture
def recipe(tiny: Path, tmp_path: Path, tasks: Path) -> Path:  # noqa: F811
    base = base_with_tokenizer(tiny, tmp_path)
    choice = {"type": "lm_eval", "task": "toy_choice", "include_path": str(tasks), "metric": "acc", "num_fewshot": 1,
              "batch_size": 8}
    for split in ("train", "test"):
        (tmp_path / f"{split}.jsonl").write_bytes((tasks / f"add_{split}.jsonl").read_bytes())
    return write_recipe(tiny, base, tmp_path, {"choice": choice, "math": probability_task(tmp_path)})


def test_m2n2_merge_with_an_lm_eval_task_and_a_dataset_task(recipe: Path, tasks: Path, tmp_path: Path) -> None:
    whole = tmp_path / "whole"
    merge(recipe, whole)
    summary = json.loads((whole / "summary.json").read_text())
    merged = AutoModelForCausalLM.from_pretrained(whole / "best_model").eval()
    train, test = rows(tasks / "choice_train.jsonl"), rows(tasks / "choice_test.jsonl")
    choice_test, choice_train = choice_scores(merged, test, train)["acc"], choice_scores(merged, train, train)["acc"]
    add_train, add_test = prompt_sets(SKILLS["add"])
    assert set(summary["test"]) == {"choice", "math"} and summary["forward_passes"] == 6 and summary["resources"] == 16
    assert summary["test"]["choice"] == pytest.approx(sum(choice_test) / 6, abs=1e-12)
    assert summary["test"]["math"] == pytest.approx(answer_probability(merged, add_test[:6]), rel=1e-5)
    expected_train = (sum(choice_train) + answer_probability(merged, add_train[:8]) * 8) / 16
    assert summary["best_train_acc"] == pytest.approx(expected_train, rel=1e-5)
    assert summary["tasks"] == {"choice": "HarnessTask", "math": "DatasetTask"}


@pytest.mark.slow
def test_m2n2_merge_with_an_lm_eval_task_resumes_exactly_and_refuses_changed_data(recipe: Path, tasks: Path,
                                                                                 tmp_path: Path) -> None:
    whole, half, resumed = tmp_path / "whole", tmp_path / "half", tmp_path / "resumed"
    merge(recipe, whole)
    summary = json.loads((whole / "summary.json").read_text())
    merge(recipe, half, "forward_passes=3")
    last = half / "checkpoints" / "last.ckpt"
    merge(recipe, resumed, f"ckpt_path={last}")
    done = json.loads((resumed / "summary.json").read_text())
    assert done["test"] == summary["test"] and done["best_train_acc"] == summary["best_train_acc"]
    curves = [[r.split(",")[:1] + r.split(",")[2:] for r in (d / "curves.csv").read_text().splitlines()]
              for d in (whole, resumed)]
    assert curves[1] == curves[0]  # every column but the wall time
    path = tasks / "choice_train.jsonl"  # one line of the lm-eval task's data changed: same count, other content
    lines = path.read_text().splitlines()
    lines[5] = json.dumps({**json.loads(lines[5]), "label": (json.loads(lines[5])["label"] + 1) % 3})
    path.write_text("\n".join(lines) + "\n")
    refused = merge(recipe, tmp_path / "changed", f"ckpt_path={last}", ok=False)
    assert refused.returncode != 0 and "other task data" in refused.stderr


def test_a_bad_lm_eval_metric_fails_before_the_base_model_is_opened(recipe: Path, tmp_path: Path) -> None:
    content = yaml.safe_load(recipe.read_text())
    content["tasks"]["choice"]["metric"] = "f1"
    content["base_model"] = str(tmp_path / "no_such_model")  # never reached: the task fails first
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(content))
    result = merge(bad, tmp_path / "bad_run", ok=False)
    assert result.returncode != 0 and "aggregates 'f1' over the whole set" in result.stderr
    assert "OSError" not in result.stderr and "model identifier" not in result.stderr
