"""M2N2Callback merging seed models (init_from) under a real Trainer: two half-class specialists merged into one
model that beats each, with the default M2N2 and with a MAP-Elites factory."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch
from conftest import Classifier, flat, make_trainer
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from m2n2_lightning import M2N2Callback, MAPElitesStrategy
from m2n2_lightning.data import DigitsDataModule

pytestmark = pytest.mark.usefixtures("one_thread")


@torch.no_grad()
def accuracy_on_test_set(module: nn.Module, data: DigitsDataModule) -> float:
    x, y = data.test_tensors
    return (module(x).argmax(dim=1) == y).float().mean().item()


def accuracy(module: nn.Module, inputs: Tensor, targets: Tensor) -> float:
    with torch.no_grad():
        return (module(inputs).argmax(dim=1) == targets).float().mean().item()


@pytest.fixture(scope="module")
def specialists(tmp_path_factory: pytest.TempPathFactory, digits: DigitsDataModule) -> list[tuple[Classifier, Path]]:
    """Two classifiers trained with Adam (10 full-batch steps) on the train digits 0-4 and 5-9, each with the
    Lightning checkpoint of its training."""
    x, y = digits.train_tensors
    folder = tmp_path_factory.mktemp("specialists")
    trained = []
    for seed, (low, high) in enumerate(((0, 5), (5, 10)), start=1):
        keep = (y >= low) & (y < high)
        specialist = Classifier(hidden=64, seed=seed)
        trainer = make_trainer(folder, 10)
        trainer.fit(specialist, DataLoader(TensorDataset(x[keep], y[keep]), batch_size=int(keep.sum())))
        trainer.save_checkpoint(folder / f"specialist{seed}.ckpt")
        trained.append((specialist, folder / f"specialist{seed}.ckpt"))
    return trained


def test_merging_specialists_beats_each(
    tmp_path: Path, digits: DigitsDataModule, specialists: list[tuple[Classifier, Path]]
) -> None:
    (first, _), (_, second_checkpoint) = specialists
    torch.save(first.state_dict(), tmp_path / "specialist1.pt")
    sources = [tmp_path / "specialist1.pt", second_checkpoint]  # a plain state_dict file and a Lightning checkpoint

    merged, callback = Classifier(hidden=64, seed=3), M2N2Callback(init_from=sources)
    make_trainer(tmp_path, 600, [callback]).fit(merged, datamodule=digits)

    assert callback.strategy.mutation_sigma == 0.0
    accuracies = [accuracy_on_test_set(m, digits) for m, _ in specialists]
    assert max(accuracies) < 0.5  # each knows only half of the classes
    assert accuracy_on_test_set(merged, digits) > max(accuracies) + 0.1


def test_init_from_goes_to_a_map_elites_factory(
    tmp_path: Path, digits: DigitsDataModule, specialists: list[tuple[Classifier, Path]]
) -> None:
    x, y = digits.train_tensors
    models = [model for model, _ in specialists]  # seeds given as modules
    merged = Classifier(hidden=64, seed=3)
    callback = M2N2Callback(strategy=partial(MAPElitesStrategy, bins=4, descriptor_labels=y), init_from=models)
    make_trainer(tmp_path, 600, [callback]).fit(merged, datamodule=digits)

    strategy = callback.strategy
    assert type(strategy) is MAPElitesStrategy and strategy.bins == 4 and strategy.archive.members.shape[0] == 16
    # the factory was called with the seeds (the modules' parameters, in order), so mutation is off
    assert len(strategy.init_models) == 2
    for seed_vector, specialist in zip(strategy.init_models, models):
        assert torch.equal(seed_vector, flat(specialist))
    assert strategy.mutation_sigma == 0.0 and strategy.forward_passes == 600
    assert torch.equal(flat(merged), strategy.best_params())
    train_accuracies = [accuracy(m, x, y) for m in models]
    assert accuracy(merged, x, y) > max(train_accuracies) + 0.1
    assert accuracy_on_test_set(merged, digits) > max(accuracy_on_test_set(m, digits) for m in models) + 0.05
