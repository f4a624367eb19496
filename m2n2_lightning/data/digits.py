"""scikit-learn's embedded 8x8 digits, split as in the M2N2 paper."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits

from m2n2_lightning.data.base import TensorDataModule, TensorPair

__all__ = ["DigitsDataModule"]

#: The paper's split of the 1,797 digits: the first 80% train, the last 20% test, unshuffled.
DIGITS_TOTAL = 1797
DIGITS_TRAIN = 1437
DIGITS_TEST = DIGITS_TOTAL - DIGITS_TRAIN


class DigitsDataModule(TensorDataModule):
    """The 1,797 8x8 digits of ``sklearn.datasets.load_digits`` (no download).

    Defaults follow the paper: the first 1,437 examples (80%) are the training
    set, the last 360 the test set, in their original order; inputs are the
    raw pixel values 0..16 as ``float32`` of shape ``[N, 64]``, labels ``int64``.

    Args:
        normalize: divide the pixels by 16, giving values in [0, 1].
        val_size: take the last ``val_size`` training examples as the
            validation set. With 0 (default, the paper's split: all 1,437 are
            resources) there is no validation loop.
        batch_size: examples per batch of the data loaders; None (default)
            gives each split as a single full batch.
        steps_per_epoch: repeat the training batches to this many per epoch
            (None: one pass). Evolution runs set it (see conf/data/).
    """

    num_classes = 10
    input_dim = 64

    def __init__(
        self, *, normalize: bool = False, val_size: int = 0, batch_size: int | None = None, steps_per_epoch: int | None = None
    ) -> None:
        if not isinstance(normalize, bool):
            raise ValueError(f"normalize={normalize!r} is not allowed: expected True or False")
        super().__init__(num_train=DIGITS_TRAIN, val_size=val_size, batch_size=batch_size, steps_per_epoch=steps_per_epoch)
        self.normalize = normalize

    def load(self) -> tuple[TensorPair, TensorPair]:
        """Read the digits from scikit-learn and split them 1,437 / 360."""
        digits = load_digits()
        x = torch.from_numpy(digits.data.astype(np.float32))
        y = torch.from_numpy(digits.target.astype(np.int64))
        if self.normalize:
            x = x / 16.0
        return (x[:DIGITS_TRAIN], y[:DIGITS_TRAIN]), (x[DIGITS_TRAIN:], y[DIGITS_TRAIN:])
