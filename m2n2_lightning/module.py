"""`EvolutionModule`: a LightningModule whose training step is one evolution step.

Choice for Lightning's step counter: with `automatic_optimization = False`
Lightning counts a step each time an optimizer's `step()` is called through
`self.optimizers()`. `configure_optimizers` therefore returns an
`EvolutionOptimizer`, a `torch.optim.Optimizer` over the model's parameters
whose `step()` *is* the ask -> score -> tell step. `trainer.global_step` then
advances by one per evolution step, and `max_steps`, `val_check_interval`,
`ModelCheckpoint(every_n_train_steps=...)` and the loggers' x-axes all work.
The strategy itself stays an `nn.Module` (a submodule here), so its archive,
scores and generator state are in the module's `state_dict` and in every
Lightning checkpoint.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable

import lightning as L
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from m2n2_lightning.distributed import warn_if_wrapped
from m2n2_lightning.engine import (
    EvolutionEngine,
    collect_resources,
    log_evolution,
    precision_dtype,
    save_and_log_heatmap,
)
from m2n2_lightning.scoring import ScoreFn
from m2n2_lightning.strategies import M2N2Strategy, Strategy


class EvolutionOptimizer(torch.optim.Optimizer):
    """An evolution step presented as an optimizer step (see the module docstring).

    It holds no state of its own: everything lives in the strategy.
    """

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


class EvolutionModule(L.LightningModule):
    """Evolve `model`'s parameters with a gradient-free `strategy` under a Lightning Trainer.

    Args:
        model: the network; after every step its parameters hold the best member.
        strategy: an ask/tell strategy (default: `M2N2Strategy()`, the paper's settings).
        score_fn: per-example score, "correctness" (the paper's), "true_class_probability"
            or a callable (logits [k, N, C], targets [N]) -> [k, N] in [0, 1].
        chunk_size: candidates scored at once (None: all k together).
        num_classes: for the accuracy metrics; default: the datamodule's `num_classes`.
        max_resources: cap on the examples collected as resources when the
            datamodule has no `train_tensors` (default: all).
        heatmap: save the member-by-class accuracy heatmap at the end of fit.
        block_size: examples scored per forward call (None: all of a rank's
            shard at once). Under DDP, a fixed value gives bit-identical results
            for any number of ranks (see `m2n2_lightning.distributed`).

    The resources are the datamodule's `train_tensors` when it has them, else
    the batches of the train dataloader, gathered once and moved to the device
    once. Each training batch only paces the steps.

    Load a checkpoint with `EvolutionModule.load_from_checkpoint(path, model=...,
    strategy=...)`: modules are not hyperparameters, so pass fresh instances of
    the same architecture and settings; the weights and the evolutionary state
    come from the checkpoint.
    """

    def __init__(
        self,
        model: nn.Module,
        strategy: Strategy | None = None,
        score_fn: str | ScoreFn = "correctness",
        chunk_size: int | None = None,
        num_classes: int | None = None,
        max_resources: int | None = None,
        heatmap: bool = True,
        block_size: int | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model", "strategy"] + ([] if isinstance(score_fn, str) else ["score_fn"]))
        self.automatic_optimization = False
        self.model = model
        self.strategy = strategy if strategy is not None else M2N2Strategy()
        self.engine = EvolutionEngine(model, self.strategy, score_fn, chunk_size, block_size)
        self.num_classes = num_classes
        self.max_resources = max_resources
        self.heatmap = heatmap
        self.heatmap_path: Path | None = None
        self.val_acc: MulticlassAccuracy | None = None
        self.test_acc: MulticlassAccuracy | None = None

    # --------------------------------------------------------------- set-up
    def setup(self, stage: str) -> None:
        check_precision(self.trainer)
        self.engine.score_dtype = precision_dtype(self.trainer)
        warn_if_wrapped(self.trainer)
        if self.num_classes is None:
            self.num_classes = getattr(self.trainer.datamodule, "num_classes", None)
        if self.num_classes is None:
            raise ValueError(
                "EvolutionModule needs num_classes for its accuracy metrics: pass num_classes=... "
                "or use a datamodule with a num_classes attribute"
            )
        if self.val_acc is None:
            self.val_acc = MulticlassAccuracy(self.num_classes, average="micro")
            self.test_acc = MulticlassAccuracy(self.num_classes, average="micro")

    def configure_optimizers(self) -> EvolutionOptimizer:
        return EvolutionOptimizer(self.model.parameters(), self.engine.step)

    def on_fit_start(self) -> None:
        inputs, targets = self._resources()
        self.engine.attach(inputs, targets)  # moved to self.device here, once
        self.engine.initialize()

    def _resources(self) -> tuple[Tensor, Tensor]:
        datamodule = self.trainer.datamodule
        if datamodule is not None and hasattr(datamodule, "train_tensors"):
            inputs, targets = datamodule.train_tensors
            if self.max_resources is not None:
                inputs, targets = inputs[: self.max_resources], targets[: self.max_resources]
            return inputs, targets
        return collect_resources(self.trainer.fit_loop._data_source.dataloader(), self.max_resources)

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        # A training batch only paces the steps: the resources are already resident,
        # and copying the batch to the device every step would cost more than a step.
        if self.trainer is not None and self.trainer.training:
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    # ----------------------------------------------------------------- steps
    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        self.optimizers().step()
        log_evolution(self, self.engine)

    def _accuracy_step(self, batch: Any, metric: MulticlassAccuracy, name: str) -> None:
        x, y = batch[0], batch[1]
        metric.update(self(x), y)
        self.log(name, metric, on_step=False, on_epoch=True, prog_bar=True)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._accuracy_step(batch, self.val_acc, "val/acc")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._accuracy_step(batch, self.test_acc, "test/acc")

    # ---------------------------------------------------------------- outputs
    def on_fit_end(self) -> None:
        if self.heatmap:
            self.heatmap_path = save_and_log_heatmap(self.trainer, self.engine, self.num_classes)

    def best_model(self) -> nn.Module:
        """A plain copy of the model holding the best member, in eval mode."""
        return copy.deepcopy(self.model).eval()
