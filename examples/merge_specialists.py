"""Merge two digit specialists into one classifier with `M2N2Callback`.

The paper's pre-trained merging experiment, small: an ordinary LightningModule
(MLP 64-256-10, Adam, cross-entropy) is trained with a Lightning Trainer for 10
full-batch steps from N(0, 0.01^2) on the train examples of digits 0-4, and
again (another initialisation) on those of digits 5-9. Each specialist knows
only half of the classes. The two checkpoints are then merged by M2N2 on the
whole training split, gradient-free, by adding `M2N2Callback(init_from=...)` to
the Trainer of a fresh module of the same class; its own optimizer never steps.

    python examples/merge_specialists.py                 # 1,500 forward passes
    python examples/merge_specialists.py --steps 10000   # the paper's budget

Checkpoints, CSV logs and the member-by-class heatmap go to `--out`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from m2n2_lightning import M2N2Callback
from m2n2_lightning.data import DigitsDataModule


class DigitClassifier(L.LightningModule):
    """A plain classifier, written as for gradient training: nothing M2N2-specific."""

    def __init__(self, lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
        for p in self.parameters():
            nn.init.normal_(p, std=0.01)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = nn.functional.cross_entropy(logits, y)
        self.log("train/loss", loss)
        self.log("train/acc", (logits.argmax(dim=1) == y).float().mean())
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


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


def train_specialist(data: DigitsDataModule, digits: range, seed: int, out: Path) -> Path:
    """Adam, lr 3e-3, 10 full-batch steps on the train examples of `digits`; returns the checkpoint."""
    x, y = data.train_tensors
    keep = torch.isin(y, torch.tensor(list(digits)))
    loader = DataLoader(TensorDataset(x[keep], y[keep]), batch_size=int(keep.sum()))
    torch.manual_seed(seed)
    model = DigitClassifier()
    trainer = make_trainer(out, f"specialist_{digits.start}-{digits.stop - 1}", max_steps=10)
    trainer.fit(model, loader)
    path = out / f"specialist_{digits.start}-{digits.stop - 1}.ckpt"
    trainer.save_checkpoint(path)
    return path


@torch.no_grad()
def test_accuracy(model: nn.Module, data: DigitsDataModule) -> float:
    x, y = data.test_tensors
    return (model(x).argmax(dim=1) == y).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1500, help="evolution steps = forward passes (paper: 10,000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the M2N2 strategy")
    parser.add_argument("--out", type=Path, default=Path("outputs/merge_specialists"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (these small steps run fastest on one)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    data = DigitsDataModule()
    checkpoints = [train_specialist(data, range(0, 5), seed=1, out=args.out),
                   train_specialist(data, range(5, 10), seed=2, out=args.out)]

    start = time.perf_counter()
    merged = DigitClassifier()
    callback = M2N2Callback(init_from=checkpoints, seed=args.seed)
    make_trainer(args.out, "merge", max_steps=args.steps, callbacks=[callback]).fit(merged, datamodule=data)
    seconds = time.perf_counter() - start

    print(f"\ntest accuracy on all {len(data.test_tensors[1])} test digits:")
    for path in checkpoints:
        specialist = DigitClassifier.load_from_checkpoint(path)
        print(f"  {path.stem:<18} {test_accuracy(specialist, data):6.1%}")
    print(f"  {'M2N2 merge':<18} {test_accuracy(merged, data):6.1%}   "
          f"({callback.strategy.forward_passes} forward passes, {seconds:.1f} s)")
    print(f"member-by-class heatmap: {callback.heatmap_path}")


if __name__ == "__main__":
    main()
