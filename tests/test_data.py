"""Data modules and the IDX reader, on the real digits and MNIST files."""

from __future__ import annotations

import gzip
import shutil
import struct
from pathlib import Path

import pytest
import torch
from sklearn.datasets import load_digits

from m2n2_lightning.data import (
    DataFileError,
    DigitsDataModule,
    MNISTDataModule,
    read_idx,
)
from m2n2_lightning.data.idx import MissingDataFileError

LABELS = "train-labels-idx1-ubyte"  # the smallest checksummed file: 60,008 bytes decompressed


# --- digits -----------------------------------------------------------------------------------------


def test_digits_paper_split():
    dm = DigitsDataModule()
    dm.setup("fit")
    (x_train, y_train), (x_test, y_test) = dm.train_tensors, dm.test_tensors
    assert x_train.shape == (1437, 64) and x_test.shape == (360, 64)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    digits = load_digits()
    assert torch.equal(x_train[0], torch.from_numpy(digits.data[0]).float())
    assert torch.equal(x_test[-1], torch.from_numpy(digits.data[-1]).float())
    assert y_train[0] == digits.target[0] and y_test[-1] == digits.target[-1]
    assert x_train.min() == 0 and x_train.max() == 16
    assert dm.num_classes == 10 and dm.input_dim == 64
    # the paper has no validation split: validation is the test set
    assert dm.val_tensors[0] is x_test and dm.val_tensors[1] is y_test


def test_digits_normalize_and_lazy_setup():
    dm = DigitsDataModule(normalize=True)
    x, _ = dm.train_tensors  # no explicit setup()
    assert 0.0 <= x.min() and x.max() == 1.0
    assert torch.equal(x * 16, DigitsDataModule().train_tensors[0])


def test_digits_val_size_and_loaders():
    dm = DigitsDataModule(val_size=100, batch_size=500)
    full = DigitsDataModule().train_tensors[0]
    assert torch.equal(dm.train_tensors[0], full[:1337])
    assert torch.equal(dm.val_tensors[0], full[1337:])
    assert [len(b[0]) for b in dm.train_dataloader()] == [500, 500, 337]
    (xb, yb), = list(DigitsDataModule().test_dataloader())  # full batch by default
    assert xb.shape == (360, 64) and yb.shape == (360,)
    assert [len(b[0]) for b in dm.val_dataloader()] == [100]


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"val_size": -1}, "val_size=-1"),
        ({"val_size": 1437}, "val_size=1437"),
        ({"batch_size": 0}, "batch_size=0"),
        ({"batch_size": 2.5}, "batch_size=2.5"),
        ({"normalize": "yes"}, "normalize='yes'"),
    ],
)
def test_digits_rejects_bad_arguments(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment.replace(".", r"\.")):
        DigitsDataModule(**kwargs)


