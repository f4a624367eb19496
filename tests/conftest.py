"""Shared pytest fixtures."""

from __future__ import annotations

import os
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
