"""Taking over a Trainer's optimization for evolution during fit, and handing it back afterwards.

Lightning has called `configure_optimizers` (and restored a checkpoint) by
`on_fit_start`; there the trainer's optimizers are replaced by one
`EvolutionOptimizer` whose `step()` is the evolution step, and the
learning-rate schedulers are dropped (they would schedule an optimizer that
never steps). Lightning's optimizer step, hooks and step counter then work
unchanged. Under automatic optimization `training_step` still runs, as a
monitor of the best member; its backward pass is skipped with the fit loop's
`_skip_backward` switch (the one Lightning's `StochasticWeightAveraging` uses)
and `requires_grad` is off, so no autograd graph is built. Both are restored
when fit ends or fails.
"""

from __future__ import annotations

import lightning as L

from m2n2_lightning.optimizer import EvolutionOptimizer


class OptimizationTakeover:
    """Install the evolution optimizer and switch gradients off (`take_over`); restore them (`hand_back`)."""

    def __init__(self) -> None:
        self._requires_grad: list[bool] | None = None

    def take_over(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: EvolutionOptimizer) -> None:
        """Make `optimizer` the trainer's only optimizer, without schedulers; no backward pass, no autograd."""
        trainer.strategy.optimizers = [optimizer]
        trainer.strategy.lr_scheduler_configs = []
        if pl_module.automatic_optimization:
            trainer.fit_loop._skip_backward = True
            self._requires_grad = [p.requires_grad for p in pl_module.parameters()]
            pl_module.requires_grad_(False)

    def hand_back(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Undo `take_over`'s switches: the backward pass and each parameter's `requires_grad`."""
        trainer.fit_loop._skip_backward = False
        if self._requires_grad is not None:
            for p, flag in zip(pl_module.parameters(), self._requires_grad):
                p.requires_grad_(flag)
            self._requires_grad = None
