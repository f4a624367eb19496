"""The two specialists of the paper's merging experiment, trained with Lightning and Adam.

Each is the paper's MLP (the reference's parameter layout, so that a split
point falls where it falls there) with every parameter drawn from
N(0, 0.01^2), trained with Adam (learning rate 3e-3) for 10 full-batch steps
of cross-entropy on the training examples of digits 0-4, and of digits 5-9
(docs/ALGORITHM.md). M2N2 then merges the two without gradients.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from m2n2_lightning.data.base import TensorBatches, TensorDataModule
from m2n2_lightning.models import MLP

#: The paper's two specialists: digits 0-4 and digits 5-9.
SPECIALIST_CLASSES: tuple[tuple[int, ...], ...] = ((0, 1, 2, 3, 4), (5, 6, 7, 8, 9))


class Classifier(L.LightningModule):
    """An MLP trained the ordinary way, with cross-entropy and Adam (nothing M2N2-specific)."""

    def __init__(
        self, in_features: int = 64, hidden: int = 256, out_features: int = 10, lr: float = 3e-3, init_std: float = 0.01
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = MLP(in_features, hidden, out_features)
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Draw every parameter from N(0, init_std^2)."""
        for p in self.parameters():
            nn.init.normal_(p, std=self.hparams.init_std, generator=generator)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = nn.functional.cross_entropy(logits, y)
        self.log("train/loss", loss)
        self.log("train/acc", (logits.argmax(dim=1) == y).float().mean())
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def train_specialist(
    x: Tensor,
    y: Tensor,
    classes: Sequence[int],
    generator: torch.Generator,
    num_classes: int = 10,
    hidden: int = 256,
    steps: int = 10,
    lr: float = 3e-3,
    init_std: float = 0.01,
    **trainer_kwargs: Any,
) -> Classifier:
    """A `Classifier` trained for `steps` full-batch Adam steps on the examples whose label is in `classes`.

    Its initial parameters are drawn from `generator`; `trainer_kwargs` go to
    the `L.Trainer` (default: CPU, no logger, no checkpoints, quiet).
    """
    keep = torch.isin(y, torch.tensor(list(classes)))
    if not keep.any():
        raise ValueError(f"no training example has a label in {list(classes)}")
    model = Classifier(x[0].numel(), hidden, num_classes, lr, init_std)
    model.reset_parameters(generator)
    options: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    options.update(trainer_kwargs)
    batches = TensorBatches((x[keep], y[keep]), batch_size=None, length=steps)
    L.Trainer(max_steps=steps, **options).fit(model, DataLoader(batches, batch_size=None))
    return model.eval()


def train_specialists(
    data: TensorDataModule,
    seed: int = 0,
    classes: Sequence[Sequence[int]] = SPECIALIST_CLASSES,
    hidden: int = 256,
    steps: int = 10,
    lr: float = 3e-3,
    init_std: float = 0.01,
) -> list[Classifier]:
    """One specialist per group of `classes` on `data`'s training split (the paper's two by default).

    The initial parameters of all of them are drawn in turn from one generator seeded with `seed`.
    """
    generator = torch.Generator().manual_seed(seed)
    x, y = data.train_tensors
    return [
        train_specialist(x, y, group, generator, data.num_classes, hidden, steps, lr, init_std) for group in classes
    ]
