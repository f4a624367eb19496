"""MNIST from its four IDX files, read by our own reader (torchvision is not needed)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from m2n2_lightning.data.base import TensorDataModule, TensorPair, _check_count
from m2n2_lightning.data.idx import DataFileError, MissingDataFileError, read_idx

__all__ = ["DATA_DIR_ENV", "MNIST_FILES", "MNIST_MIRRORS", "MNISTDataModule"]

#: Environment variable naming the folder with the MNIST files (when ``data_dir`` is not given).
DATA_DIR_ENV = "M2N2_DATA_DIR"
#: Folder used when neither ``data_dir`` nor the environment variable is set.
DEFAULT_DATA_DIR = Path("data") / "mnist"
#: The four files, by role; each may be stored decompressed or with a ``.gz`` suffix.
MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
#: Base URLs tried in order by ``download=True``; each serves ``<name>.gz``.
MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
MNIST_TRAIN = 60_000
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081


class MNISTDataModule(TensorDataModule):
    """MNIST: 60,000 training and 10,000 test images of 28x28 digits.

    The files are looked for in ``data_dir``, else in the folder named by the
    ``M2N2_DATA_DIR`` environment variable, else in ``./data/mnist``; each of
    the four may be gzip-compressed (``.gz``) or not, and is checked against its
    published SHA-256.

    Args:
        data_dir: folder holding the four IDX files.
        download: download the missing files (``.gz``) from ``mirrors`` into
            ``data_dir`` and verify them; off by default, so that nothing is
            fetched unless asked for.
        normalize: after scaling pixels to [0, 1], subtract 0.1307 and divide by
            0.3081 (the usual MNIST standardisation). Off by default.
        flatten: give images as ``[N, 784]`` (default) instead of ``[N, 28, 28]``.
        train_size: the first ``train_size`` training images are the resources
            (None: all those not held out for validation); handy for fast runs and tests.
        val_size: hold out the ``val_size`` training images after those as the
            validation set (held-out training images, never the test set). With 0
            (default) there is no validation loop. ``train_size + val_size`` must
            not exceed 60,000.
        batch_size: examples per batch of the data loaders; None (default)
            gives each split as a single full batch.
        steps_per_epoch: repeat the training batches to this many per epoch
            (None: one pass). Evolution runs set it (see conf/data/).
        mirrors: base URLs tried in order when downloading.

    Images are ``float32`` in [0, 1] (unless ``normalize``), labels ``int64``.
    """

    num_classes = 10
    input_dim = 28 * 28

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None = None,
        *,
        download: bool = False,
        normalize: bool = False,
        flatten: bool = True,
        train_size: int | None = None,
        val_size: int = 0,
        batch_size: int | None = None,
        steps_per_epoch: int | None = None,
        mirrors: Sequence[str] = MNIST_MIRRORS,
    ) -> None:
        for name, flag in (("download", download), ("normalize", normalize), ("flatten", flatten)):
            if not isinstance(flag, bool):
                raise ValueError(f"{name}={flag!r} is not allowed: expected True or False")
        if train_size is not None and (
            isinstance(train_size, bool) or not isinstance(train_size, int) or not 1 <= train_size <= MNIST_TRAIN
        ):
            raise ValueError(f"train_size={train_size!r} is not allowed: expected None or an int in 1..{MNIST_TRAIN}")
        if isinstance(mirrors, str) or not mirrors:
            raise ValueError(f"mirrors={mirrors!r} is not allowed: expected a non-empty sequence of base URLs")
        _check_count("val_size", val_size, minimum=0)
        resources = MNIST_TRAIN - val_size if train_size is None else train_size
        if resources < 1 or resources + val_size > MNIST_TRAIN:
            raise ValueError(
                f"train_size={train_size} with val_size={val_size} is not allowed: the resources and the held-out "
                f"validation images together must fit in the {MNIST_TRAIN:,} training images; lower one of them"
            )
        super().__init__(num_train=resources + val_size, val_size=val_size, batch_size=batch_size, steps_per_epoch=steps_per_epoch)
        if data_dir is None:
            data_dir = os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR
        self.data_dir = Path(data_dir)
        self.download = download
        self.normalize = normalize
        self.flatten = flatten
        self.train_size = train_size
        self.mirrors = tuple(mirrors)

    def file_path(self, name: str) -> Path | None:
        """Where the IDX file ``name`` lies in ``data_dir`` (decompressed preferred), or None."""
        for candidate in (self.data_dir / name, self.data_dir / f"{name}.gz"):
            if candidate.is_file():
                return candidate
        return None

    def prepare_data(self) -> None:
        """Download the missing files when ``download=True`` (Lightning runs this on one process)."""
        if self.download:
            for name in MNIST_FILES.values():
                if self.file_path(name) is None:
                    self._download(name)

    def _download(self, name: str) -> None:
        """Fetch ``name.gz`` from the first mirror that serves a file passing the checks."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        target = self.data_dir / f"{name}.gz"
        failures = []
        for mirror in self.mirrors:
            url = mirror.rstrip("/") + f"/{name}.gz"
            try:
                torch.hub.download_url_to_file(url, str(target), progress=False)
                read_idx(target)
                return
            except Exception as err:  # network (URLError, HTTPError, IncompleteRead) or a bad file: next mirror
                target.unlink(missing_ok=True)
                failures.append(f"{url}: {err}")
        raise DataFileError(
            target,
            "download failed from every mirror (check the network or fetch the files by hand):\n  "
            + "\n  ".join(failures),
        )

    def _read(self, role: str, count: int | None = None) -> torch.Tensor:
        """The first ``count`` (all when None) entries of one of the four files, as uint8."""
        name = MNIST_FILES[role]
        path = self.file_path(name)
        if path is None:
            raise MissingDataFileError(self.data_dir / f"{name}[.gz]", f"file not found in {self.data_dir}")
        return read_idx(path)[:count]

    def _images(self, role: str, count: int | None = None) -> torch.Tensor:
        x = self._read(role, count).to(torch.float32).div_(255.0)
        if self.normalize:
            x = x.sub_(MNIST_MEAN).div_(MNIST_STD)
        return x.flatten(1) if self.flatten else x

    def load(self) -> tuple[TensorPair, TensorPair]:
        """Read and check the four files (downloading them first if asked to)."""
        self.prepare_data()
        n = self.num_train
        train = (self._images("train_images", n), self._read("train_labels", n).to(torch.int64))
        test = (self._images("test_images"), self._read("test_labels").to(torch.int64))
        return train, test
