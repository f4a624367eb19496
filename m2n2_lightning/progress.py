"""What a run shows of its progress: a bar in the unit users think in (forward passes out of the budget), and
the accuracy curve, recorded for any logger and kept in the checkpoint."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, ProgressBar
from tqdm.auto import tqdm

from m2n2_lightning.callback import M2N2Callback
from m2n2_lightning.metrics import CURVES, save_accuracy_plot


def evolution_of(trainer: L.Trainer) -> M2N2Callback | None:
    """The trainer's evolution callback (an `EvolutionModule`'s too), if it has one."""
    return next((c for c in trainer.callbacks if isinstance(c, M2N2Callback)), None)


class EvolutionProgressBar(ProgressBar):
    """Forward passes done / budget (integers), the rate, the ETA and the best member's training score,
    updated every training step; validation and testing show no bar of their own."""

    def __init__(self, budget: int) -> None:
        super().__init__()
        self.budget = budget
        self._enabled = True
        self._bar: tqdm | None = None

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        evolution = evolution_of(trainer)
        if not self._enabled or evolution is None:
            return
        self._bar = tqdm(
            total=self.budget,
            initial=evolution.engine.forward_passes,
            desc="forward passes",
            unit="fp",
            dynamic_ncols=True,
            file=sys.stdout,
            smoothing=0.1,
        )

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        evolution = evolution_of(trainer)
        if self._bar is None or evolution is None:
            return
        self._bar.update(evolution.engine.forward_passes - self._bar.n)
        if trainer.global_step % 10 == 0 or evolution.engine.forward_passes >= self.budget:
            best = float(evolution.engine.strategy.population()[0].mean(dim=1).max())
            self._bar.set_postfix(best_train=f"{best:.4f}", refresh=False)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class AccuracyCurve(Callback):
    """The best member's training accuracy (each logged step and the end) and validation accuracy (each
    validation) against forward passes, whatever the logger. The points are this callback's checkpoint state,
    so a resumed run's curve covers the whole run; `save(path, test_acc, title)` draws it."""

    def __init__(self) -> None:
        #: (forward passes, accuracy) points of each of `metrics.CURVES`.
        self.points: dict[str, list[list[float]]] = {key: [] for key in CURVES}

    def _add(self, key: str, forward_passes: float, value: float) -> None:
        points = self.points[key]
        if not points or forward_passes > points[-1][0]:
            points.append([float(forward_passes), float(value)])

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        logged = trainer.callback_metrics  # the values of the latest logging step, logged together
        if "forward_passes" in logged and "train/best_score" in logged:
            self._add("train/best_score", logged["forward_passes"], logged["train/best_score"])

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        evolution = evolution_of(trainer)
        if not trainer.sanity_checking and evolution is not None and "val/acc" in trainer.callback_metrics:
            self._add("val/acc", evolution.engine.forward_passes, trainer.callback_metrics["val/acc"])

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        evolution = evolution_of(trainer)
        if evolution is not None and evolution.engine is not None and evolution.engine.strategy.started:
            best = evolution.engine.strategy.population()[0].mean(dim=1).max()
            self._add("train/best_score", evolution.engine.forward_passes, best)

    def state_dict(self) -> dict[str, Any]:
        return {"points": self.points}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.points = {key: [list(p) for p in state_dict["points"].get(key, [])] for key in CURVES}

    def save(self, path: str | Path, test_acc: float | None = None, title: str = "") -> Path | None:
        """Write the PNG (None when nothing was recorded)."""
        return save_accuracy_plot(self.points, path, test_acc, title)
