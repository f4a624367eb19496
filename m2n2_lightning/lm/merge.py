"""One language-model merge run: a strategy over two or more seed models, through `M2N2Callback` and a Trainer.

`merge_models` is what examples/merge_language_models.py, `train.py experiment=lm_merge` and
`benchmarks/compare.py --setting lm_merge` all call. It scores every candidate with the
`evaluate` hook (e.g. exact match of greedy generation on the training prompts), records the
population's niche coverage and fitness entropy after every evolution step (the curves of the
paper's figure 5, docs/ALGORITHM.md "Beyond the digits") and returns the test accuracy of the
best member on each test set. Nothing here is specific to the small models of this package:
any `transformers` causal LM, prompt dataset and scoring function fit.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import Dataset

from m2n2_lightning.callback import M2N2Callback
from m2n2_lightning.evaluator import EvaluateFn
from m2n2_lightning.lm.tasks import accuracy, exact_match
from m2n2_lightning.metrics import niche_occupancy
from m2n2_lightning.merging.seeds import SeedSource
from m2n2_lightning.strategies.base import StrategySpec
from m2n2_lightning.checks import check_positive_int

#: `test_fn(model, dataset) -> accuracy`, e.g. `tasks.accuracy` (mean exact match).
AccuracyFn = Callable[[nn.Module, Any], float]
#: Training steps in one epoch of `LanguageModel`'s pacing dataloader (all ranks together under DDP).
PACING_STEPS = 1000
#: The keys of each `MergeResult.curve` row.
CURVE_KEYS = ("forward_passes", "wall_seconds", "coverage", "fitness_entropy", "best_score")


class LanguageModel(L.LightningModule):
    """A causal LM in a LightningModule, as a user has one; `training_step` only monitors (nothing is learnt).

    The evolution callback evolves `self.model` (the `transformers` model), so
    seed directories written by `save_pretrained` match its parameter names.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """A constant loss: nothing is learnt (the callback skips the backward pass), and Lightning's DDP
        refuses a `training_step` that returns None."""
        return torch.zeros((), device=self.device)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)  # replaced by the evolution step, never stepped

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        """Paces the training steps only (the candidates are scored on the callback's resources): `PACING_STEPS`
        steps an epoch, bounded so that DDP's sampler shuffles a small index list (epochs repeat until the budget)."""
        return torch.utils.data.DataLoader(range(PACING_STEPS), batch_size=1)


@dataclass
class AccuracyPoint:
    """The best member's test accuracies after `forward_passes` evaluations and `wall_seconds` of search."""

    forward_passes: int
    wall_seconds: float
    test: dict[str, float]


@dataclass
class MergeResult:
    """What one merge run returns (and what the entry points write)."""

    #: Test accuracy of the final best member on each test set, by name.
    test: dict[str, float]
    #: `test_fn` of the final best member on the training resources (exact match by default).
    train: float
    #: Evaluations done (candidates scored on all resources; the initial seeds are not counted).
    forward_passes: int
    #: Seconds of the search (the seeds' own scoring included), without the test evaluations.
    wall_seconds: float
    #: One row per evolution step and one at the start (forward passes 0), with `CURVE_KEYS`.
    curve: list[dict[str, Any]] = field(default_factory=list)
    #: The test accuracies at the start, every `test_every` evaluations and at the end.
    test_points: list[AccuracyPoint] = field(default_factory=list)
    #: The strategy's settings (`settings_of`).
    settings: dict[str, Any] = field(default_factory=dict)


def population_point(evolution: M2N2Callback) -> dict[str, Any]:
    """Coverage, fitness entropy (`metrics.niche_occupancy`) and best mean training score of the population now."""
    scores, fitness = evolution.engine.strategy.population()
    point = {"forward_passes": evolution.engine.forward_passes}
    if scores.numel():  # (empty for a generation-based strategy before its first tell)
        niches = niche_occupancy(scores.float(), fitness.float())
        point.update(coverage=float(niches["coverage"]), fitness_entropy=float(niches["fitness_entropy"]),
                     best_score=float(scores.float().mean(dim=1).max()))
    return point


