"""Shared pytest fixtures."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

MNIST_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _holds_mnist(folder: Path) -> bool:
    return all((folder / name).is_file() or (folder / f"{name}.gz").is_file() for name in MNIST_NAMES)


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """The folder with the four MNIST IDX files: $M2N2_DATA_DIR, else ``shared/data/mnist`` beside the repo.

    Fails (does not skip) when no copy is found, so that a missing data folder
    cannot pass unnoticed.
    """
    candidates = []
    if os.environ.get("M2N2_DATA_DIR"):
        candidates.append(Path(os.environ["M2N2_DATA_DIR"]))
    candidates += [Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist", Path("/work/shared/data/mnist")]
    for folder in candidates:
        if _holds_mnist(folder):
            return folder
    pytest.fail(
        "MNIST IDX files not found; looked in " + ", ".join(str(c) for c in candidates)
        + ". Set M2N2_DATA_DIR to a folder holding " + ", ".join(f"{n}[.gz]" for n in MNIST_NAMES)
    )


# --- Lightning helpers shared by test_callback*.py, test_module.py and ddp_run.py ---------------------------------
# (import them with `from conftest import Classifier, make_trainer`: pytest puts tests/ on sys.path, and
# ddp_run.py runs as a script from tests/.)

import lightning as L
import torch
from torch import Tensor, nn

from m2n2_lightning import FlatParams
from m2n2_lightning.data import DigitsDataModule


class CountingAdam(torch.optim.Adam):
    """Adam that counts its steps."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.steps = 0

    def step(self, closure=None):
        self.steps += 1
        return super().step(closure)


class Classifier(L.LightningModule):
    """An ordinary gradient-trained classifier 64 -> hidden -> 10 (parameters from N(0, 0.01^2) after
    `torch.manual_seed(seed)`), with a `CountingAdam`; records the accuracy each `training_step` sees."""

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


def make_trainer(root: Path, max_steps: int, callbacks=(), **kwargs) -> L.Trainer:
    """A quiet CPU-friendly Trainer: no logger, checkpoints, progress bar or model summary unless asked for."""
    options = dict(
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=10,
        default_root_dir=root,
    )
    options.update(kwargs)
    return L.Trainer(max_steps=max_steps, callbacks=list(callbacks), **options)


@pytest.fixture(scope="module")
def one_thread():
    """Small full-batch steps are fastest on one thread (and robust to a busy machine); restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def flat(module: nn.Module) -> Tensor:
    """The module's parameters as one flat vector, in the order M2N2Callback evolves them."""
    return FlatParams(module).flatten(module)


@pytest.fixture(scope="module")
def digits() -> DigitsDataModule:
    """The digits data (test_callback.py, test_callback_merge.py), set up once per test module."""
    data = DigitsDataModule()
    data.setup()
    return data


# --- Strategy helpers shared by test_strategy.py, test_operators.py, test_speed_paths.py and test_map_elites.py ----
# (`from conftest import start_with_scores, archive_of, split_point_ratios_reference`)

from m2n2_lightning.strategies import operators as _ops
from m2n2_lightning.strategies.archive import Archive
from m2n2_lightning.strategies.children import Children


def start_with_scores(strategy, scores) -> Tensor:
    """`strategy.start(...)` with a score function that returns `scores` (a [m, N] tensor, or a function of the
    candidates [m, D] giving one); returns a copy of the initial members [m, D] that the strategy asked to be scored."""
    seen: list[Tensor] = []

    def score(children: Children) -> Tensor:
        candidates = children.dense()
        seen.append(candidates.clone())
        return scores(candidates) if callable(scores) else scores

    strategy.start(score)
    assert len(seen) == 1, f"start() scored {len(seen)} batches, expected one"
    return seen[0]


def archive_of(members: Tensor, scores: Tensor | None = None, occupied: Tensor | None = None) -> Archive:
    """An `Archive` whose buffers ARE the given tensors (writes show in them)."""
    archive = Archive(len(members), members.shape[1], dtype=members.dtype)
    archive.members = members
    if scores is not None:
        archive.scores = scores
    if occupied is not None:
        archive.occupied = occupied
    return archive


def split_point_ratios_reference(weight: Tensor, split: Tensor | None, dim: int) -> Tensor:
    """The mixing ratios t [k, D] of split-point SLERP entry by entry: w before the split point, 1 - w from it on;
    without a split point t = w everywhere, as [k, 1] (a copy of the deleted `operators.split_point_ratios`)."""
    weight = weight.unsqueeze(-1)
    if split is None:
        return weight
    before = torch.arange(dim, device=weight.device) < split.unsqueeze(-1)
    return torch.where(before, weight, 1 - weight)


def crossover(a: torch.Tensor, b: torch.Tensor, generator: torch.Generator, use_split_point: bool = True) -> torch.Tensor:
    """Split-point SLERP children of the row pairs (a[i], b[i]), as a strategy makes them."""
    archive = archive_of(torch.cat([a, b]))
    split, weight = _ops.crossover_draws(len(a), a.shape[1], generator, use_split_point, archive.like)
    return archive.crossover(torch.arange(len(a)), torch.arange(len(a), 2 * len(a)), split, weight).dense()


def replace_worst(members, scores, occupied, child, child_scores, alpha: float) -> torch.Tensor:
    """The replace-the-worst update on plain tensors, in place; returns the dropped row (P: the child)."""
    worst = _ops.worst_after_insert(scores, child_scores, alpha)
    archive_of(members, scores, occupied).write(worst, Children.of(child.unsqueeze(0)), 0, child_scores)
    return worst


@pytest.fixture()
def lightning_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """`caplog`, also attached straight to Lightning's rank-zero logger at INFO: an earlier test (Hydra's logging
    set-up, a Trainer) may leave Lightning's loggers not propagating to the root, where `caplog` listens."""
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    logger.addHandler(caplog.handler)
    level, disabled = logger.level, logger.disabled
    logger.setLevel(logging.INFO)
    logger.disabled = False
    try:
        yield caplog
    finally:
        logger.removeHandler(caplog.handler)
        logger.setLevel(level)
        logger.disabled = disabled
