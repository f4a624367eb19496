"""The evolution step shared by `EvolutionModule` and `M2N2Callback`.

One step is ask -> score -> tell, then the best member is copied into the
model's own parameters (a device-side copy), so the model always *is* the
current best network. The engine also gathers the resources once and reports
the metrics both Lightning entry points log.

Under DDP (`m2n2_lightning.distributed`) the engine keeps only this rank's
shard of the resources on the device, scores the candidates on it, and
all-gathers the scores, so that every rank tells the strategy the same
[k, N] scores and makes the same update.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from m2n2_lightning import distributed
from m2n2_lightning.evaluator import (
    EvaluateFn,
    Evaluator,
    ModuleEvaluator,
    resource_batches,
)
from m2n2_lightning.loggers import log_figure
from m2n2_lightning.metrics import class_accuracy, niche_occupancy, save_heatmap
from m2n2_lightning.params import FlatParams
from m2n2_lightning.scoring import ScoreFn, get_score_fn, targets_of
from m2n2_lightning.strategies.base import (
    Strategy,
    rolled_back_on_error,
)
from m2n2_lightning.strategies.children import Children
from m2n2_lightning.checks import check_positive_int


def collect_resources(batches: Iterable[Any], max_examples: int | None = None) -> tuple[Any, Tensor]:
    """Concatenate `(x, y)` batches, or dict batches holding "labels", into one resource set of at most
    `max_examples`: `(x, y)`, or `(the dict, its labels)` for dict batches (the dict is what `forward` gets)."""
    parts, count = [], 0
    for batch in batches:
        if isinstance(batch, Mapping):
            parts.append(dict(batch))
        elif isinstance(batch, (tuple, list)) and len(batch) >= 2:
            parts.append((batch[0], batch[1]))
        else:
            raise ValueError(
                "resources are collected from (inputs, targets) batches or dict batches with 'labels'; got a batch "
                f"of type {type(batch).__name__}. Pass resources=(x, y) explicitly for other batch formats."
            )
        count += batch_length(parts[-1][0] if isinstance(parts[-1], tuple) else parts[-1])
        if max_examples is not None and count >= max_examples:
            break
    if not parts:
        raise ValueError("the training dataloader yielded no batches to use as resources")
    if isinstance(parts[0], dict):
        inputs = {key: torch.cat([part[key] for part in parts])[:max_examples] for key in parts[0]}
        return inputs, targets_of(inputs)
    x, y = torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])
    return (x[:max_examples], y[:max_examples]) if max_examples is not None else (x, y)


def batch_length(inputs: Any) -> int:
    """Number of examples in a tensor or a dict of tensors (its first entry's length)."""
    return len(next(iter(inputs.values()))) if isinstance(inputs, Mapping) else len(inputs)


def slice_batch(inputs: Any, start: int, stop: int) -> Any:
    """Examples [start, stop) of a tensor or of each entry of a dict of tensors."""
    return {k: v[start:stop] for k, v in inputs.items()} if isinstance(inputs, Mapping) else inputs[start:stop]


#: Metrics shown in the progress bar as well as logged.
PROGRESS_BAR_KEYS = ("forward_passes", "train/best_score", "forward_passes_per_second")


class EvolutionEngine:
    """Drives a strategy on a model's flat parameters over resident resources.

    `block_size`: examples scored per forward call; None scores each rank's
    whole shard at once. A fixed value makes the scores bit-identical for any
    number of DDP ranks (see `m2n2_lightning.distributed`).
    """

    UNKNOWN = object()

    def __init__(
        self,
        model: nn.Module,
        strategy: Strategy,
        score_fn: str | ScoreFn = "correctness",
        chunk_size: int | None = None,
        block_size: int | None = None,
        score_dtype: torch.dtype | None = None,
        flat: FlatParams | None = None,
    ) -> None:
        if block_size is not None:
            check_positive_int("block_size", block_size, 1)
        if chunk_size is not None:
            check_positive_int("chunk_size", chunk_size, 1)
        self.model = model
        self.flat = flat or FlatParams(model)
        if strategy.num_params != self.flat.num_params:
            raise ValueError(
                f"{type(strategy).__name__} evolves D = {strategy.num_params} parameters, but "
                f"{type(model).__name__} has {self.flat.num_params}"
            )
        self.strategy = strategy
        self.score_fn = get_score_fn(score_fn)
        self.chunk_size = chunk_size
        self.block_size = block_size
        #: Scoring dtype: None (the model's own) or torch.bfloat16 / float16 (`precision_dtype`).
        self.score_dtype = score_dtype
        #: One evaluator per block of this rank's shard, each holding its examples on the device.
        self.evaluators: list[Evaluator | ModuleEvaluator] = []
        #: Every rank's shard size, in rank order (one entry without DDP).
        self.shard_sizes: list[int] = []
        #: All resource targets, as given (for the per-class metrics).
        self.targets: Tensor | None = None
        self._rate_mark: tuple[float, int] | None = None
        #: SHA-256 of each seed model's tensors (set by whoever read them; part of the resume fingerprint).
        self.seed_digests: list[str] | None = None
        #: `best_token()` of the member the model holds (UNKNOWN: a scored child, or nothing loaded yet).
        self._loaded: Any = self.UNKNOWN

    def attach(self, inputs: Tensor, targets: Tensor) -> None:
        """Move this rank's shard of the resources to the model's device, once, for all later steps."""
        if batch_length(inputs) != len(targets):
            raise ValueError(f"{batch_length(inputs)} inputs but {len(targets)} targets")
        rank, world_size = distributed.world()
        if world_size > 1:
            distributed.check_same_resources(inputs, targets)
        shards = distributed.partition(len(targets), world_size, self.block_size)
        self.shard_sizes = [shard[-1][1] - shard[0][0] for shard in shards]
        self.evaluators = [
            Evaluator(
                self.model, slice_batch(inputs, start, stop), targets[start:stop], self.score_fn, self.chunk_size, self.flat,
                dtype=self.score_dtype,
            )
            for start, stop in shards[rank]
        ]
        self.targets = targets

    def attach_evaluate(self, resources: Dataset | DataLoader, evaluate: EvaluateFn, batch_size: int = 32) -> None:
        """Score by `evaluate(module, batch)` on this rank's contiguous shard of a fixed-order dataset."""
        rank, world_size = distributed.world()
        count = len(resources.dataset if isinstance(resources, DataLoader) else resources)
        shards = distributed.partition(count, world_size, self.block_size)
        self.shard_sizes = [shard[-1][1] - shard[0][0] for shard in shards]
        self.evaluators = [
            ModuleEvaluator(self.model, self.flat, evaluate, resource_batches(resources, start, stop, batch_size))
            for start, stop in shards[rank]
        ]
        self.targets = None

    @torch.no_grad()
    def score(self, children: Children | Tensor) -> Tensor:
        """Scores [k, N] of the children on all resources (this rank's shard, then all-gathered)."""
        if not self.evaluators:
            raise RuntimeError("no resources attached: call attach(inputs, targets) first")
        children = Children.of(children)
        parts = [evaluator(children) for evaluator in self.evaluators]
        if any(isinstance(evaluator, ModuleEvaluator) for evaluator in self.evaluators):
            self._loaded = self.UNKNOWN  # the module now holds the last child scored
        local = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return local if len(self.shard_sizes) == 1 else distributed.all_gather_scores(local, self.shard_sizes)

    @torch.no_grad()
    def start(self) -> None:
        """Score and insert the initial members (`Strategy.start`), unless the strategy has started."""
        if not self.strategy.started:
            self.strategy.start(self.score)
        self.load_best()

    @torch.no_grad()
    def step(self, k: int | None = None) -> None:
        """One ask -> score -> tell step.

        An exception (a second Ctrl-C) before the tell rolls the generator back,
        so the strategy is left exactly at the previous step boundary. With
        vectorised scoring the model then holds the best member (loaded only
        when it changed); with `evaluate` it holds the last child scored until
        `load_best` is called (by the callback, when something reads the model).
        """
        with rolled_back_on_error(self.strategy.generator):
            children = self.strategy.ask(k)
            scores = self.score(children)
        self.strategy.tell(children, scores)
        if self._loaded is not self.UNKNOWN:
            self.load_best()

    @torch.no_grad()
    def load_best(self) -> None:
        """Write the best member into the model's parameters, unless they already hold it."""
        token = self.strategy.best_token()
        if token is not None and token == self._loaded:
            return
        self.strategy.best_children().load_into(0, self.model, self.flat)
        self._loaded = token

    @property
    def forward_passes(self) -> int:
        return self.strategy.forward_passes

    @torch.no_grad()
    def metrics(self) -> dict[str, Tensor | float]:
        """Population metrics for logging (reads the population: one host sync)."""
        scores, fitness = self.strategy.population()
        mean_scores = scores.mean(dim=1)
        out: dict[str, Tensor | float] = {
            "forward_passes": float(self.forward_passes),
            "fitness/max": fitness.max(),
            "fitness/mean": fitness.mean(),
            "train/best_score": mean_scores.max(),
        }
        out.update({f"niche/{k}": v for k, v in niche_occupancy(scores, fitness).items()})
        rate = self.forward_passes_per_second()
        if rate is not None:
            out["forward_passes_per_second"] = rate
        return out

    def forward_passes_per_second(self) -> float | None:
        """Rate since the previous call (None on the first call)."""
        now, done = time.perf_counter(), self.forward_passes
        mark, self._rate_mark = self._rate_mark, (now, done)
        if mark is None or now <= mark[0] or done <= mark[1]:
            return None
        return (done - mark[1]) / (now - mark[0])

    @torch.no_grad()
    def class_accuracy(self, num_classes: int) -> Tensor:
        """Member-by-class accuracy [P, C], members sorted by mean score (best first)."""
        if self.targets is None:
            raise RuntimeError("no resources attached: call attach(inputs, targets) first")
        scores, _ = self.strategy.population()
        order = scores.mean(dim=1).argsort(descending=True)
        return class_accuracy(scores[order].to(self.targets.device), self.targets, num_classes)

    def save_class_heatmap(self, path: str | Path, num_classes: int):
        """Write the member-by-class heatmap PNG; returns the figure."""
        return save_heatmap(self.class_accuracy(num_classes), path)


def precision_dtype(trainer: L.Trainer) -> torch.dtype | None:
    """The scoring dtype that the Trainer's precision asks for: bfloat16 for "bf16-mixed" and
    "bf16-true", float16 for "16-mixed" and "16-true", None (the model's own) otherwise."""
    precision = str(trainer.precision)
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    return None


def log_evolution(module: L.LightningModule, engine: EvolutionEngine) -> None:
    """Log the engine's metrics through `module.log_dict` on the steps Lightning writes logs.

    Metrics are only computed on those steps (they read the population back to
    the host); the progress bar shows forward passes, best score and rate.
    Every logged key costs Lightning a little on every step, so there are few.
    """
    if not module.trainer._logger_connector.should_update_logs:
        return
    metrics = engine.metrics()
    shown = {key: metrics.pop(key) for key in PROGRESS_BAR_KEYS if key in metrics}
    module.log_dict(shown, prog_bar=True, on_step=True, on_epoch=False)
    module.log_dict(metrics, on_step=True, on_epoch=False)


def save_and_log_heatmap(trainer: L.Trainer, engine: EvolutionEngine, num_classes: int) -> Path | None:
    """On rank zero: write the member-by-class heatmap beside the logs, and log it where the logger takes figures."""
    if engine.targets is None:
        return None
    directory = trainer.log_dir or trainer.default_root_dir  # every rank: a broadcast under DDP
    if not trainer.is_global_zero:
        return None
    path = Path(directory) / "class_accuracy.png"
    figure = engine.save_class_heatmap(path, num_classes)
    log_figure(trainer.loggers, "niche/class_accuracy", figure, trainer.global_step)
    import matplotlib.pyplot as plt

    plt.close(figure)
    return path