class CurveRecorder(Callback):
    """Records `population_point` after every training step, and the test accuracies every `test_every` evaluations.

    The clock runs from the recorder's creation and stops while the test sets
    are scored, so `wall_seconds` is the search's own time. The rows are
    Lightning callback state: a resumed run keeps the curve before the checkpoint.
    """

    def __init__(self, evolution: M2N2Callback, tests: Mapping[str, Any], test_fn: AccuracyFn, test_every: int = 0) -> None:
        self.evolution, self.tests, self.test_fn = evolution, tests, test_fn
        self.test_every = check_positive_int("test_every", test_every, 0)
        self.curve: list[dict[str, Any]] = []
        self.test_points: list[AccuracyPoint] = []
        self.seconds = 0.0
        self._mark = time.perf_counter()

    def _tick(self) -> None:
        now = time.perf_counter()
        self.seconds += now - self._mark
        self._mark = now

    def test_now(self) -> AccuracyPoint:
        """Every test set's accuracy of the current best member, off the clock."""
        self._tick()
        self.evolution.engine.load_best()  # the model may hold the last child scored
        model = self.evolution.engine.model
        point = AccuracyPoint(self.evolution.engine.forward_passes, self.seconds,
                          {name: float(self.test_fn(model, data)) for name, data in self.tests.items()})
        self._mark = time.perf_counter()
        return point

    def _record(self) -> None:
        self._tick()
        point = {**population_point(self.evolution), "wall_seconds": self.seconds}
        done = point["forward_passes"]
        if not self.curve or self.curve[-1]["forward_passes"] < done:
            self.curve.append(point)
        last = self.test_points[-1].forward_passes if self.test_points else None
        if last is None or (self.test_every and done // self.test_every > last // self.test_every):
            self.test_points.append(self.test_now())

    def final_point(self) -> AccuracyPoint:
        """The test point at the current forward passes (the best member is tested now where there is none)."""
        if self.test_points[-1].forward_passes != self.evolution.engine.forward_passes:
            self.test_points.append(self.test_now())
        return self.test_points[-1]

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._record()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._record()

    def state_dict(self) -> dict[str, Any]:
        points = [(p.forward_passes, p.wall_seconds, p.test) for p in self.test_points]
        return {"curve": self.curve, "test_points": points, "seconds": self.seconds}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.curve = list(state_dict["curve"])
        self.test_points = [AccuracyPoint(int(n), float(s), dict(t)) for n, s, t in state_dict["test_points"]]
        self.seconds = float(state_dict["seconds"])
        self._mark = time.perf_counter()


def write_curve(rows: Sequence[dict[str, Any]], path: str | Path, keys: Sequence[str] = ()) -> None:
    """Curve rows as CSV: the columns `keys` (e.g. method, seed), then `CURVE_KEYS` (empty before a first population)."""
    with Path(path).open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*keys, *CURVE_KEYS])
        writer.writeheader()
        writer.writerows(rows)


def quiet_trainer(**options: Any) -> L.Trainer:
    """A Trainer without logger, checkpoints, progress bar or model summary (the default of `merge_models`)."""
    defaults = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    return L.Trainer(**{**defaults, **options})


def merge_models(
    strategy: StrategySpec,
    seeds: Sequence[SeedSource],
    model: nn.Module,
    resources: Dataset,
    tests: Mapping[str, Any],
    evaluations: int,
    score: EvaluateFn = exact_match,
    test_fn: AccuracyFn = accuracy,
    resource_batch_size: int = 200,
    block_size: int | None = None,
    test_every: int = 0,
    trainer: Callable[..., L.Trainer] = quiet_trainer,
    callbacks: Sequence[Callback] = (),
    ckpt_path: str | None = None,
) -> MergeResult:
    """Merge `seeds` with `strategy` for `evaluations` scored candidates; `model` then holds the best member.

    Args:
        strategy: a strategy factory (called with D, the seeds as `init_models` and the layout), e.g.
            `functools.partial(M2N2Strategy, pop_size=15, warmup_steps=50, storage="coefficients")`.
        seeds: two or more seed models of `model`'s architecture: `save_pretrained` directories, hub ids,
            files or modules (`m2n2_lightning.merging.seeds`).
        model: the `transformers` model that holds each candidate while it is scored (e.g. the base).
        resources: the fixed-order training prompts every candidate is scored on.
        tests: named test sets, each scored by `test_fn(model, data)` at the start and the end of the search.
        evaluations: the budget; the run stops exactly there (CMA-ES: at the end of the generation).
        score: `evaluate(model, batch) -> [B]` in [0, 1], the per-prompt score (eq. 5's s_ij).
        test_fn: the accuracy reported on `tests` and on the training resources.
        resource_batch_size: prompts per `score` call.
        block_size: prompts per evaluator block (`M2N2Callback`); a multiple of `resource_batch_size` gives
            the same batches, hence bit-identical scores, on any number of DDP ranks.
        test_every: also test the best member every this many evaluations (0: at the start and the end only).
        trainer: a Trainer factory, called with `max_steps` and `callbacks` (default: a quiet Trainer).
        callbacks: more callbacks for the Trainer (checkpoints, progress bar, ...).
        ckpt_path: resume from this Lightning checkpoint of an earlier, interrupted merge.
    """
    check_positive_int("evaluations", evaluations, 1)
    if isinstance(seeds, (str, bytes)) or len(seeds) < 2:
        raise ValueError(f"seeds must be a list of two or more seed models, got {seeds!r}")
    if not tests:
        raise ValueError("tests must name at least one test set, e.g. {'add': pairs}")
    evolution = M2N2Callback(
        strategy=strategy, init_from=list(seeds), evaluate=score, resources=resources, model=model,
        resource_batch_size=resource_batch_size, block_size=block_size, max_forward_passes=evaluations, heatmap=False,
        best_in_training_step=False,
    )
    recorder = CurveRecorder(evolution, tests, test_fn, test_every)
    module = LanguageModel(model)
    # Each step scores at least one candidate, and the callback stops fit once the budget is spent.
    fit = trainer(max_steps=evaluations, callbacks=[evolution, recorder, *callbacks])
    fit.fit(module, ckpt_path=ckpt_path, weights_only=True)
    model.eval()
    final = recorder.final_point()
    return MergeResult(
        test=dict(final.test),
        train=float(test_fn(model, resources)),
        forward_passes=final.forward_passes,
        wall_seconds=final.wall_seconds,
        curve=recorder.curve,
        test_points=recorder.test_points,
        settings=settings_of(evolution.engine.strategy),
    )


def settings_of(strategy: Any) -> dict[str, Any]:
    """`Strategy.settings()`, plus the archive's class where there is one (dense or coefficient storage)."""
    archive = getattr(strategy, "archive", None)
    return {**strategy.settings(), **({"archive": type(archive).__name__} if archive is not None else {})}
