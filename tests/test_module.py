"""EvolutionModule under a real Lightning Trainer."""

from __future__ import annotations

import csv
from functools import partial

import pytest
import torch
from conftest import make_trainer as quiet_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.precision import MixedPrecision

from m2n2_lightning import MLP, EvolutionModule, FlatParams, M2N2Strategy
from m2n2_lightning.data import DigitsDataModule

pytestmark = pytest.mark.usefixtures("one_thread")


def make_trainer(tmp_path, max_steps: int, **kwargs):
    """CSV logs in tmp_path/logs, validation every 20 steps."""
    options = dict(
        logger=CSVLogger(tmp_path, name="logs", version=""), val_check_interval=20, check_val_every_n_epoch=None
    )
    options.update(kwargs)
    return quiet_trainer(tmp_path, max_steps, **options)


def digits(val_size: int = 0) -> DigitsDataModule:
    return DigitsDataModule(steps_per_epoch=25, val_size=val_size)


def module(seed: int = 0, k: int = 1, **kwargs) -> EvolutionModule:
    return EvolutionModule(MLP(64, 32, 10), partial(M2N2Strategy, seed=seed, children_per_step=k), **kwargs)


def test_global_step_counts_evolution_steps_and_logs(tmp_path) -> None:
    evo = module(k=2)
    trainer = make_trainer(tmp_path, max_steps=60)
    trainer.fit(evo, datamodule=digits(val_size=100))  # a validation split: the paper's has none
    assert trainer.global_step == 60
    assert evo.strategy.forward_passes == 120  # k = 2 children per step
    rows = list(csv.DictReader(open(tmp_path / "logs" / "metrics.csv")))
    logged_steps = sorted({int(r["step"]) for r in rows if r.get("forward_passes")})
    assert logged_steps[:3] == [9, 19, 29]  # every log_every_n_steps, on the global-step axis
    last = [r for r in rows if r.get("forward_passes")][-1]
    assert float(last["forward_passes"]) == 2 * (int(last["step"]) + 1)
    for key in ("fitness/max", "fitness/mean", "train/best_score", "niche/coverage", "niche/sole_solvers",
                "niche/fitness_entropy", "forward_passes_per_second"):
        assert last[key] != "", key
    val = [float(r["val/acc"]) for r in rows if r.get("val/acc")]
    assert len(val) == 3 and all(0 <= v <= 1 for v in val)  # steps 20, 40, 60
    assert (tmp_path / "logs" / "class_accuracy.png").stat().st_size > 1000


def test_model_holds_the_best_member(tmp_path) -> None:
    evo = module()
    trainer = make_trainer(tmp_path, max_steps=30)
    trainer.fit(evo, datamodule=digits())
    flat = FlatParams(evo.model)
    best = evo.strategy.archive.members[evo.strategy.scores.mean(1).argmax()]
    assert torch.equal(flat.flatten(evo.model), best)
    # module(x) is the best network, and its accuracy is the best member's mean score
    x, y = digits().train_tensors
    acc = (evo(x).argmax(-1) == y).float().mean()
    assert acc.item() == pytest.approx(evo.strategy.scores.mean(1).max().item(), abs=1e-6)
    plain = MLP(64, 32, 10)
    plain.load_state_dict(evo.best_model().state_dict())
    assert torch.equal(plain(x), evo(x))


def test_resume_from_checkpoint_is_exact(tmp_path) -> None:
    straight = module(seed=3)
    make_trainer(tmp_path / "a", max_steps=50).fit(straight, datamodule=digits())

    first = module(seed=3)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=20, save_top_k=-1)
    make_trainer(tmp_path / "b", max_steps=20, enable_checkpointing=True, callbacks=[checkpoint]).fit(
        first, datamodule=digits()
    )
    path = tmp_path / "ckpt" / "epoch=0-step=20.ckpt"
    assert path.exists()
    # A different seed: everything must come from the checkpoint (a run with other settings is
    # refused by default; allow_resume_changes lets this one go on with the checkpoint's state).
    resumed = module(seed=123, allow_resume_changes=True)
    trainer = make_trainer(tmp_path / "c", max_steps=50)
    trainer.fit(resumed, datamodule=digits(), ckpt_path=path)
    assert trainer.global_step == 50
    assert torch.equal(resumed.strategy.archive.members, straight.strategy.archive.members)
    assert torch.equal(resumed.strategy.scores, straight.strategy.scores)
    assert torch.equal(resumed.strategy.occupied, straight.strategy.occupied)
    assert torch.equal(resumed.strategy.generator.get_state(), straight.strategy.generator.get_state())
    assert resumed.strategy.forward_passes == straight.strategy.forward_passes == 50
    assert torch.equal(FlatParams(resumed.model).flatten(resumed.model), FlatParams(straight.model).flatten(straight.model))


def test_load_from_checkpoint_gives_the_best_network(tmp_path) -> None:
    evo = module(seed=1)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = make_trainer(tmp_path, max_steps=25, val_check_interval=25, enable_checkpointing=True, callbacks=[checkpoint])
    trainer.fit(evo, datamodule=digits())
    loaded = EvolutionModule.load_from_checkpoint(tmp_path / "ckpt" / "last.ckpt", model=MLP(64, 32, 10))
    x, _ = digits().test_tensors
    assert torch.equal(loaded(x), evo(x))
    # the strategy's state is the callback's part of the checkpoint
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["callbacks"]["M2N2Callback"]["strategy"]
    assert torch.equal(saved["archive.members"], evo.strategy.archive.members)
    # a model of another size does not load: PyTorch names the tensors
    with pytest.raises(RuntimeError, match="size mismatch for model.w1"):
        EvolutionModule.load_from_checkpoint(tmp_path / "ckpt" / "last.ckpt", model=MLP(64, 16, 10))


def test_16_mixed_precision_fails_clearly(tmp_path) -> None:
    # What Trainer(precision="16-mixed") builds on a GPU: fp16 autocast with a gradient scaler.
    # (On the CPU Lightning itself swaps 16-mixed for bf16-mixed, which works.)
    with pytest.warns(UserWarning, match="CUDA is not available"):
        scaler = torch.amp.GradScaler("cuda")
    plugin = MixedPrecision("16-mixed", "cuda", scaler=scaler)
    trainer = make_trainer(tmp_path, max_steps=5, plugins=[plugin], accelerator="cpu")
    with pytest.raises(ValueError, match="gradient scaler.*32-true"):
        trainer.fit(module(), datamodule=digits())


def test_resources_move_to_the_device_once(tmp_path, monkeypatch) -> None:
    moves = []
    original = torch.Tensor.to

    def counting_to(self, *args, **kwargs):
        if self.shape in ((1437, 64), (1437,)):  # the training inputs and targets
            moves.append(self.shape)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", counting_to)
    evo = module()
    make_trainer(tmp_path, max_steps=40, val_check_interval=1000, limit_val_batches=0).fit(evo, datamodule=digits())
    # inputs and targets once each, at fit start; no step moves them again
    assert len(moves) == 2


def test_same_seed_same_archive(tmp_path) -> None:
    runs = []
    for name in ("a", "b"):
        evo = module(seed=5)
        make_trainer(tmp_path / name, max_steps=30).fit(evo, datamodule=digits())
        runs.append(evo.strategy.archive.members)
    assert torch.equal(*runs)
