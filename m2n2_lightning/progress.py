"""A progress bar in the unit users think in: forward passes out of the budget."""

from __future__ import annotations

import sys
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ProgressBar
from tqdm.auto import tqdm

from m2n2_lightning.callback import M2N2Callback


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

    def _evolution(self, trainer: L.Trainer) -> M2N2Callback | None:
        return next((c for c in trainer.callbacks if isinstance(c, M2N2Callback)), None)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        evolution = self._evolution(trainer)
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
        evolution = self._evolution(trainer)
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
