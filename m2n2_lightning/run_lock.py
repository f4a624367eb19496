"""One run per run directory: an advisory lock that a second run in the same directory is refused by.

Two runs writing one directory mix their CSV rows, overwrite each other's
checkpoints and crash at the end. `lock_run_directory` takes an exclusive
`flock` on `<dir>/.run.lock`, held until the process ends (the kernel releases
it when the process dies in any way, SIGKILL included, so no stale lock can
outlive its run). Only the launching process locks: DDP ranks that Lightning
or torchrun start in the same directory are the same run.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

#: The lock file's name inside a run directory.
LOCK_NAME = ".run.lock"
#: Lock files this process holds, by directory (kept open: closing one would release the lock).
_held: dict[Path, int] = {}


def is_launching_process() -> bool:
    """True unless this process is a DDP rank other than zero (LOCAL_RANK / NODE_RANK / RANK set and not 0)."""
    return all(os.environ.get(name, "0") == "0" for name in ("LOCAL_RANK", "NODE_RANK", "RANK"))


def lock_run_directory(directory: str | os.PathLike) -> None:
    """Hold `<directory>/.run.lock` for the rest of this process, or raise a ValueError naming the run
    that holds it and what to do. Taking it again in the same process is a no-op."""
    directory = Path(directory).resolve()
    if directory in _held or not is_launching_process():
        return
    directory.mkdir(parents=True, exist_ok=True)
    handle = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(handle, 64, 0).decode(errors="replace").strip() or "another process"
        os.close(handle)
        raise ValueError(
            f"another run ({holder}) is writing to {directory}; two runs in one directory would mix their logs "
            "and checkpoints. Give this run its own directory (hydra.run.dir=...), or wait for the other to end"
        ) from None
    os.ftruncate(handle, 0)
    os.pwrite(handle, f"pid {os.getpid()}".encode(), 0)
    _held[directory] = handle
