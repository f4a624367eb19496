"""An lm-evaluation-harness task as the fitness of a merge (the `lmeval` extra: `pip install 'm2n2-lightning[lmeval]'`).

    merge.tasks.gsm8k:
      _target_: m2n2_lightning.tasks.harness.HarnessTask
      task: gsm8k                   # an installed lm-eval task, a task in include_path, or a task YAML file
      include_path: null            # a folder (or list) of task YAMLs: mergekit-evolve's --task-search-path
      metric: exact_match           # a metric of the task with a per-document value (null: its first)
      filter: strict-match          # which of the task's filter pipelines (null: its first)
      limit: 200                    # the first 200 training documents are the resources (null: all)
      num_fewshot: 5
      apply_chat_template: false

lm-eval loads the task, builds each document's requests (few-shot context included) and scores
them with its own `process_results`; the requests run through lm-eval's `HFLM` wrapped around
the live module that holds the candidates (built once, never reloaded), batched `batch_size`
requests at a time. The training split gives the resources, the task's evaluation split
(test, else validation) a test set named like the task. Few-shot contexts are built once per
document in a fixed order (the evaluation split first, from `fewshot_seed`, as `lm_eval` does),
so a score does not depend on the batch a document lands in.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from m2n2_lightning.tasks.base import TaskData

#: lm-eval's default few-shot seed (`simple_evaluate(fewshot_random_seed=1234)`).
FEWSHOT_SEED = 1234


def lm_eval_task(task: str, include_path: str | list[str] | None, label: str) -> Any:
    """The one lm-eval task named `task` (searched in `include_path` first, then among the installed tasks)."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError as error:
        raise ImportError(f"task {label}: an lm-eval task needs lm-eval: pip install 'm2n2-lightning[lmeval]' "
                          f"({error})") from None
    paths = [str(p) for p in ([include_path] if isinstance(include_path, str) else include_path or [])]
    for path in paths:
        if not Path(path).exists():
            raise ValueError(f"task {label}: include_path {path} does not exist")
    manager = TaskManager(include_path=paths, include_defaults=False) if paths else None
    if manager is None or (task not in manager.all_tasks and not Path(task).is_file()):
        manager = TaskManager(include_path=paths or None)  # the installed tasks too: seconds to index
    if task not in manager.all_tasks and not Path(task).is_file():
        close = difflib.get_close_matches(task, manager.all_tasks, n=5)
        raise ValueError(f"task {label}: lm-eval has no task {task!r} (installed or under include_path={paths}); "
                         f"close names: {close}")
    loaded = manager.load(task)["tasks"]
    if len(loaded) != 1:
        raise ValueError(f"task {label}: {task!r} is a group of {len(loaded)} lm-eval tasks ({sorted(loaded)[:8]}...); "
                         f"name each as a task of its own")
    return next(iter(loaded.values()))


