"""A dataset task: a Hugging Face `datasets` dataset, a prompt template, greedy generation and a per-example metric.

    merge.tasks.math:
      _target_: m2n2_lightning.tasks.dataset.DatasetTask
      path: json                      # or a hub name (e.g. openai/gsm8k, with name: main)
      data_files: {train: train.jsonl, test: test.jsonl}
      template: "Question: {question}\nAnswer:"
      answer: answer                  # the field holding the reference answer
      extract: last_number            # or a regex whose first group is the answer, or null (the whole completion)
      metric: exact_match             # or char_fraction, answer_probability

The training split (its first `limit` rows) gives the resources, the test split a test set
named like the task. Generation is greedy and batched, left-padded, with `max_new_tokens`;
`chat_template=true` wraps each prompt in the tokenizer's chat template as one user turn.
"""

from __future__ import annotations

import re
import string
from typing import Any

import torch
from torch import Tensor, nn

from m2n2_lightning.lm.tasks import char_score
from m2n2_lightning.tasks.base import TaskData

METRICS = ("exact_match", "char_fraction", "answer_probability")
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


class DatasetTask:
    """Examples from `datasets.load_dataset(path, name, data_files=...)`; scores in [0, 1] per example."""

    def __init__(self, path: str, template: str, answer: str = "answer", data_files: Any = None, name: str | None = None,
                 split: str = "train", test_split: str | None = "test", limit: int | None = None,
                 extract: str | None = "last_number", metric: str = "exact_match", max_new_tokens: int = 32,
                 chat_template: bool = False) -> None:
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS} (each gives one score per example), got {metric!r}")
        if extract not in (None, "last_number"):
            try:
                if re.compile(extract).groups < 1:
                    raise ValueError(f"extract={extract!r} has no group: put the answer in parentheses, e.g. '#### (.*)'")
            except re.error as error:
                raise ValueError(f"extract={extract!r} is not a regular expression: {error}") from None
        if limit is not None and limit < 1 or max_new_tokens < 1:
            raise ValueError(f"limit and max_new_tokens must be >= 1, got {limit} and {max_new_tokens}")
        self.path, self.template, self.answer, self.data_files, self.name = path, template, answer, data_files, name
        self.split, self.test_split, self.limit, self.extract = split, test_split, limit, extract
        self.metric, self.max_new_tokens, self.chat_template = metric, max_new_tokens, chat_template
        self.fields = [field for _, field, _, _ in string.Formatter().parse(template) if field]
        self.tokenizer: Any = None

    def load(self, name: str) -> TaskData:
        """The training (first `limit` rows) and test splits as lists of rows; fields and splits checked."""
        import datasets

        data = datasets.load_dataset(self.path, self.name, data_files=self._files())
        for split in filter(None, (self.split, self.test_split)):
            if split not in data:
                raise ValueError(f"task {name}: the dataset has no split {split!r} (it has {sorted(data)}); "
                                 f"set split= / test_split= (test_split=null: no test set)")
            missing = [f for f in [*self.fields, self.answer] if f not in data[split].column_names]
            if missing:
                raise ValueError(f"task {name}: the template or answer names {missing}, which the {split!r} split lacks "
                                 f"(its fields: {data[split].column_names})")
        train = data[self.split]
        rows = [dict(r) for r in train.select(range(min(self.limit, len(train))))] if self.limit else [dict(r) for r in train]
        tests = {name: [dict(r) for r in data[self.test_split]]} if self.test_split else {}
        return TaskData(rows, tests, headline=list(tests))

    def _files(self) -> Any:
        if isinstance(self.data_files, dict):  # a Hydra DictConfig (or dict) of split -> file(s)
            return {str(k): v if isinstance(v, str) else list(v) for k, v in self.data_files.items()}
        return self.data_files

    def bind(self, tokenizer: Any) -> None:
        """The base model's tokenizer, left-padded for batched generation."""
        if tokenizer is None:
            raise ValueError("a dataset task needs the base model's tokenizer: the base model directory has no tokenizer "
                             "files (set merge.base_model to a model saved with its tokenizer)")
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.tokenizer = tokenizer

    def prompt(self, row: dict[str, Any]) -> str:
        """The template filled from a row (wrapped in the chat template when asked)."""
        text = self.template.format(**row)
        if self.chat_template:
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                      add_generation_prompt=True)
        return text

    def extracted(self, completion: str) -> str:
        """The answer in a completion: the last number (commas dropped), the regex's first group, or the stripped text."""
        if self.extract is None:
            return completion.strip()
        if self.extract == "last_number":
            numbers = NUMBER.findall(completion)
            return numbers[-1].replace(",", "") if numbers else ""
        match = re.search(self.extract, completion)
        return match.group(1).strip() if match else ""

    def reference(self, row: dict[str, Any]) -> str:
        """The reference answer of a row, extracted like a completion when it is free text (GSM8K's '#### 42')."""
        value = str(row[self.answer])
        return self.extracted(value) if self.extract is not None else value.strip()

    @torch.no_grad()
    def completions(self, model: nn.Module, rows: list[dict[str, Any]]) -> list[str]:
        """Greedy completions of the rows' prompts in one left-padded batch."""
        device = next(model.parameters()).device
        batch = self.tokenizer([self.prompt(r) for r in rows], return_tensors="pt", padding=True,
                               add_special_tokens=not self.chat_template).to(device)
        out = model.generate(**batch, max_new_tokens=self.max_new_tokens, do_sample=False,
                             pad_token_id=self.tokenizer.pad_token_id)
        return self.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)

    @torch.no_grad()
    def answer_probability(self, model: nn.Module, rows: list[dict[str, Any]]) -> Tensor:
        """The probability the model gives each reference answer after its prompt (product over its tokens)."""
        device = next(model.parameters()).device
        scores = []
        for row in rows:  # one sequence at a time: no padding to get right
            prompt = self.tokenizer(self.prompt(row), add_special_tokens=not self.chat_template)["input_ids"]
            answer = self.tokenizer(self.reference(row), add_special_tokens=False)["input_ids"]
            ids = torch.tensor([prompt + answer], device=device)
            logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].double()
            picked = logits.log_softmax(-1).gather(1, ids[0, len(prompt):, None])
            scores.append(float(picked.sum().exp()))
        return torch.tensor(scores)

    def score(self, model: nn.Module, examples: list[dict[str, Any]]) -> Tensor:
        """The metric of each example: exact match or character fraction of the extracted answer, or its probability."""
        if self.metric == "answer_probability":
            return self.answer_probability(model, examples)
        found = [self.extracted(c) for c in self.completions(model, examples)]
        refs = [self.reference(r) for r in examples]
        if self.metric == "exact_match":
            return torch.tensor([float(f == r) for f, r in zip(found, refs)])
        return torch.tensor([char_score(f, r) for f, r in zip(found, refs)])

    test_score = score
