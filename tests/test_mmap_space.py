"""storage="mmap" on a disk too small for its archive: a ValueError naming the directory and the bytes, at once, instead
of a SIGBUS when a later write finds no space (issue 24, reliability point 5)."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from m2n2_lightning import M2N2Strategy

#: 6 members of 100,000 float32 parameters: 2.4 MB, more than the 1 MiB disk below.
POP, D = 6, 100_000


@pytest.fixture()
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (root may mount one here; elsewhere the test says why it cannot run)."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.strip()}); the reserve path is tested below")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_a_disk_too_small_is_a_clear_error(small_disk: Path) -> None:
    with pytest.raises(ValueError, match=rf"needs 2,400,000 bytes for its archive file in {small_disk}, but only"):
        M2N2Strategy(D, pop_size=POP, storage="mmap", storage_dir=str(small_disk))
    assert list(small_disk.iterdir()) == []  # the file is gone, nothing half-made stays
    M2N2Strategy(D, pop_size=2, storage="mmap", storage_dir=str(small_disk))  # 800 KB: fits


def test_no_space_from_the_reservation_is_the_same_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(ValueError, match=rf"needs 2,400,000 bytes for its archive file in {tmp_path}.*storage_dir"):
        M2N2Strategy(D, pop_size=POP, storage="mmap", storage_dir=str(tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_a_file_system_without_fallocate_checks_the_free_space(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def unsupported(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    monkeypatch.setattr(os, "posix_fallocate", unsupported)
    strategy = M2N2Strategy(D, pop_size=POP, storage="mmap", storage_dir=str(tmp_path))  # plenty of space here
    assert strategy.archive.members.shape == (POP, D)
