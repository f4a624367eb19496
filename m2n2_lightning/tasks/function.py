"""A user's own score function as a task, named in the recipe as `module:function`.

    merge.tasks.mine:
      _target_: m2n2_lightning.tasks.function.FunctionTask
      score: my_scoring:score         # score(model, examples) -> [B] scores in [0, 1] (a tensor, list or array)
      train: data/train.jsonl         # the resources: a JSON-lines file, a list, or module:name (a list or a function giving one)
      test: data/test.jsonl           # optional: a test set named like the task
      test_score: null                # optional module:function for the reported scores (null: score)

The functions are imported when the task is built, before any model is loaded: a name that does
not import, or is not callable with (model, examples), is an error then. Modules are found as
`python -c` finds them: in the current directory or on PYTHONPATH. The functions' source code is
part of the run's task fingerprint, so a resume with an edited function is refused.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from m2n2_lightning.tasks.base import TaskData


def named(name: str, key: str) -> Any:
    """The object `module:attribute` names (the attribute may be dotted), or a ValueError saying why not."""
    module_name, sep, attribute = str(name).partition(":")
    if not (sep and module_name and attribute):
        raise ValueError(f"{key}={name!r} must name an object as module:attribute, e.g. my_scoring:score")
    if os.getcwd() not in sys.path and "" not in sys.path:  # as `python -c` does: the current directory first
        sys.path.insert(0, os.getcwd())
    try:
        found: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"{key}={name!r}: module {module_name!r} does not import ({error}); put it in the "
                         f"current directory or on PYTHONPATH") from None
    where = module_name
    for part in attribute.split("."):
        if not hasattr(found, part):
            raise ValueError(f"{key}={name!r}: {where} has no attribute {part!r}")
        found, where = getattr(found, part), f"{where}.{part}"
    return found


def score_function(name: str, key: str) -> Callable[[nn.Module, list[Any]], Any]:
    """The function `module:function` names, checked to be callable as f(model, examples)."""
    function = named(name, key)
    if not callable(function):
        raise ValueError(f"{key}={name!r} is a {type(function).__name__}, not a function: name one taking (model, examples)")
    try:
        inspect.signature(function).bind(None, [])
    except TypeError as error:
        raise ValueError(f"{key}={name!r} cannot be called as f(model, examples): {error}") from None
    except ValueError:  # no signature to read (a builtin): it is called as it is
        pass
    return function


def source_digest(function: Callable[..., Any]) -> str:
    """SHA-256 of a function's source (its qualified name where the source cannot be read)."""
    try:
        text = inspect.getsource(function)
    except (OSError, TypeError):
        text = getattr(function, "__qualname__", repr(type(function)))
    return hashlib.sha256(text.encode()).hexdigest()


class FunctionTask:
    """Examples scored by a user's function; each example is one resource."""

    def __init__(self, score: str, train: str | list[Any], test: str | list[Any] | None = None,
                 test_score: str | None = None) -> None:
        self.score_name, self.test_score_name, self.train, self.test = score, test_score, train, test
        self._score = score_function(score, "score")
        self._test_score = score_function(test_score, "test_score") if test_score else self._score
        #: The functions' source code (hashed): part of the run's task fingerprint.
        self.code = [source_digest(self._score), source_digest(self._test_score)]

    def load(self, name: str) -> TaskData:
        """The training examples (the resources) and the test examples, read or imported."""
        train = examples(self.train, f"task {name}: train")
        if not train:
            raise ValueError(f"task {name}: train={self.train!r} gives no examples")
        tests = {name: examples(self.test, f"task {name}: test")} if self.test is not None else {}
        return TaskData(train, tests, headline=list(tests))

    def bind(self, tokenizer: Any) -> None:
        """The function loads what it needs itself (the tokenizer included)."""

    def score(self, model: nn.Module, batch: list[Any]) -> Tensor:
        """The user's scores of a batch of examples, as a float tensor (checked by the task set)."""
        return as_scores(self._score(model, batch))

    def test_score(self, model: nn.Module, batch: list[Any]) -> Tensor:
        """The user's reported scores (`test_score`, else `score`)."""
        return as_scores(self._test_score(model, batch))


def as_scores(scores: Any) -> Tensor:
    return scores if isinstance(scores, Tensor) else torch.as_tensor(scores, dtype=torch.float32)


def examples(source: str | list[Any], key: str) -> list[Any]:
    """A list of examples from a JSON-lines file, a list, or `module:name` (a list, or a function returning one)."""
    if isinstance(source, (list, tuple)):
        return list(source)
    if ":" in str(source) and not Path(str(source)).exists():
        found = named(str(source), key)
        found = found() if callable(found) else found
        if not isinstance(found, (list, tuple)):
            raise ValueError(f"{key}={source!r} gives a {type(found).__name__}; it must give a list of examples")
        return list(found)
    path = Path(str(source))
    if not path.is_file():
        raise ValueError(f"{key}={source!r}: no such file (a JSON-lines file, a list, or module:name)")
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as error:
        raise ValueError(f"{key}={source!r} is not JSON lines: {error}") from None
