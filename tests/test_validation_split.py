"""`EvolutionModule` with and without a validation split: without one (val_size=0, the paper's protocol) fit runs
no validation loop and Lightning does not warn about an empty val_dataloader; with one, validation runs."""

from __future__ import annotations

import warnings
from functools import partial

import pytest
import torch
from conftest import Classifier, make_trainer

from m2n2_lightning import MLP, EvolutionModule, M2N2Callback, M2N2Strategy
from m2n2_lightning.data import DigitsDataModule

pytestmark = pytest.mark.usefixtures("one_thread")


def fit(tmp_path, val_size: int, **trainer_options) -> tuple:
    """Fit 4 steps with validation asked for every 2 steps; returns the trainer, module, data and the warnings."""
    module = EvolutionModule(MLP(64, 16, 10), partial(M2N2Strategy, seed=0))
    data = DigitsDataModule(steps_per_epoch=4, val_size=val_size)
    trainer = make_trainer(tmp_path, 4, val_check_interval=2, check_val_every_n_epoch=None, **trainer_options)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, datamodule=data)
    return trainer, module, data, [f"{w.category.__name__}: {w.message}" for w in caught]


def test_without_a_validation_split_fit_neither_validates_nor_warns(tmp_path) -> None:
    trainer, module, _, messages = fit(tmp_path, val_size=0, limit_val_batches=0.5)
    assert not [m for m in messages if "across ranks is zero" in m or "val_dataloader" in m], messages
    assert "val/acc" not in trainer.callback_metrics
    assert trainer.limit_val_batches == 0.5  # the Trainer's own setting is back after fit
    assert module.strategy.forward_passes == 4


def test_with_a_validation_split_fit_validates_the_best_member(tmp_path) -> None:
    trainer, module, data, messages = fit(tmp_path, val_size=100)
    assert not [m for m in messages if "across ranks is zero" in m], messages
    x, y = data.val_tensors
    assert len(y) == 100
    with torch.no_grad():  # the last validation (step 4) saw the final best member, which the model holds
        expected = (module.model(x).argmax(dim=1) == y).double().mean().item()
    assert trainer.callback_metrics["val/acc"].item() == pytest.approx(expected, abs=1e-7)


class ValidatedClassifier(Classifier):
    """A user's classifier with its own validation_step, as M2N2Callback users have."""

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/acc", (self(x).argmax(dim=1) == y).float().mean())


def test_callback_with_a_user_validation_step_and_no_split_neither_validates_nor_warns(tmp_path) -> None:
    module = ValidatedClassifier(hidden=8)
    trainer = make_trainer(tmp_path, 4, [M2N2Callback()], val_check_interval=2, check_val_every_n_epoch=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, datamodule=DigitsDataModule(steps_per_epoch=4))
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "across ranks is zero" in m], messages
    assert "val/acc" not in trainer.callback_metrics and trainer.limit_val_batches == 1.0
    trainer = make_trainer(tmp_path, 2, [M2N2Callback()], val_check_interval=2, check_val_every_n_epoch=None)
    trainer.fit(ValidatedClassifier(hidden=8), datamodule=DigitsDataModule(steps_per_epoch=4, val_size=50))
    assert "val/acc" in trainer.callback_metrics  # with a split, the user's validation runs
