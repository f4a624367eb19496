"""M2N2Callback under a real Trainer: evolution instead of the optimizer, its settings, resume, errors."""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import Classifier, flat, make_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import Tensor

from m2n2_lightning import CMAESStrategy, M2N2Callback, M2N2Strategy
from m2n2_lightning.data import DigitsDataModule

pytestmark = pytest.mark.usefixtures("one_thread")


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


def test_default_strategy_is_the_papers_m2n2(tmp_path: Path, digits: DigitsDataModule) -> None:
    module, callback = Classifier(hidden=8), M2N2Callback()
    make_trainer(tmp_path, 1, [callback]).fit(module, datamodule=digits)
    strategy = callback.strategy
    assert type(strategy) is M2N2Strategy
    assert strategy.num_params == 64 * 8 + 8 + 8 * 10 + 10  # built for the module's D
    # the paper's settings (docs/ALGORITHM.md): P = 20, alpha = 1, matchmaker, split-point SLERP crossover,
    # mutation and initialisation N(0, 0.01^2) from scratch, one child per step, seed 0
    assert (strategy.pop_size, strategy.alpha, strategy.children_per_step, strategy.seed) == (20, 1.0, 1, 0)
    assert strategy.use_matchmaker and strategy.use_crossover and strategy.use_split_point
    assert strategy.mutation_sigma == 0.01 and strategy.init_sigma == 0.01
    assert (strategy.capacity, strategy.score_shift, strategy.warmup_steps) == ("unit", False, 0)
    assert strategy.chromosome_patterns is None and strategy.slerp_angle == "whole"
    assert strategy.init_models is None and strategy.forward_passes == 1


def test_resume_from_a_checkpoint_is_exact(tmp_path: Path, digits: DigitsDataModule) -> None:
    def run(init_seed: int, ckpt_path: Path | None = None) -> tuple[Classifier, M2N2Callback]:
        module = Classifier(hidden=16, seed=init_seed)
        callback = M2N2Callback(strategy=partial(M2N2Strategy, pop_size=6, seed=7))
        saver = ModelCheckpoint(dirpath=tmp_path / f"ckpt{init_seed}", every_n_train_steps=20, save_top_k=-1)
        trainer = make_trainer(tmp_path, 40, [callback, saver], enable_checkpointing=True)
        trainer.fit(module, datamodule=digits, ckpt_path=ckpt_path)
        return module, callback

    whole, whole_callback = run(init_seed=0)
    middle = tmp_path / "ckpt0" / "epoch=19-step=20.ckpt"
    saved = torch.load(middle, weights_only=True)["callbacks"]["M2N2Callback"]["strategy"]
    assert not torch.equal(saved["archive.members"], whole_callback.strategy.archive.members)

    resumed, resumed_callback = run(init_seed=1, ckpt_path=middle)  # weights come from the checkpoint
    state, expected = resumed_callback.strategy.state_dict(), whole_callback.strategy.state_dict()
    for name in ("archive.members", "archive.scores", "archive.occupied"):
        assert torch.equal(state[name], expected[name]), name
    assert resumed_callback.strategy.forward_passes == whole_callback.strategy.forward_passes == 40
    assert torch.equal(resumed_callback.strategy.generator.get_state(), whole_callback.strategy.generator.get_state())
    assert torch.equal(flat(resumed), flat(whole))
    assert len(resumed.seen_accuracy) == 20  # only the second half ran


def small_run(root: Path, digits: DigitsDataModule, max_steps: int, **kwargs: Any) -> M2N2Callback:
    callback = M2N2Callback(strategy=partial(M2N2Strategy, pop_size=6, seed=7), **kwargs)
    make_trainer(root, max_steps, [callback]).fit(Classifier(hidden=16), datamodule=digits)
    return callback


def assert_same_state(actual: dict[str, Any], expected: dict[str, Any]) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, Tensor):
            assert value.dtype == actual[key].dtype and torch.equal(actual[key], value), key
        elif isinstance(value, dict):
            assert_same_state(actual[key], value)
        else:
            assert actual[key] == value, key


def test_steps_per_batch_gives_the_same_archive(tmp_path: Path, digits: DigitsDataModule) -> None:
    one = small_run(tmp_path / "one", digits, 40)
    five = small_run(tmp_path / "five", digits, 8, steps_per_batch=5)
    assert one.strategy.forward_passes == five.strategy.forward_passes == 40
    assert_same_state(five.strategy.state_dict(), one.strategy.state_dict())  # archive, scores, generator, counters


def test_max_forward_passes_stops_at_the_budget(tmp_path: Path, digits: DigitsDataModule) -> None:
    callback = M2N2Callback(strategy=partial(M2N2Strategy, pop_size=6, seed=7), steps_per_batch=5, max_forward_passes=23)
    module = Classifier(hidden=16)
    trainer = make_trainer(tmp_path / "budget", 50, [callback])
    trainer.fit(module, datamodule=digits)
    assert callback.strategy.forward_passes == 23
    assert trainer.global_step == 5  # 5 + 5 + 5 + 5 + 3 evolution steps, then fit stops
    assert torch.equal(flat(module), callback.strategy.best_params())
    # the 23 steps are the first 23 of an unbudgeted run
    plain = small_run(tmp_path / "plain", digits, 23)
    assert_same_state(callback.strategy.state_dict(), plain.strategy.state_dict())


