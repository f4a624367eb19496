"""Checkpoints that are never lost, never run code, and never resume something other than what was asked.

- `AtomicCheckpointIO`: Lightning's checkpoint IO, but every file is written
  beside its target and renamed over it (a kill at any moment leaves the
  previous good checkpoint; the partial file of a writer killed with SIGKILL
  is removed by the next save of that checkpoint), and every load passes
  `weights_only=True` (a crafted pickle cannot run code).
- `InterruptCheckpoint`: the checkpoint written when a run stops on a signal
  or an exception, only once this run has made an evolution step (a failure
  before that leaves nothing that could be mistaken for progress); on a full
  disk it names the newest checkpoint to resume from instead of writing.

What a checkpoint holds for evolution, and what a resume checks, is
`m2n2_lightning.resume`.
"""

from __future__ import annotations

import os
import pickle
import shutil
import signal
import socket
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from m2n2_lightning.checks import is_disk_full
from m2n2_lightning.distributed import RankTimeoutError
from m2n2_lightning.stopping import SignalStop


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to a temporary file in the target's directory, fsync, rename; load with `weights_only=True`.

    The temporary file is `.<name>.<host>-<pid>-<random>.tmp`; a save first
    removes those of this host whose writer process is gone (killed mid-write).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        prefix = f".{target.name}.{socket.gethostname()}-"
        remove_orphans(target.parent, prefix)
        handle, temporary = tempfile.mkstemp(prefix=f"{prefix}{os.getpid()}-", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(handle, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    def load_checkpoint(self, path: str | os.PathLike, map_location: Any = None, weights_only: bool | None = None) -> dict:
        return load_checkpoint_file(path, map_location)


def remove_orphans(folder: Path, prefix: str) -> None:
    """Delete the `<prefix><pid>-*.tmp` files (or folders) in `folder` whose process `pid` no longer runs."""
    for leftover in folder.iterdir():
        pid = leftover.name[len(prefix):].split("-", 1)[0]
        if not (leftover.name.startswith(prefix) and leftover.name.endswith(".tmp") and pid.isdigit()):
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
        except PermissionError:  # alive, another user's
            pass


def load_checkpoint_file(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """A Lightning checkpoint loaded with `weights_only=True`, or a ValueError saying why it is not usable."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise ValueError(f"checkpoint {path} is empty (0 bytes): it is not a usable checkpoint; resume from another one")
    try:
        content = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # corrupted bytes make the unpickler raise almost anything (KeyError, IndexError, ...)
        text = str(err)
        if isinstance(err, pickle.UnpicklingError) and ("GLOBAL" in text or "unrecognized function" in text):
            raise ValueError(
                f"checkpoint {path} holds objects that torch.load(weights_only=True) refuses to load (it could run "
                f"code), so it is not loaded: {text}"
            ) from err
        detail = text.split("WeightsUnpickler error:")[-1].strip().split("\n")[0]
        raise ValueError(
            f"checkpoint {path} is not a usable checkpoint (truncated, corrupted or not a torch file: "
            f"{type(err).__name__}: {detail})"
        ) from err
    if not isinstance(content, dict) or "state_dict" not in content:
        raise ValueError(f"{path} is not a Lightning checkpoint (no 'state_dict' entry)")
    return content


def disk_full_message(folder: Path) -> str:
    """What to do when the disk holding `folder` is full: free space, then resume from its newest checkpoint
    (every checkpoint there is whole: they are written beside their target and renamed over it)."""
    free = shutil.disk_usage(folder).free if folder.exists() else 0
    found = sorted(folder.glob("*.ckpt"), key=lambda path: path.stat().st_mtime) if folder.exists() else []
    resume = f"resume with ckpt_path={found[-1]}" if found else "no checkpoint was written yet: start again"
    return (
        f"Failed: the disk holding {folder} is full ({free:,} bytes free); no interrupt checkpoint written. "
        f"Free some space, then {resume}"
    )


def use_atomic_checkpoints(trainer: L.Trainer) -> None:
    """Give the trainer `AtomicCheckpointIO` where it has Lightning's default checkpoint IO."""
    strategy = trainer.strategy
    if type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()


class InterruptCheckpoint(Callback):
    """Save `<dirpath>/<filename>.ckpt` when fit stops on an exception or a signal, once this run has stepped.

    The evolution callback stops at an evolution-step boundary, so the file is
    a consistent state that `ckpt_path=` resumes exactly. The message (on
    rank zero, through Lightning's log) names the file to resume from, or says
    that nothing was saved because this run had not made a step. After a rank
    stopped responding (`RankTimeoutError`), rank zero writes the file without
    the barrier that would wait for the lost rank.
    """

    def __init__(self, dirpath: str | os.PathLike, filename: str = "interrupted") -> None:
        self.path = Path(dirpath) / f"{filename}.ckpt"
        self._start_step: int | None = None
        self.saved: Path | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start_step = trainer.global_step

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        cause = (
            f"Stopped by {signal.Signals(exception.signum).name}" if isinstance(exception, SignalStop)
            else f"Failed ({type(exception).__name__})"
        )
        if self._start_step is None or trainer.global_step <= self._start_step:
            rank_zero_info(f"{cause} before this run's first training step: no interrupt checkpoint written")
            return
        if is_disk_full(exception):  # another write would fail too: name the newest whole checkpoint instead
            rank_zero_info(disk_full_message(self.path.parent))
            return
        if isinstance(exception, RankTimeoutError):
            if trainer.is_global_zero:
                checkpoint = trainer._checkpoint_connector.dump_checkpoint()  # what save_checkpoint writes
                trainer.strategy.checkpoint_io.save_checkpoint(checkpoint, self.path)
        else:
            trainer.save_checkpoint(self.path, weights_only=False)
        self.saved = self.path
        rank_zero_info(f"{cause} after training step {trainer.global_step}: resume with ckpt_path={self.path}")
