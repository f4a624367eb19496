"""The merge path through M2N2Callback: seeds read once into one stack, their buffers, the resume fingerprint over
every tensor of every seed, and the best member written into the module only when it changed or is read."""

from __future__ import annotations

import functools
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from m2n2_lightning import FlatParams, M2N2Callback, M2N2Strategy
from m2n2_lightning.strategies.children import Children

from test_sources import llama

TOKENS = torch.randint(1, 40, (8, 6), generator=torch.Generator().manual_seed(0))


def next_token_accuracy(module: nn.Module, batch: list[Tensor]) -> Tensor:
    """Per sequence, the fraction of positions whose argmax next token is the sequence's next token."""
    (tokens,) = batch
    logits = module(input_ids=tokens).logits
    return (logits[:, :-1].argmax(-1) == tokens[:, 1:]).float().mean(dim=1)


class Holder(L.LightningModule):
    """A LightningModule holding a causal LM; `training_step` returns a constant (nothing is learnt)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch: object, batch_idx: int) -> Tensor:
        return torch.zeros(())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(range(100), batch_size=1)


@pytest.fixture()
def seed_dirs(tmp_path: Path) -> list[Path]:
    dirs = []
    for seed in (1, 2):
        directory = tmp_path / f"seed{seed}"
        llama(seed).save_pretrained(directory)
        dirs.append(directory)
    return dirs


def merge(seed_dirs: list[Path], steps: int, storage: str, root: Path, ckpt_path: str | None = None,
          best_in_training_step: bool = False, checkpoints: bool = True, seeds_in: str = "memory",
          ) -> tuple[Holder, M2N2Callback]:
    module = Holder(llama(0))
    callback = M2N2Callback(
        strategy=functools.partial(M2N2Strategy, pop_size=4, storage=storage, seed=3), init_from=seed_dirs,
        evaluate=next_token_accuracy, resources=TensorDataset(TOKENS), resource_batch_size=4, model=module.model,
        best_in_training_step=best_in_training_step, seeds_in=seeds_in,
    )
    saving = [ModelCheckpoint(dirpath=root, every_n_train_steps=1, save_last=True)] if checkpoints else []
    trainer = L.Trainer(max_steps=steps, callbacks=[callback, *saving], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=root, enable_checkpointing=checkpoints)
    trainer.fit(module, ckpt_path=ckpt_path, weights_only=False)
    return module, callback


@pytest.mark.parametrize("storage", ["coefficients", "dense"])
def test_a_seed_changed_in_one_norm_weight_is_refused_on_resume(storage: str, seed_dirs: list[Path], tmp_path: Path) -> None:
    _, callback = merge(seed_dirs, 3, storage, tmp_path / "run")
    digests = list(callback.seed_digests)
    if storage == "coefficients":  # the archive holds the stack the seeds were read into: no second copy
        strategy = callback.engine.strategy
        assert strategy.archive.seeds.data_ptr() == strategy.init_models[0].data_ptr()
    file = seed_dirs[1] / "model.safetensors"
    tensors = load_file(file)
    tensors["model.norm.weight"][0] += 2**-10  # one element of a norm weight: 64 sampled coordinates would miss it
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="seeds"):
        merge(seed_dirs, 5, storage, tmp_path / "run", ckpt_path=str(tmp_path / "run" / "last.ckpt"))
    # the unchanged first seed keeps its digest; the changed one gets another
    _, again = merge(seed_dirs, 1, storage, tmp_path / "fresh")
    assert again.seed_digests[0] == digests[0] and again.seed_digests[1] != digests[1]


def test_buffers_come_from_the_first_seed(tmp_path: Path) -> None:
    def net(seed: int) -> nn.Sequential:
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).eval()
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2.0)
        return model

    paths = []
    for seed in (1, 2):
        paths.append(tmp_path / f"seed{seed}.pt")
        torch.save(net(seed).state_dict(), paths[-1])

    class Classifier(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = net(0)

        def forward(self, x: Tensor) -> Tensor:
            return self.net(x)

        def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
            return torch.zeros(())

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.0)

    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    module = Classifier()
    module.net.eval()
    callback = M2N2Callback(init_from=paths, resources=(x, y), model=module.net, heatmap=False)
    trainer = L.Trainer(max_steps=2, callbacks=[callback], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=8))
    first = torch.load(paths[0], weights_only=True)
    assert torch.equal(module.net[1].running_mean, first["1.running_mean"])
    assert torch.equal(module.net[1].running_var, first["1.running_var"])


@pytest.mark.parametrize("best_in_training_step", [False, True])
def test_the_best_member_is_written_only_when_it_changed_or_is_read(
    best_in_training_step: bool, seed_dirs: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes: list[int] = []
    original = Children.load_into

    def counting(self: Children, index: int, module: nn.Module, flat: FlatParams) -> nn.Module:
        writes.append(len(self))
        return original(self, index, module, flat)

    monkeypatch.setattr(Children, "load_into", counting)
    dense_calls: list[int] = []
    original_dense = Children.dense
    monkeypatch.setattr(Children, "dense", lambda self: dense_calls.append(len(self)) or original_dense(self))
    steps = 6
    module, callback = merge(seed_dirs, steps, "coefficients", tmp_path / "run", best_in_training_step=best_in_training_step,
                             checkpoints=False)
    assert dense_calls == []  # no child, nor the best, was made as a dense [k, D] vector during the run
    flat = FlatParams(module.model)
    assert torch.equal(flat.flatten(module.model), callback.engine.strategy.best_params())  # the best, at the end
    scored = 2 + steps  # the two seeds, then one child a step, each written into the module to be scored
    # the best: once after the seeds, at the end of fit, and with the monitor before every training step but the
    # first (the module then holds the last child scored); never for a best that the module already holds
    assert len(writes) - scored == (1 + steps if best_in_training_step else 2)


def test_host_seeds_stay_in_host_memory() -> None:
    """host_seeds: the strategy moves (here to "meta", standing in for an accelerator), the seeds do not; a child is
    written from them into a module wherever its parameters are, with the values of the seeds' own mix."""
    seeds = [torch.randn(40, dtype=torch.float64), torch.randn(40, dtype=torch.float64)]
    strategy = M2N2Strategy(40, pop_size=3, init_models=seeds, storage="coefficients", host_seeds=True).to("meta")
    archive = strategy.archive
    assert archive.seeds.device.type == "cpu" and archive.scores.device.type == "meta"
    assert archive.like.device.type == "meta" and archive.like.dtype == torch.float64
    with pytest.raises(ValueError, match="host_seeds"):
        M2N2Strategy(40, init_models=seeds, storage="dense", host_seeds=True)
    back = M2N2Strategy(40, pop_size=3, init_models=seeds, storage="coefficients", host_seeds=True)
    back.start(lambda children: torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    children = back.ask()
    module = nn.Linear(7, 5, dtype=torch.float64)  # 35 + 5 = 40 parameters
    children.load_into(0, module, FlatParams(module))
    assert torch.equal(FlatParams(module).flatten(module), children.dense()[0])


def test_init_from_a_generator_of_state_dicts() -> None:
    """Seeds given as in-memory state_dicts, through a generator (read once), merge like the modules themselves."""
    torch.manual_seed(0)
    sources = [nn.Linear(4, 3), nn.Linear(4, 3)]
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    module = nn.Linear(4, 3)
    results = []
    for init_from in ((m.state_dict() for m in sources), sources):
        callback = M2N2Callback(strategy=functools.partial(M2N2Strategy, pop_size=3, seed=0), init_from=init_from,
                                resources=(x, y), model=module, heatmap=False)
        assert isinstance(callback.init_from, list) and len(callback.init_from) == 2

        trainer = L.Trainer(max_steps=3, callbacks=[callback], logger=False, enable_progress_bar=False,
                            enable_model_summary=False, enable_checkpointing=False)
        trainer.fit(Holder(module), DataLoader(TensorDataset(x, y), batch_size=4))
        results.append(FlatParams(module).flatten(module).clone())
    assert torch.equal(results[0], results[1])
