"""`EvolutionModule`: a LightningModule that evolves a model with a gradient-free strategy.

It is thin on purpose: the evolution (step, resources, logging, checkpoint
state, DDP) is `M2N2Callback`, which the module returns from
`configure_callbacks`. The module adds what a classifier run needs: manual
optimization whose `training_step` is one `optimizers().step()` (the
callback's `EvolutionOptimizer`), and validation / test accuracy of the best
member, which the model's parameters always hold.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import lightning as L
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from m2n2_lightning.callback import M2N2Callback
from m2n2_lightning.checkpointing import load_checkpoint_file
from m2n2_lightning.optimizer import EvolutionOptimizer
from m2n2_lightning.scoring import ScoreFn
from m2n2_lightning.strategies.base import StrategySpec


class EvolutionModule(L.LightningModule):
    """Evolve `model`'s parameters with a gradient-free `strategy` under a Lightning Trainer.

    Args:
        model: the network; after every step its parameters hold the best member.
        strategy: a strategy factory (called with `num_params=D`), e.g.
            `functools.partial(M2N2Strategy, pop_size=20)`, or a built strategy
            of the model's D; default: `M2N2Strategy` with the paper's settings.
        num_classes: for the accuracy metrics; default: the datamodule's `num_classes`.
        **evolution: the other `M2N2Callback` arguments (`score_fn`,
            `chunk_size`, `block_size`, `steps_per_batch`, `max_forward_passes`,
            `init_from`, `max_resources`, `heatmap`, ...).

    The resources are the datamodule's `train_tensors` when it has them, else
    the batches of the train dataloader, gathered once and moved to the device
    once. `EvolutionModule.load_from_checkpoint(path, model=MLP(...))` gives the
    best member of a run; `trainer.fit(..., ckpt_path=path)` resumes the run.
    """

    def __init__(
        self,
        model: nn.Module,
        strategy: StrategySpec | None = None,
        num_classes: int | None = None,
        score_fn: str | ScoreFn = "correctness",
        **evolution: Any,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model", "strategy"] + ([] if isinstance(score_fn, str) else ["score_fn"]))
        self.automatic_optimization = False
        self.model = model
        evolution.setdefault("max_resources", None)
        self.evolution = M2N2Callback(strategy=strategy, score_fn=score_fn, model=model, **evolution)
        self.num_classes = num_classes
        self.val_acc: MulticlassAccuracy | None = None
        self.test_acc: MulticlassAccuracy | None = None

    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls, checkpoint_path: str | os.PathLike, *args: Any, weights_only: bool = True, **kwargs: Any
    ) -> EvolutionModule:
        """Lightning's `load_from_checkpoint` with `weights_only=True` unless asked otherwise: loading never
        runs code from the file (whatever `TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD` says), and a crafted, empty or
        corrupted file is refused with the reason, as `ckpt_path=` and `init_from` refuse it."""
        try:
            return super().load_from_checkpoint(checkpoint_path, *args, weights_only=weights_only, **kwargs)
        except Exception:
            if isinstance(checkpoint_path, (str, os.PathLike)):
                load_checkpoint_file(checkpoint_path)  # raises the ValueError saying what is wrong with the file
            raise

    @property
    def strategy(self):
        """The strategy being run (built when fit starts)."""
        return self.evolution.strategy

    @property
    def engine(self):
        return self.evolution.engine

    def configure_callbacks(self) -> list[M2N2Callback]:
        return [] if self.evolution in self.trainer.callbacks else [self.evolution]

    def configure_optimizers(self) -> EvolutionOptimizer:
        return self.evolution.optimizer(self)

    def setup(self, stage: str) -> None:
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

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        self.optimizers().step()

    def _accuracy_step(self, batch: Any, metric: MulticlassAccuracy, name: str) -> None:
        x, y = batch[0], batch[1]
        metric.update(self(x), y)
        self.log(name, metric, on_step=False, on_epoch=True, prog_bar=True)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._accuracy_step(batch, self.val_acc, "val/acc")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._accuracy_step(batch, self.test_acc, "test/acc")

    @property
    def heatmap_path(self):
        return self.evolution.heatmap_path

    def best_model(self) -> nn.Module:
        """A plain copy of the model holding the best member, in eval mode."""
        return copy.deepcopy(self.model).eval()
