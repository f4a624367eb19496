"""A LightningModule evolved by `M2N2Callback` through `Trainer.fit`, as a user writes it (for test_fault_injection.py).

    python tests/interrupt_run.py OUT [--pause-after N | --fail-after N] [--resume CKPT]

The user's part: an ordinary `Classifier` (tests/conftest.py), the callback,
a `ModelCheckpoint` and the README's `InterruptCheckpoint`; the script does
not catch anything, so its exit status is what a user's script gets. The
test's part: `--pause-after N` adds `faults.PauseAfter`, which writes
`OUT/paused` after training step N and waits there for the signal;
`--fail-after N` adds `faults.FailAfter`, which raises there; after
fit, the strategy's final state is saved to `OUT/final.pt` for a bit-for-bit
comparison.
"""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

import torch

# tests/conftest.py and tests/faults.py: tests/ is on the path (this script's folder)
from conftest import Classifier, make_trainer
from faults import FailAfter, PauseAfter
from lightning.pytorch.callbacks import ModelCheckpoint

from m2n2_lightning import M2N2Callback, M2N2Strategy
from m2n2_lightning.checkpointing import InterruptCheckpoint
from m2n2_lightning.data import DigitsDataModule

#: Training steps of a whole run, each of STEPS_PER_BATCH evolution steps.
STEPS, STEPS_PER_BATCH = 12, 5


def main(out: Path, pause_after: int | None, fail_after: int | None, resume: Path | None) -> None:
    torch.set_num_threads(1)
    evolution = M2N2Callback(strategy=partial(M2N2Strategy, pop_size=8, seed=0), steps_per_batch=STEPS_PER_BATCH)
    checkpoints = ModelCheckpoint(dirpath=out / "checkpoints", every_n_train_steps=4, save_last=True)
    callbacks = [evolution, checkpoints, InterruptCheckpoint(out / "checkpoints")]
    # before the evolution callback, so that the stop comes at this very step
    if pause_after is not None:
        callbacks.insert(0, PauseAfter(pause_after, out / "paused"))
    if fail_after is not None:
        callbacks.insert(0, FailAfter(fail_after))
    trainer = make_trainer(out, STEPS, callbacks, enable_checkpointing=True)
    trainer.fit(Classifier(hidden=16), datamodule=DigitsDataModule(steps_per_epoch=STEPS), ckpt_path=resume)
    torch.save(evolution.strategy.state_dict(), out / "final.pt")
    print(f"done: {evolution.strategy.forward_passes - evolution.forward_passes_at_start} forward passes this run")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--pause-after", type=int)
    parser.add_argument("--fail-after", type=int)
    parser.add_argument("--resume", type=Path)
    arguments = parser.parse_args()
    main(arguments.out, arguments.pause_after, arguments.fail_after, arguments.resume)
