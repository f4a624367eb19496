"""Evolution runs under `Trainer(devices=N)` for tests/test_ddp.py; every rank saves its final states.

    python tests/ddp_run.py OUT DEVICES

With DEVICES > 1 the runs use `strategy="ddp_evolution"` on the CPU (gloo);
Lightning's launcher starts the other ranks by running this script again.
With DEVICES = 1 they run in a single process without any distributed
strategy (the reference). Each rank writes `OUT/states_<rank>.pt`: for each
run, the strategy's state_dict and the model's flat parameters (and, with
several ranks, the error raised when the ranks are given different resources).
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch

# tests/conftest.py: tests/ is on the path (pytest's, or this script's folder)
from conftest import (
    Classifier,
    make_trainer,
)
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from m2n2_lightning import (
    MLP,
    CMAESStrategy,
    EvolutionModule,
    FlatParams,
    M2N2Callback,
    M2N2Strategy,
)
from m2n2_lightning.data import DigitsDataModule

#: Resources are scored in blocks of this size: 1437 digits -> 5 x 240 + 237 (1337 with the validation split:
#: 5 x 240 + 137), uneven shards on 2 and 3 ranks.
BLOCK_SIZE = 240
STEPS = 30


def trainer(out: Path, devices: int, max_steps: int, **kwargs: Any) -> L.Trainer:
    """CPU processes under "ddp_evolution" (one process: no distributed strategy), no validation unless asked."""
    options: dict[str, Any] = dict(
        accelerator="cpu",
        devices=devices,
        strategy="ddp_evolution" if devices > 1 else "auto",
        limit_val_batches=0,
    )
    options.update(kwargs)
    return make_trainer(out, max_steps, **options)


def state(strategy: nn.Module, model: nn.Module) -> dict[str, Any]:
    return {"strategy": strategy.state_dict(), "model": FlatParams(model).flatten(model)}


def main(out: Path, devices: int) -> None:
    """Run every case; each rank saves what it ended with."""
    torch.set_num_threads(1)
    digits = DigitsDataModule(steps_per_epoch=25)
    validated = DigitsDataModule(steps_per_epoch=25, val_size=100)  # the paper's split has no validation set
    states: dict[str, Any] = {}

    # M2N2 through EvolutionModule, with logs, validation and checkpoints ...
    module = EvolutionModule(MLP(64, 32, 10), partial(M2N2Strategy, seed=0, children_per_step=2), block_size=BLOCK_SIZE)
    saver = ModelCheckpoint(dirpath=out / "ckpt", filename="{step}", every_n_train_steps=STEPS // 2, save_top_k=-1)
    trainer(
        out, devices, STEPS, logger=CSVLogger(out, name="logs", version=""), callbacks=[saver],
        enable_checkpointing=True, limit_val_batches=None, val_check_interval=STEPS // 2,
        check_val_every_n_epoch=None, log_every_n_steps=5,
    ).fit(module, datamodule=validated)
    states["module"] = state(module.strategy, module.model)

    # ... resumed from its middle checkpoint (another seed: the state must come from the checkpoint;
    # allow_resume_changes, since a run with other settings is refused by default)
    resumed = EvolutionModule(
        MLP(64, 32, 10), partial(M2N2Strategy, seed=9, children_per_step=2), block_size=BLOCK_SIZE,
        allow_resume_changes=True,
    )
    middle = out / "ckpt" / f"step={STEPS // 2}.ckpt"
    trainer(out, devices, STEPS).fit(resumed, datamodule=validated, ckpt_path=middle)
    states["resumed"] = state(resumed.strategy, resumed.model)

    # M2N2 through the callback, in place of a LightningModule's optimizer
    classifier = Classifier(hidden=16)
    callback = M2N2Callback(strategy=partial(M2N2Strategy, pop_size=8, seed=1), block_size=BLOCK_SIZE)
    trainer(out, devices, STEPS, callbacks=[callback]).fit(classifier, datamodule=digits)
    states["callback"] = state(callback.strategy, classifier)

    # CMA-ES through EvolutionModule
    cmaes = EvolutionModule(
        MLP(64, 16, 10), partial(CMAESStrategy, popsize=6, diagonal=True, seed=2), block_size=BLOCK_SIZE
    )
    trainer(out, devices, 10).fit(cmaes, datamodule=digits)
    states["cmaes"] = state(cmaes.strategy, cmaes.model)

    # the default blocks (one per rank): ranks agree with each other
    default = EvolutionModule(MLP(64, 32, 10), partial(M2N2Strategy, seed=3))
    trainer(out, devices, STEPS).fit(default, datamodule=digits)
    states["one_block_per_rank"] = state(default.strategy, default.model)

    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if devices > 1:  # ranks given other resources fail together, with a clear message
        x, y = digits.train_tensors
        mismatched = M2N2Callback(resources=(x[rank : rank + 100], y[rank : rank + 100]))
        try:
            trainer(out, devices, 5, callbacks=[mismatched]).fit(Classifier(hidden=16), datamodule=digits)
        except ValueError as error:
            states["mismatch_error"] = str(error)
    torch.save(states, out / f"states_{rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