# --- MNIST: the real files ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist(mnist_dir) -> MNISTDataModule:
    """MNIST read once for the module, located through the M2N2_DATA_DIR environment variable."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("M2N2_DATA_DIR", str(mnist_dir))
        dm = MNISTDataModule()
    assert dm.data_dir == mnist_dir
    dm.setup()
    return dm


def test_mnist_shapes_and_known_facts(mnist):
    (x_train, y_train), (x_test, y_test) = mnist.train_tensors, mnist.test_tensors
    assert x_train.shape == (60000, 784) and x_test.shape == (10000, 784)
    assert y_train.shape == (60000,) and y_test.shape == (10000,)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    assert 0.0 == x_train.min() and x_train.max() == 1.0
    assert set(y_train.unique().tolist()) == set(range(10)) == set(y_test.unique().tolist())
    assert y_train[:5].tolist() == [5, 0, 4, 1, 9] and y_test[:3].tolist() == [7, 2, 1]
    assert mnist.num_classes == 10 and mnist.input_dim == 784
    assert mnist.val_tensors[0] is x_test  # validation = test set by default


def test_mnist_options(mnist, mnist_dir):
    dm = MNISTDataModule(mnist_dir, train_size=1000, val_size=200, flatten=False, normalize=True, batch_size=256)
    x, y = dm.train_tensors  # train_size resources, then val_size held-out training images after them
    assert x.shape == (1000, 28, 28) and dm.val_tensors[0].shape == (200, 28, 28)
    expected = (mnist.train_tensors[0][:1000].view(1000, 28, 28) - 0.1307) / 0.3081
    assert torch.allclose(x, expected) and torch.equal(y, mnist.train_tensors[1][:1000])
    assert torch.equal(dm.val_tensors[1], mnist.train_tensors[1][1000:1200])
    assert dm.test_tensors[0].shape == (10000, 28, 28)
    assert [len(b[0]) for b in dm.train_dataloader()] == [256, 256, 256, 232]
    held_out = MNISTDataModule(mnist_dir, val_size=5000)  # all the rest are resources
    assert len(held_out.train_tensors[0]) == 55000
    assert torch.equal(held_out.val_tensors[1], mnist.train_tensors[1][55000:])


@pytest.mark.parametrize(
    "kwargs, fragment",
    [({"train_size": 0}, "train_size=0"), ({"train_size": 60001}, "train_size=60001"),
     ({"train_size": 59901, "val_size": 100}, "val_size=100"), ({"val_size": 60000}, "val_size=60000"),
     ({"val_size": -1}, "val_size=-1"), ({"download": 1}, "download=1")],
)
def test_mnist_rejects_bad_arguments(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        MNISTDataModule("unused", **kwargs)


def test_decompressed_files_read_alike(mnist, mnist_dir, tmp_path):
    # test files decompressed, training files gzipped: the module reads both kinds
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (tmp_path / name).write_bytes(gzip.decompress((mnist_dir / f"{name}.gz").read_bytes()))
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
        (tmp_path / f"{name}.gz").symlink_to(mnist_dir / f"{name}.gz")
    dm = MNISTDataModule(tmp_path, train_size=10)
    assert dm.file_path("t10k-images-idx3-ubyte") == tmp_path / "t10k-images-idx3-ubyte"
    assert torch.equal(dm.test_tensors[0], mnist.test_tensors[0])
    assert torch.equal(dm.test_tensors[1], mnist.test_tensors[1])
    assert torch.equal(dm.train_tensors[1], mnist.train_tensors[1][:10])
    raw = read_idx(tmp_path / "t10k-labels-idx1-ubyte")
    assert raw.dtype == torch.uint8 and torch.equal(raw, read_idx(mnist_dir / "t10k-labels-idx1-ubyte.gz"))


# --- the IDX reader's checks ------------------------------------------------------------------------


@pytest.fixture
def labels_bytes(mnist_dir) -> bytes:
    return gzip.decompress((mnist_dir / f"{LABELS}.gz").read_bytes())


def _error_for(path: Path) -> DataFileError:
    with pytest.raises(DataFileError) as info:
        read_idx(path)
    message = str(info.value)
    assert str(path) in message and "download=True" in message and "M2N2_DATA_DIR" in message
    return info.value


@pytest.mark.parametrize("compress", [False, True])
def test_truncated_file(labels_bytes, tmp_path, compress):
    path = tmp_path / (LABELS + (".gz" if compress else ""))
    payload = labels_bytes[:-8]
    path.write_bytes(gzip.compress(payload) if compress else payload)
    message = str(_error_for(path))
    assert "truncated: expected 60008 bytes" in message and "got 60000" in message


def test_flipped_byte_fails_checksum(labels_bytes, tmp_path):
    data = bytearray(labels_bytes)
    data[1000] ^= 0x01
    path = tmp_path / LABELS
    path.write_bytes(bytes(data))
    assert "checksum mismatch" in str(_error_for(path))


def test_bad_magic(labels_bytes, tmp_path):
    path = tmp_path / LABELS
    path.write_bytes(b"\x01" + labels_bytes[1:])
    assert "bad magic" in str(_error_for(path))


def test_unsupported_dtype_and_extra_bytes(tmp_path):
    path = tmp_path / "floats-idx1"
    path.write_bytes(b"\x00\x00\x0d\x01" + struct.pack(">I", 1) + b"\x00" * 4)
    assert "dtype code 0x0d" in str(_error_for(path))
    path.write_bytes(b"\x00\x00\x08\x01" + struct.pack(">I", 2) + b"\x01\x02\x03")
    assert "too long" in str(_error_for(path))


@pytest.mark.parametrize("damage", ["flip", "cut"])
def test_corrupt_gzip(mnist_dir, tmp_path, damage):
    data = bytearray((mnist_dir / f"{LABELS}.gz").read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
    else:
        data = data[: len(data) // 2]
    path = tmp_path / f"{LABELS}.gz"
    path.write_bytes(bytes(data))
    assert "corrupt gzip" in str(_error_for(path))


def test_unknown_name_reads_without_checksum(tmp_path):
    path = tmp_path / "tiny-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(b"\x00\x00\x08\x03" + struct.pack(">3I", 2, 1, 3) + bytes(range(6))))
    assert torch.equal(read_idx(path), torch.arange(6, dtype=torch.uint8).view(2, 1, 3))


def test_missing_file(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="file not found"):
        read_idx(tmp_path / "nothing-here")
    monkeypatch.setenv("M2N2_DATA_DIR", str(tmp_path))
    dm = MNISTDataModule()
    assert dm.data_dir == tmp_path
    with pytest.raises(MissingDataFileError) as info:
        dm.setup()
    message = str(info.value)
    assert str(tmp_path) in message and "download=True" in message and "M2N2_DATA_DIR" in message


def test_default_dir_without_env(monkeypatch):
    monkeypatch.delenv("M2N2_DATA_DIR", raising=False)
    assert MNISTDataModule().data_dir == Path("data/mnist")


def test_download_from_mirrors(mnist_dir, tmp_path):
    # file:// mirrors stand in for the network: the first lacks the files, the second serves them;
    # a file already there is not fetched again.
    shutil.copy(mnist_dir / "train-images-idx3-ubyte.gz", tmp_path)
    dm = MNISTDataModule(
        tmp_path / "mnist", download=True, train_size=5,
        mirrors=[(tmp_path / "empty").as_uri(), mnist_dir.as_uri()],
    )
    (tmp_path / "mnist").mkdir()
    (tmp_path / "mnist" / "train-images-idx3-ubyte.gz").symlink_to(tmp_path / "train-images-idx3-ubyte.gz")
    dm.prepare_data()
    for name in ("train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        assert (tmp_path / "mnist" / f"{name}.gz").read_bytes() == (mnist_dir / f"{name}.gz").read_bytes()
    assert (tmp_path / "mnist" / "train-images-idx3-ubyte.gz").is_symlink()
    assert dm.train_tensors[1].tolist() == [5, 0, 4, 1, 9]


def test_download_failure_names_every_mirror(mnist_dir, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x01" + struct.pack(">I", 1) + b"\x07"))
    mirrors = [bad.as_uri(), (tmp_path / "none").as_uri()]
    dm = MNISTDataModule(tmp_path / "mnist", download=True, mirrors=mirrors)
    with pytest.raises(DataFileError, match="download failed from every mirror") as info:
        dm.prepare_data()
    assert "checksum mismatch" in str(info.value) and str(tmp_path / "none") in str(info.value)
    assert not (tmp_path / "mnist" / "train-images-idx3-ubyte.gz").exists()
