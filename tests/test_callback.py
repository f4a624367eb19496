"""M2N2Callback under a real Trainer: evolution instead of the optimizer, merging, resume, errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from m2n2_lightning import CMAESStrategy, FlatParams, M2N2Callback, M2N2Strategy
from m2n2_lightning.data import DigitsDataModule


class CountingAdam(torch.optim.Adam):
    """Adam that counts its steps."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.steps = 0

    def step(self, closure: Any = None) -> Any:
        self.steps += 1
        return super().step(closure)


class Classifier(L.LightningModule):
    """An ordinary gradient-trained classifier; records the accuracy its training_step sees."""

    def __init__(self, hidden: int = 32, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))
        for p in self.parameters():
            nn.init.normal_(p, std=0.01)
        self.seen_accuracy: list[float] = []
        self.optimizer: CountingAdam | None = None

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)
        self.seen_accuracy.append((logits.argmax(dim=1) == y).float().mean().item())
        return nn.functional.cross_entropy(logits, y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        self.optimizer = CountingAdam(self.parameters(), lr=3e-3)
        return self.optimizer


def make_trainer(root: Path, max_steps: int, callbacks: list[L.Callback], **kwargs: Any) -> L.Trainer:
    options: dict[str, Any] = dict(
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=10,
    )
    options.update(kwargs)
    return L.Trainer(max_steps=max_steps, callbacks=callbacks, default_root_dir=root, **options)


def flat(module: nn.Module) -> Tensor:
    return FlatParams(module).flatten(module)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These small full-batch steps are fastest on one thread (and robust to a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits() -> DigitsDataModule:
    data = DigitsDataModule()
    data.setup()
    return data


@torch.no_grad()
def accuracy_on_test_set(module: nn.Module, data: DigitsDataModule) -> float:
    x, y = data.test_tensors
    return (module(x).argmax(dim=1) == y).float().mean().item()


def test_evolves_instead_of_stepping_the_optimizer(tmp_path: Path, digits: DigitsDataModule) -> None:
    module, callback = Classifier(), M2N2Callback()
    trainer = make_trainer(tmp_path, 150, [callback])
    trainer.fit(module, datamodule=digits)

    assert module.optimizer is not None and module.optimizer.steps == 0 and not module.optimizer.state
    assert trainer.global_step == 150 and callback.strategy.forward_passes == 150
    assert len(module.seen_accuracy) == 150  # training_step kept running, as a monitor
    assert torch.equal(flat(module), callback.strategy.best_params())
    best_score = callback.strategy.scores.mean(dim=1).max().item()
    assert module.seen_accuracy[-1] > module.seen_accuracy[0] + 0.1
    assert best_score >= module.seen_accuracy[-1]  # training_step ran before the last step
    assert "train/best_score" in trainer.callback_metrics
    assert callback.heatmap_path is not None and callback.heatmap_path.is_file()
    # gradients were never computed, and the parameters are trainable again after fit
    assert all(p.requires_grad and p.grad is None for p in module.parameters())


def test_merging_specialists_beats_each(tmp_path: Path, digits: DigitsDataModule) -> None:
    x, y = digits.train_tensors
    sources: list[Path] = []
    specialists = []
    for seed, (low, high) in enumerate(((0, 5), (5, 10)), start=1):
        keep = (y >= low) & (y < high)
        specialist = Classifier(hidden=64, seed=seed)
        trainer = make_trainer(tmp_path, 10, [])
        trainer.fit(specialist, DataLoader(TensorDataset(x[keep], y[keep]), batch_size=int(keep.sum())))
        specialists.append(specialist)
        sources.append(tmp_path / f"specialist{seed}.ckpt")
    trainer.save_checkpoint(sources[1])  # a Lightning checkpoint ...
    torch.save(specialists[0].state_dict(), sources[0])  # ... and a plain state_dict file

    merged, callback = Classifier(hidden=64, seed=3), M2N2Callback(init_from=sources)
    make_trainer(tmp_path, 600, [callback]).fit(merged, datamodule=digits)

    assert callback.strategy.mutation_sigma == 0.0
    accuracies = [accuracy_on_test_set(m, digits) for m in specialists]
    assert max(accuracies) < 0.5  # each knows only half of the classes
    assert accuracy_on_test_set(merged, digits) > max(accuracies) + 0.1


def test_resume_from_a_checkpoint_is_exact(tmp_path: Path, digits: DigitsDataModule) -> None:
    def run(init_seed: int, ckpt_path: Path | None = None) -> tuple[Classifier, M2N2Callback]:
        module, callback = Classifier(hidden=16, seed=init_seed), M2N2Callback(pop_size=6, seed=7)
        saver = ModelCheckpoint(dirpath=tmp_path / f"ckpt{init_seed}", every_n_train_steps=20, save_top_k=-1)
        trainer = make_trainer(tmp_path, 40, [callback, saver], enable_checkpointing=True)
        trainer.fit(module, datamodule=digits, ckpt_path=ckpt_path)
        return module, callback

    whole, whole_callback = run(init_seed=0)
    middle = tmp_path / "ckpt0" / "epoch=19-step=20.ckpt"
    saved = torch.load(middle, weights_only=True)["callbacks"]["M2N2Callback"]
    assert not torch.equal(saved["archive"], whole_callback.strategy.archive)

    resumed, resumed_callback = run(init_seed=1, ckpt_path=middle)  # weights come from the checkpoint
    state, expected = resumed_callback.strategy.state_dict(), whole_callback.strategy.state_dict()
    for name in ("archive", "scores", "occupied"):
        assert torch.equal(state[name], expected[name]), name
    assert resumed_callback.strategy.forward_passes == whole_callback.strategy.forward_passes == 40
    assert torch.equal(resumed_callback.strategy.generator.get_state(), whole_callback.strategy.generator.get_state())
    assert torch.equal(flat(resumed), flat(whole))
    assert len(resumed.seen_accuracy) == 20  # only the second half ran


@pytest.mark.parametrize("lightning_format", [False, True])
def test_mismatched_checkpoint_fails_before_training(
    tmp_path: Path, digits: DigitsDataModule, lightning_format: bool
) -> None:
    state = Classifier(hidden=32).state_dict()
    state["net.0.weight"] = torch.zeros(16, 64)
    state["net.3.weight"] = state.pop("net.2.weight")
    path = tmp_path / "other.ckpt"
    torch.save({"state_dict": state, "epoch": 3} if lightning_format else state, path)
    torch.save(Classifier(hidden=32).state_dict(), tmp_path / "good.pt")

    module = Classifier(hidden=32)
    trainer = make_trainer(tmp_path, 5, [M2N2Callback(init_from=[tmp_path / "good.pt", path])])
    with pytest.raises(ValueError) as info:
        trainer.fit(module, datamodule=digits)
    message = str(info.value)
    assert str(path) in message
    assert "missing keys: net.2.weight" in message
    assert "unexpected keys: net.3.weight" in message
    assert "net.0.weight: (16, 64) vs (32, 64)" in message
    assert module.optimizer is None and not module.seen_accuracy  # nothing ran


def test_gradient_scaler_precision_fails_clearly(tmp_path: Path, digits: DigitsDataModule) -> None:
    # On a GPU, precision="16-mixed" brings this scaler; on the CPU it must be given explicitly.
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    module = Classifier()
    trainer = make_trainer(tmp_path, 5, [M2N2Callback()], plugins=[plugin])
    with pytest.raises(ValueError, match="gradient scaler"):
        trainer.fit(module, datamodule=digits)
    assert not module.seen_accuracy


def test_custom_score_fn_and_explicit_resources(tmp_path: Path, digits: DigitsDataModule) -> None:
    x, y = digits.train_tensors
    resources = (x[:300], y[:300])
    calls: list[tuple[tuple[int, ...], Tensor]] = []

    def true_class_probability(outputs: Tensor, batch: tuple[Tensor, Tensor]) -> Tensor:
        calls.append((tuple(outputs.shape), batch[0]))
        return outputs.softmax(dim=-1).gather(1, batch[1][:, None]).squeeze(1)

    module = Classifier()
    callback = M2N2Callback(score_fn=true_class_probability, resources=resources, children_per_step=2)
    make_trainer(tmp_path, 10, [callback]).fit(module, datamodule=digits)

    assert callback.strategy.forward_passes == 20 and len(calls) == 2 + 20  # initial members + children, one by one
    assert all(shape == (300, 10) and torch.equal(inputs, resources[0]) for shape, inputs in calls)
    best = callback.strategy.best_index()
    with torch.no_grad():
        expected = true_class_probability(module(resources[0]), resources)
    torch.testing.assert_close(callback.strategy.scores[best][0], expected)
    assert not torch.all((expected == 0) | (expected == 1))


def test_any_strategy_can_be_given(tmp_path: Path, digits: DigitsDataModule) -> None:
    strategy = CMAESStrategy(popsize=6, diagonal=True)
    module, callback = Classifier(hidden=8), M2N2Callback(strategy=strategy)
    make_trainer(tmp_path, 5, [callback]).fit(module, datamodule=digits)
    assert callback.strategy is strategy and strategy.forward_passes == 30
    assert torch.equal(flat(module), strategy.best_params())


def test_invalid_uses_fail_clearly(tmp_path: Path, digits: DigitsDataModule) -> None:
    with pytest.raises(ValueError, match="cannot be combined"):
        M2N2Callback(strategy=M2N2Strategy(), init_from=["a.ckpt", "b.ckpt"])
    with pytest.raises(ValueError, match="two or more"):
        M2N2Callback(init_from=["a.ckpt"])

    class Manual(Classifier):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False

    with pytest.raises(ValueError, match="automatic_optimization = False"):
        make_trainer(tmp_path, 5, [M2N2Callback()]).fit(Manual(), datamodule=digits)


@pytest.mark.parametrize(
    ("content", "match"),
    [([1, 2, 3], "holds neither"), ({"state_dict": {}, "hparams": Classifier}, "weights_only")],
)
def test_unreadable_init_file_fails_clearly(tmp_path: Path, digits: DigitsDataModule, content: Any, match: str) -> None:
    path = tmp_path / "odd.ckpt"
    torch.save(content, path)
    torch.save(Classifier().state_dict(), tmp_path / "good.pt")
    trainer = make_trainer(tmp_path, 5, [M2N2Callback(init_from=[tmp_path / "good.pt", path])])
    with pytest.raises(ValueError, match=match) as info:
        trainer.fit(Classifier(), datamodule=digits)
    assert str(path) in str(info.value)