def test_frozen_parameters_stay_fixed_unless_evolved(tmp_path: Path, digits: DigitsDataModule) -> None:
    def run(**kwargs: Any) -> tuple[Classifier, dict[str, Tensor], M2N2Callback]:
        module = Classifier(hidden=16)
        module.net[0].requires_grad_(False)
        before = {name: p.detach().clone() for name, p in module.named_parameters()}
        callback = M2N2Callback(strategy=partial(M2N2Strategy, seed=2), **kwargs)
        make_trainer(tmp_path, 20, [callback]).fit(module, datamodule=digits)
        return module, before, callback

    module, before, callback = run()
    assert callback.strategy.num_params == 16 * 10 + 10  # net.2 only
    for name in ("net.0.weight", "net.0.bias"):
        assert torch.equal(module.get_parameter(name), before[name]), name
    last = torch.cat([module.net[2].weight.detach().reshape(-1), module.net[2].bias.detach()])
    assert torch.equal(last, callback.strategy.best_params())
    assert not torch.equal(module.net[2].weight, before["net.2.weight"])
    assert [p.requires_grad for p in module.parameters()] == [False, False, True, True]  # restored after fit

    module, before, callback = run(evolve_frozen=True)
    assert callback.strategy.num_params == 64 * 16 + 16 + 16 * 10 + 10
    assert torch.equal(flat(module), callback.strategy.best_params())
    assert not torch.equal(module.net[0].weight, before["net.0.weight"])
    assert [p.requires_grad for p in module.parameters()] == [False, False, True, True]


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
    assert re.search(r"missing \w+: net\.2\.weight", message)
    assert re.search(r"unexpected \w+: net\.3\.weight", message)
    assert re.search(r"net\.0\.weight[^;]*\(16, 64\) vs \(32, 64\)", message)
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
        """Batched: outputs [k, N, C] of k candidates -> [k, N]."""
        calls.append((tuple(outputs.shape), batch[0]))
        targets = batch[1].expand(outputs.shape[:-1])
        return outputs.softmax(dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)

    module = Classifier()
    callback = M2N2Callback(
        strategy=partial(M2N2Strategy, children_per_step=2), score_fn=true_class_probability, resources=resources
    )
    make_trainer(tmp_path, 10, [callback]).fit(module, datamodule=digits)

    assert callback.strategy.forward_passes == 20 and len(calls) == 1 + 10  # initial members, then each step's 2 children
    assert all(shape == (2, 300, 10) and torch.equal(inputs, resources[0]) for shape, inputs in calls)
    best = callback.strategy.best_index()
    with torch.no_grad():  # the plain module (the best member) on its own
        probabilities = module(resources[0]).softmax(dim=-1)
    expected = probabilities[torch.arange(300), resources[1]]
    torch.testing.assert_close(callback.strategy.scores[best][0], expected)
    assert not torch.all((expected == 0) | (expected == 1))


def test_any_strategy_can_be_given(tmp_path: Path, digits: DigitsDataModule) -> None:
    module = Classifier(hidden=8)
    strategy = CMAESStrategy(num_params=64 * 8 + 8 + 8 * 10 + 10, popsize=6, diagonal=True)
    callback = M2N2Callback(strategy=strategy)
    make_trainer(tmp_path, 5, [callback]).fit(module, datamodule=digits)
    assert callback.strategy is strategy and strategy.forward_passes == 30
    assert torch.equal(flat(module), strategy.best_params())


def test_manual_optimization_steps_the_evolution(tmp_path: Path, digits: DigitsDataModule) -> None:
    class Manual(Classifier):
        """Manual optimization: its training_step steps the optimizer itself."""

        def __init__(self) -> None:
            super().__init__(hidden=16)
            self.automatic_optimization = False

        def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
            super().training_step(batch, batch_idx)
            self.optimizers().step()

    module, callback = Manual(), M2N2Callback(strategy=partial(M2N2Strategy, seed=4), steps_per_batch=2)
    trainer = make_trainer(tmp_path, 6, [callback])
    trainer.fit(module, datamodule=digits)
    assert trainer.global_step == 6 and callback.strategy.forward_passes == 12
    assert module.optimizer.steps == 0 and len(module.seen_accuracy) == 6
    assert torch.equal(flat(module), callback.strategy.best_params())


def test_invalid_uses_fail_clearly(tmp_path: Path, digits: DigitsDataModule) -> None:
    with pytest.raises(ValueError, match="init_from gives seed models, which a built M2N2Strategy cannot receive"):
        M2N2Callback(strategy=M2N2Strategy(num_params=10), init_from=["a.ckpt", "b.ckpt"])
    with pytest.raises(ValueError, match="two or more"):
        M2N2Callback(init_from=["a.ckpt"])
    # a built strategy of another D: named when fit starts, before any step
    module = Classifier(hidden=8)
    with pytest.raises(ValueError, match="was built for D = 10 parameters, but the model has 610"):
        make_trainer(tmp_path, 5, [M2N2Callback(strategy=M2N2Strategy(num_params=10))]).fit(module, datamodule=digits)
    assert module.optimizer is None and not module.seen_accuracy


@pytest.mark.parametrize(
    ("content", "match"),
    [([1, 2, 3], "holds a list, not a mapping"), ({"state_dict": {}, "hparams": Classifier}, "weights_only")],
)
def test_unreadable_init_file_fails_clearly(tmp_path: Path, digits: DigitsDataModule, content: Any, match: str) -> None:
    path = tmp_path / "odd.ckpt"
    torch.save(content, path)
    torch.save(Classifier().state_dict(), tmp_path / "good.pt")
    trainer = make_trainer(tmp_path, 5, [M2N2Callback(init_from=[tmp_path / "good.pt", path])])
    with pytest.raises(ValueError, match=match) as info:
        trainer.fit(Classifier(), datamodule=digits)
    assert str(path) in str(info.value)
