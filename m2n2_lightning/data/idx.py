"""A small reader for IDX files (the MNIST format), gzip-compressed or not.

The format: two zero bytes, one dtype code byte (``0x08`` = unsigned byte, the
only one MNIST uses and the only one read here), one byte with the number of
dimensions, one big-endian ``uint32`` per dimension, then the payload in C
order. When the file is one of the four MNIST files, the SHA-256 of its
decompressed content is checked as well.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import struct
import zlib
from pathlib import Path

import torch

__all__ = ["FIX_HINT", "MNIST_SHA256", "DataFileError", "MissingDataFileError", "read_idx"]

#: SHA-256 of the decompressed content of the four MNIST files, by file name.
MNIST_SHA256: dict[str, str] = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}

#: How to repair a bad or missing data file; appended to every error message.
FIX_HINT = (
    "To fix it, delete any bad copy and download the files with MNISTDataModule(download=True), "
    "or point `data_dir` (or the M2N2_DATA_DIR environment variable) at a folder holding "
    "the four MNIST IDX files (.gz or decompressed)."
)

_GZIP_MAGIC = b"\x1f\x8b"
_UBYTE_CODE = 0x08


class DataFileError(ValueError):
    """A data file is missing, truncated, malformed or fails its checksum."""

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}. {FIX_HINT}")


class MissingDataFileError(DataFileError, FileNotFoundError):
    """A data file does not exist (also a ``FileNotFoundError``)."""


def _decompressed_content(path: Path) -> bytes:
    """The file's bytes, gunzipped when they start with the gzip magic number."""
    if not path.is_file():
        raise MissingDataFileError(path, "file not found")
    raw = path.read_bytes()
    if not raw.startswith(_GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:
        raise DataFileError(path, f"corrupt gzip stream ({type(err).__name__}: {err})") from err


def read_idx(path: str | os.PathLike[str]) -> torch.Tensor:
    """Read an unsigned-byte IDX file (``.gz`` or decompressed) into a ``torch.uint8`` tensor.

    The tensor has the shape the header declares. Raises :class:`DataFileError`
    when the file is missing, not gzip-decodable, has a bad magic number or
    dtype code, is truncated or too long, or (for the four MNIST files) when the
    SHA-256 of its decompressed content is not the published one.
    """
    path = Path(path)
    data = _decompressed_content(path)
    if len(data) < 4:
        raise DataFileError(path, f"truncated: expected at least a 4-byte header, got {len(data)} bytes")
    zero0, zero1, dtype_code, ndim = data[:4]
    if zero0 != 0 or zero1 != 0:
        raise DataFileError(path, f"bad magic number {data[:4].hex()} (an IDX file starts with two zero bytes)")
    if dtype_code != _UBYTE_CODE:
        raise DataFileError(path, f"unsupported IDX dtype code 0x{dtype_code:02x} (only 0x08, unsigned byte, is read)")
    if ndim == 0:
        raise DataFileError(path, "bad header: the IDX file declares 0 dimensions")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise DataFileError(path, f"truncated: expected a {header_len}-byte header, got {len(data)} bytes")
    dims = struct.unpack(f">{ndim}I", data[4:header_len])
    expected = header_len + math.prod(dims)
    if len(data) < expected:
        raise DataFileError(path, f"truncated: expected {expected} bytes for shape {list(dims)}, got {len(data)}")
    if len(data) > expected:
        raise DataFileError(path, f"too long: expected {expected} bytes for shape {list(dims)}, got {len(data)}")

    name = path.name.removesuffix(".gz")
    if name in MNIST_SHA256:
        digest = hashlib.sha256(data).hexdigest()
        if digest != MNIST_SHA256[name]:
            raise DataFileError(
                path, f"checksum mismatch: SHA-256 of the content is {digest}, expected {MNIST_SHA256[name]}"
            )
    return torch.frombuffer(bytearray(data), dtype=torch.uint8, offset=header_len).reshape(dims)