class HarnessTask:
    """An lm-eval task's documents, scored per document by the task's own metric."""

    def __init__(self, task: str, include_path: str | list[str] | None = None, metric: str | None = None,
                 filter: str | None = None, limit: int | None = None, test_limit: int | None = None,
                 num_fewshot: int | None = None, fewshot_seed: int = FEWSHOT_SEED, apply_chat_template: bool = False,
                 fewshot_as_multiturn: bool = False, system_instruction: str | None = None, batch_size: int = 8,
                 lm_args: dict[str, Any] | None = None) -> None:
        for key, value in (("limit", limit), ("test_limit", test_limit), ("batch_size", batch_size)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{key} must be an integer >= 1, got {value!r}")
        if num_fewshot is not None and (not isinstance(num_fewshot, int) or num_fewshot < 0):
            raise ValueError(f"num_fewshot must be an integer >= 0, got {num_fewshot!r}")
        self.task, self.include_path, self.metric, self.filter = task, include_path, metric, filter
        self.limit, self.test_limit, self.num_fewshot, self.fewshot_seed = limit, test_limit, num_fewshot, fewshot_seed
        self.apply_chat_template, self.fewshot_as_multiturn = apply_chat_template, fewshot_as_multiturn
        self.system_instruction, self.batch_size, self.lm_args = system_instruction, batch_size, dict(lm_args or {})
        #: lm-eval's configuration of the task once loaded (JSON): part of the run's task fingerprint.
        self.config = ""
        # runtime state (not settings: left out of the fingerprint): lm-eval's task, documents, contexts, HFLM
        self._task: Any = None
        self._docs: dict[str, list[dict[str, Any]]] = {}
        self._contexts: dict[str, list[Any]] | None = None
        self._tokenizer: Any = None
        self._lm: Any = None

    def load(self, name: str) -> TaskData:
        """Load the task through lm-eval; check its metric, filter and splits; its documents as examples."""
        from lm_eval.api.metrics import mean

        task = lm_eval_task(self.task, self.include_path, name)
        if self.num_fewshot is not None:
            task.set_config(key="num_fewshot", value=self.num_fewshot)
        elif task.get_config("num_fewshot") is None:  # as lm_eval does: no default means zero-shot
            task.set_config(key="num_fewshot", value=0)
        per_document = [m for m, aggregate in task.aggregation().items() if aggregate is mean]
        self.metric = self.metric or (per_document[0] if per_document else None)
        if self.metric not in per_document:
            what = (f"aggregates {self.metric!r} over the whole set ({task.aggregation()[self.metric].__name__})"
                    if self.metric in task.aggregation() else f"has no metric {self.metric!r}")
            raise ValueError(f"task {name}: lm-eval task {task.task_name} {what}; a merge needs a per-document score: "
                             f"one of {per_document} (metrics averaged over documents), or add one to its metric_list")
        filters = [ensemble.name for ensemble in task._filters]
        self.filter = self.filter or filters[0]
        if self.filter not in filters:
            raise ValueError(f"task {name}: lm-eval task {task.task_name} has no filter {self.filter!r}; its filters: {filters}")
        if not task.has_training_docs():
            raise ValueError(f"task {name}: lm-eval task {task.task_name} has no training split (training_split in its "
                             f"YAML): its training documents are the resources; set one, or use a task that has one")
        self._docs = {"train": list(task.training_docs())[: self.limit], "test": list(task.eval_docs)[: self.test_limit]}
        self._task, self._contexts = task, None
        self.config = json.dumps(task.dump_config(), sort_keys=True, default=str)
        examples = {split: [{"split": split, "id": i, "doc": doc} for i, doc in enumerate(docs)]
                    for split, docs in self._docs.items()}
        return TaskData(examples["train"], {name: examples["test"]}, headline=[name])

    def bind(self, tokenizer: Any) -> None:
        """The base model's tokenizer (HFLM's)."""
        if tokenizer is None:
            raise ValueError("an lm-eval task needs the base model's tokenizer: the base model directory has no "
                             "tokenizer files (set merge.base_model to a model saved with its tokenizer)")
        self._tokenizer = tokenizer

    def harness(self, model: nn.Module) -> Any:
        """lm-eval's HFLM around the live `model` (built on first use, again only if the module or its device changes)."""
        if self._lm is None or self._lm.model is not model or self._lm.device != model.device:
            from lm_eval.models.huggingface import HFLM

            self._lm = HFLM(pretrained=model, tokenizer=self._tokenizer, batch_size=self.batch_size, **self.lm_args)
        return self._lm

    def contexts(self, lm: Any) -> dict[str, list[Any]]:
        """Each document's few-shot context, built once: the evaluation split, then the training split, each from the seed."""
        if self._contexts is None:
            task, chat = self._task, lm.apply_chat_template if self.apply_chat_template else None
            self._contexts = {}
            for split in ("test", "train"):
                task.set_fewshot_seed(seed=self.fewshot_seed)
                self._contexts[split] = [
                    task.fewshot_context(doc, num_fewshot=task.get_config("num_fewshot"),
                                         system_instruction=self.system_instruction,
                                         apply_chat_template=self.apply_chat_template,
                                         fewshot_as_multiturn=self.fewshot_as_multiturn, chat_template=chat,
                                         gen_prefix=task.doc_to_prefix(doc))
                    for doc in self._docs[split]]
        return self._contexts

    @torch.no_grad()
    def score(self, model: nn.Module, examples: list[dict[str, Any]]) -> Tensor:
        """The metric of each document: its requests run by HFLM (one call per request type), scored by lm-eval."""
        lm, task = self.harness(model), self._task
        contexts = self.contexts(lm)
        chat = lm.apply_chat_template if self.apply_chat_template else None
        groups = []
        for example in examples:
            split, i = example["split"], example["id"]
            made = task.construct_requests(doc=self._docs[split][i], ctx=contexts[split][i],
                                           metadata=(task.task_name, i, task.config.repeats),
                                           apply_chat_template=self.apply_chat_template, chat_template=chat)
            groups.append(made if isinstance(made, list) else [made])
        flat = [instance for group in groups for instance in group]
        for kind in dict.fromkeys(instance.request_type for instance in flat):
            requests = [r for r in flat if r.request_type == kind for _ in range(r.repeats)]
            for response, request in zip(getattr(lm, kind)(requests, disable_tqdm=True), requests, strict=True):
                request.resps.append(response)
        task._instances = flat  # lm-eval's filters act on the task's instances, as in its own evaluate()
        task.apply_filters()
        scores = []
        for example, group in zip(examples, groups):
            group.sort(key=lambda instance: instance.idx)
            doc = self._docs[example["split"]][example["id"]]
            value = float(task.process_results(doc, [r.filtered_resps[self.filter] for r in group])[self.metric])
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"lm-eval task {task.task_name}: metric {self.metric} gave {value} for document "
                                 f"{example['id']} of {example['split']}, outside [0, 1]: choose a metric in [0, 1]")
            scores.append(value)
        return torch.tensor(scores)

    test_score = score
