"""What the digits and MNIST data modules share: splits held as in-memory tensors."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

__all__ = ["TensorBatches", "TensorDataModule", "TensorPair"]

#: ``(inputs, labels)``, both on the CPU.
TensorPair = tuple[torch.Tensor, torch.Tensor]


class TensorBatches(Dataset):
    """Consecutive batches of a tensor pair, served as slices (views, no copy, no collate).

    Used with ``DataLoader(..., batch_size=None)``: a full-batch step costs
    nothing, where ``TensorDataset`` would index and stack every example.

    With ``length`` the batches repeat in order until ``length`` were served:
    an "epoch" of that many steps, for step-based loops such as evolution.
    """

    def __init__(self, pair: TensorPair, batch_size: int | None, length: int | None = None) -> None:
        self.pair = pair
        self.batch_size = batch_size or len(pair[0])
        self.num_batches = -(-len(pair[0]) // self.batch_size)
        self.length = length or self.num_batches

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> TensorPair:
        if not 0 <= index < len(self):
            raise IndexError(index)
        start = (index % self.num_batches) * self.batch_size
        x, y = self.pair
        return x[start : start + self.batch_size], y[start : start + self.batch_size]


def _check_count(name: str, value: object, *, minimum: int, allow_none: bool = False) -> None:
    """Raise a ValueError unless ``value`` is an int >= ``minimum`` (or None when allowed)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        allowed = f"an int >= {minimum}" + (" or None" if allow_none else "")
        raise ValueError(f"{name}={value!r} is not allowed: expected {allowed}")


class TensorDataModule(L.LightningDataModule):
    """A data module whose splits are whole CPU tensors, loaded once.

    Subclasses implement :meth:`load`, returning the training part and the
    test set. The last ``val_size`` training examples become the validation
    set; with ``val_size=0`` (the default: the paper's protocol has only a train
    and a test split) there is no validation loop, so nothing selects on the test set.

    The tensors are available as :attr:`train_tensors`, :attr:`val_tensors`
    and :attr:`test_tensors` (each ``(x, y)`` on the CPU; the caller moves them
    to its device once). Accessing them before :meth:`setup` runs it. The data
    loaders serve the same tensors in order, ``batch_size`` examples at a time
    (``None``: the whole split as a single batch). ``steps_per_epoch`` makes
    the training loader repeat its batches to that many per epoch: evolution
    takes one step per batch, and one-batch epochs would spend more time in
    Lightning's per-epoch bookkeeping (and progress bar) than in the step.
    """

    #: Number of classes of the labels.
    num_classes: int
    #: Number of input features of one example (the product of its shape).
    input_dim: int

    def __init__(
        self, *, num_train: int, val_size: int = 0, batch_size: int | None = None, steps_per_epoch: int | None = None
    ) -> None:
        """``num_train``: size of the training part :meth:`load` returns, before the validation split."""
        super().__init__()
        _check_count("val_size", val_size, minimum=0)
        _check_count("batch_size", batch_size, minimum=1, allow_none=True)
        _check_count("steps_per_epoch", steps_per_epoch, minimum=1, allow_none=True)
        if val_size >= num_train:
            raise ValueError(
                f"val_size={val_size} is not allowed: it must be smaller than the {num_train} training examples"
            )
        self.num_train = num_train
        self.val_size = val_size
        self.batch_size = batch_size
        self.steps_per_epoch = steps_per_epoch
        self._splits: dict[str, TensorPair] | None = None
        self._val_switch: tuple[L.Trainer, int | float] | None = None  # a Trainer and its limit_val_batches

    def load(self) -> tuple[TensorPair, TensorPair]:
        """Return ``(train, test)`` as CPU tensor pairs, train holding ``num_train`` examples."""
        raise NotImplementedError(f"{type(self).__name__} must implement load()")

    def setup(self, stage: str | None = None) -> None:
        """Load the data (once) and split off the validation set.

        Without a validation split (`val_size=0`) a fit runs no validation loop: the
        Trainer's `limit_val_batches` is 0 for that fit (back to its own value in
        `teardown`), rather than Lightning asking for an empty `val_dataloader` and
        warning "Total length of `list` across ranks is zero".
        """
        if stage == "fit" and not self.val_size and self.trainer is not None:
            self.teardown("fit")  # a fit that failed before its teardown left its Trainer switched off
            self._val_switch = (self.trainer, self.trainer.limit_val_batches)
            self.trainer.limit_val_batches = 0
        if self._splits is not None:
            return
        (x, y), test = self.load()
        if len(x) != self.num_train or len(y) != self.num_train:
            raise RuntimeError(
                f"{type(self).__name__}.load() returned {len(x)} training examples, not {self.num_train}"
            )
        if self.val_size:
            cut = self.num_train - self.val_size
            train, val = (x[:cut], y[:cut]), (x[cut:], y[cut:])
        else:
            train, val = (x, y), test
        self._splits = {"train": train, "val": val, "test": test}

    def teardown(self, stage: str) -> None:
        """Give the Trainer back its `limit_val_batches` after a fit without validation."""
        if stage == "fit" and self._val_switch is not None:
            (trainer, limit), self._val_switch = self._val_switch, None
            trainer.limit_val_batches = limit

    def _split(self, name: str) -> TensorPair:
        if self._splits is None:
            self.setup()
        assert self._splits is not None
        return self._splits[name]

    @property
    def train_tensors(self) -> TensorPair:
        """``(x, y)`` of the training set (the resources of M2N2)."""
        return self._split("train")

    @property
    def val_tensors(self) -> TensorPair:
        """``(x, y)`` of the validation set (the test set unless ``val_size > 0``)."""
        return self._split("val")

    @property
    def test_tensors(self) -> TensorPair:
        """``(x, y)`` of the test set."""
        return self._split("test")

    def _loader(self, pair: TensorPair, length: int | None = None) -> DataLoader:
        return DataLoader(TensorBatches(pair, self.batch_size, length), batch_size=None, shuffle=False)

    def train_dataloader(self) -> DataLoader:
        """The training set in order, ``batch_size`` examples a batch (all when None),
        repeated to ``steps_per_epoch`` batches when that is set."""
        return self._loader(self.train_tensors, self.steps_per_epoch)

    def transfer_batch_to_device(self, batch: TensorPair, device: torch.device, dataloader_idx: int) -> TensorPair:
        """Training batches stay where they are: they only pace the evolution steps (the
        resources are already resident), and copying them every step would cost more than a step."""
        if self.trainer is not None and self.trainer.training:
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def val_dataloader(self) -> DataLoader | list:
        """The validation set in order; none with `val_size=0` (Lightning then skips validation)."""
        return self._loader(self.val_tensors) if self.val_size else []

    def test_dataloader(self) -> DataLoader:
        """The test set in order."""
        return self._loader(self.test_tensors)
