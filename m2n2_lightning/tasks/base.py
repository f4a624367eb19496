"""One task interface for merging: a task's examples, its per-example score in [0, 1], and the set of tasks of a run.

A task (`Task`) gives fixed-order training examples (the M2N2 resources: each example
is one resource, as in the paper), named test sets, and `score(model, examples) -> [B]`
in [0, 1]. Several tasks are combined by concatenating their training examples, task
after task (`TaskSet`); each test set is reported on its own. Everything a task reads
(files, the hub) is read by `TaskSet.load`, before any model is loaded, so a missing
split, field or file is an error before the expensive part starts.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from m2n2_lightning.evaluator import check_evaluated


@dataclass
class TaskData:
    """What a task scores: training examples (the resources; may be empty) and named test sets."""

    train: list[Any]
    tests: dict[str, list[Any]] = field(default_factory=dict)
    #: The test sets whose mean is the run's headline `test_acc` (those the training examples train).
    headline: list[str] = field(default_factory=list)
    #: A group name for each training example (e.g. its skill); None: the task's name. MAP-Elites' descriptors.
    groups: list[str] | None = None


@runtime_checkable
class Task(Protocol):
    """A source of per-example scores in [0, 1] for a candidate model."""

    def load(self, name: str) -> TaskData:
        """Read and check the examples (no model is loaded yet); `name` is the task's name in the run."""

    def bind(self, tokenizer: Any) -> None:
        """Receive the base model's tokenizer (None when it has none) before any scoring."""

    def score(self, model: nn.Module, examples: list[Any]) -> Tensor:
        """Per-example fitness scores [B] in [0, 1] of `model` (in eval mode, under no_grad)."""

    def test_score(self, model: nn.Module, examples: list[Any]) -> Tensor:
        """Per-example scores [B] in [0, 1] reported on the test sets and the training examples."""


class Resources(Dataset):
    """The training examples of every task, task after task, as `(task name, example)` pairs."""

    def __init__(self, items: Sequence[tuple[str, Any]]) -> None:
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[str, Any]:
        return self.items[index]


def as_list(batch: list[Any]) -> list[Any]:
    """The collate function of task batches: the examples as they are."""
    return batch


class TaskSet:
    """The tasks of a run: combined resources, the `evaluate` hook over them, tests and a content hash."""

    def __init__(self, tasks: Mapping[str, Task], batch_size: int = 32) -> None:
        if not tasks:
            raise ValueError("a merge needs at least one task under merge.tasks (e.g. a dataset task)")
        for name, task in tasks.items():
            if not isinstance(task, Task):
                raise ValueError(f"merge.tasks.{name} is a {type(task).__name__}, not a task (load, bind, score, test_score)")
        self.tasks = dict(tasks)
        self.batch_size = batch_size
        self.data: dict[str, TaskData] = {}

    def load(self) -> TaskSet:
        """Read every task's examples (checked); at least one task must give training examples."""
        self.data = {name: task.load(name) for name, task in self.tasks.items()}
        if not any(data.train for data in self.data.values()):
            raise ValueError("no task gives training examples: at least one task must have a training split")
        names = [test for data in self.data.values() for test in data.tests]
        if len(names) != len(set(names)):
            raise ValueError(f"two tasks name the same test set: {sorted(names)}; rename the tasks")
        return self

    def bind(self, tokenizer: Any) -> None:
        """Hand the base model's tokenizer to every task."""
        for task in self.tasks.values():
            task.bind(tokenizer)

    @property
    def resources(self) -> Resources:
        """Every task's training examples, task after task."""
        return Resources([(name, example) for name, data in self.data.items() for example in data.train])

    def loader(self) -> DataLoader:
        """The resources in batches of `batch_size` (as lists of pairs): what the evaluate hook gets."""
        return DataLoader(self.resources, batch_size=self.batch_size, shuffle=False, collate_fn=as_list)

    def labels(self) -> list[int]:
        """For each resource, the index of its group (its task's name, or the group the task gives it), in order of
        first appearance: MAP-Elites' descriptor labels."""
        groups = [g for name, data in self.data.items() for g in (data.groups or [name] * len(data.train))]
        order = list(dict.fromkeys(groups))
        return [order.index(g) for g in groups]

    def evaluate(self, model: nn.Module, batch: list[tuple[str, Any]]) -> Tensor:
        """Scores [B] of a batch of resources: each contiguous run of one task's examples scored by that task."""
        return self._scores(model, batch, test=False)

    def _scores(self, model: nn.Module, batch: list[tuple[str, Any]], test: bool) -> Tensor:
        parts, start = [], 0
        while start < len(batch):
            name = batch[start][0]
            stop = start
            while stop < len(batch) and batch[stop][0] == name:
                stop += 1
            task, examples = self.tasks[name], [example for _, example in batch[start:stop]]
            scores = (task.test_score if test else task.score)(model, examples)
            parts.append(check_evaluated(scores, len(examples)).cpu())
            start = stop
        return torch.cat(parts)

    @torch.no_grad()
    def mean_score(self, model: nn.Module, name: str, examples: list[Any]) -> float:
        """The mean `test_score` of task `name` over `examples`, in batches of `batch_size`."""
        was_training = model.training
        model.eval()
        try:
            batches = [examples[i : i + self.batch_size] for i in range(0, len(examples), self.batch_size)]
            scores = [check_evaluated(self.tasks[name].test_score(model, b), len(b)).cpu() for b in batches]
        finally:
            model.train(was_training)
        return float(torch.cat(scores).double().mean())

    def test_sets(self) -> dict[str, tuple[str, list[Any]]]:
        """Every test set by its name: (its task's name, its examples)."""
        return {test: (name, examples) for name, data in self.data.items() for test, examples in data.tests.items()}

    def test_accuracy(self, model: nn.Module, test_set: tuple[str, list[Any]]) -> float:
        """The mean test score of one entry of `test_sets()` (the test function of the curve recorder)."""
        return self.mean_score(model, *test_set)

    def train_score(self, model: nn.Module) -> float:
        """The mean `test_score` over all resources (every task's training examples together)."""
        total = sum(self.mean_score(model, name, data.train) * len(data.train) for name, data in self.data.items() if data.train)
        return total / len(self.resources)

    def headline(self, test: Mapping[str, float]) -> float | None:
        """The mean of the headline test sets' scores (None when no task names one)."""
        names = [name for data in self.data.values() for name in data.headline]
        return sum(test[name] for name in names) / len(names) if names else None

    def fingerprint(self) -> str:
        """SHA-256 of every task's examples (content and order) and its settings: a resume checks it.

        A task's settings are its public attributes; those starting with `_` are runtime state (a loaded
        function, a model wrapper) and are left out.
        """
        digest = hashlib.sha256()
        for name, data in self.data.items():
            settings = repr(sorted((k, v) for k, v in vars(self.tasks[name]).items() if not k.startswith("_")))
            payload = {"name": name, "task": type(self.tasks[name]).__qualname__, "settings": settings,
                       "train": data.train, "tests": data.tests}
            digest.update(json.dumps(payload, sort_keys=True, default=repr).encode())
        return digest.hexdigest()
