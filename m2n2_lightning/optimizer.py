"""The evolution step presented to Lightning as an optimizer step.

Lightning counts a training step when an optimizer steps (through its
`LightningOptimizer` wrapper, in automatic and in manual optimization). The
`EvolutionOptimizer` is a `torch.optim.Optimizer` over the module's
parameters whose `step()` *is* the evolution step, so `trainer.global_step`,
`max_steps`, `val_check_interval`, checkpoint intervals and the loggers' x-axes
all work. It holds no state of its own: everything lives in the strategy.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.precision import MixedPrecision


class EvolutionOptimizer(torch.optim.Optimizer):
    """An optimizer whose `step()` runs `step_fn` (after the closure, when Lightning passes one)."""

    def __init__(self, params: Any, step_fn: Callable[[], None]) -> None:
        super().__init__(params, defaults={})
        self._step_fn = step_fn

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._step_fn()
        return loss


def check_precision(trainer: L.Trainer) -> None:
    """Refuse precision plugins that scale gradients: there are none here."""
    plugin = trainer.precision_plugin
    # Lightning gives precision="16-mixed" a GradScaler on GPUs (on the CPU it falls back to bf16-mixed).
    if isinstance(plugin, MixedPrecision) and plugin.scaler is not None:
        raise ValueError(
            f"precision={trainer.precision!r} uses a gradient scaler, but M2N2 computes no gradients "
            "and the scaler would refuse the step. Use precision='32-true' (default), 'bf16-mixed' "
            "or '16-true'."
        )
