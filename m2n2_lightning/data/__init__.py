"""Data modules: the paper's embedded 8x8 digits and MNIST (own IDX reader, no torchvision)."""

from m2n2_lightning.data.base import TensorDataModule
from m2n2_lightning.data.digits import DigitsDataModule
from m2n2_lightning.data.idx import DataFileError, MissingDataFileError, read_idx
from m2n2_lightning.data.mnist import MNISTDataModule

__all__ = [
    "DataFileError",
    "DigitsDataModule",
    "MNISTDataModule",
    "MissingDataFileError",
    "TensorDataModule",
    "read_idx",
]
