"""Merge two digit specialists into one classifier with `M2N2Callback`.

The paper's pre-trained merging experiment, small: an ordinary LightningModule
(`m2n2_lightning.specialists.Classifier`: MLP 64-256-10, Adam, cross-entropy)
is trained with a Lightning Trainer for 10 full-batch steps from N(0, 0.01^2)
on the train examples of digits 0-4, and again (another initialisation) on
those of digits 5-9. Each specialist knows only half of the classes. The two
saved state_dicts are then merged by M2N2 on the whole training split,
gradient-free, by adding `M2N2Callback(init_from=...)` to the Trainer of a
fresh module of the same class; its own optimizer never steps.

    python examples/merge_specialists.py                 # 1,500 forward passes
    python examples/merge_specialists.py --steps 10000   # the paper's budget

The specialists' weights, CSV logs and the member-by-class heatmap go to `--out`.
"""

from __future__ import annotations

import argparse
import time
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from m2n2_lightning import M2N2Callback, M2N2Strategy
from m2n2_lightning.data import DigitsDataModule
from m2n2_lightning.loggers import quiet_lightning
from m2n2_lightning.specialists import SPECIALIST_CLASSES, Classifier, train_specialist


def make_trainer(out: Path, name: str, max_steps: int, **kwargs: Any) -> L.Trainer:
    return L.Trainer(
        max_steps=max_steps,
        logger=CSVLogger(out, name=name),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=10,
        **kwargs,
    )


@torch.no_grad()
def test_accuracy(model: nn.Module, data: DigitsDataModule) -> float:
    x, y = data.test_tensors
    return (model(x).argmax(dim=1) == y).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1500, help="evolution steps = forward passes (paper: 10,000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the specialists' initialisation and of M2N2")
    parser.add_argument("--out", type=Path, default=Path("outputs/merge_specialists"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (these small steps run fastest on one)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    quiet_lightning()
    args.out.mkdir(parents=True, exist_ok=True)

    data = DigitsDataModule()
    x, y = data.train_tensors
    generator = torch.Generator().manual_seed(args.seed)
    specialists, paths = {}, []
    for classes in SPECIALIST_CLASSES:
        name = f"specialist_{classes[0]}-{classes[-1]}"
        specialists[name] = train_specialist(
            x, y, classes, generator, logger=CSVLogger(args.out, name=name), log_every_n_steps=1
        )
        paths.append(args.out / f"{name}.pt")
        torch.save(specialists[name].state_dict(), paths[-1])

    start = time.perf_counter()
    merged = Classifier()
    callback = M2N2Callback(strategy=partial(M2N2Strategy, seed=args.seed), init_from=paths)
    make_trainer(args.out, "merge", max_steps=args.steps, callbacks=[callback]).fit(merged, datamodule=data)
    seconds = time.perf_counter() - start

    print(f"\ntest accuracy on all {len(data.test_tensors[1])} test digits:")
    for name, specialist in specialists.items():
        print(f"  {name:<18} {test_accuracy(specialist, data):6.1%}")
    print(f"  {'M2N2 merge':<18} {test_accuracy(merged, data):6.1%}   "
          f"({callback.strategy.forward_passes} forward passes, {seconds:.1f} s)")
    print(f"member-by-class heatmap: {callback.heatmap_path}")


if __name__ == "__main__":
    main()
