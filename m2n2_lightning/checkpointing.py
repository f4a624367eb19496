"""Checkpoints that are never lost, never run code, and never resume something other than what was asked.

- `AtomicCheckpointIO`: Lightning's checkpoint IO, but every file is written
  beside its target and renamed over it (a kill at any moment leaves the
  previous good checkpoint, and no stray temporary file elsewhere), and every
  load passes `weights_only=True` (a crafted pickle cannot run code).
- `InterruptCheckpoint`: the checkpoint written when a run stops on a signal
  or an exception, only once this run has made an evolution step (a failure
  before that leaves nothing that could be mistaken for progress).
- `run_fingerprint` / `resume_differences`: what a checkpoint was made with
  (strategy class and settings, parameter layout, a hash of the resources),
  compared on resume.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback
from torch import Tensor


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to a temporary file in the target's directory, fsync, rename; load with `weights_only=True`."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
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


def load_checkpoint_file(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """A Lightning checkpoint loaded with `weights_only=True`, or a ValueError saying why it is not usable."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise ValueError(f"checkpoint {path} is empty (0 bytes): it is not a usable checkpoint; resume from another one")
    try:
        content = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"checkpoint {path} holds objects that torch.load(weights_only=True) refuses to load (it could run "
            f"code), so it is not loaded: {err}"
        ) from err
    except (EOFError, RuntimeError, OSError, ValueError) as err:
        raise ValueError(
            f"checkpoint {path} is not a usable checkpoint (truncated, corrupted or not a torch file): {err}"
        ) from err
    if not isinstance(content, dict) or "state_dict" not in content:
        raise ValueError(f"{path} is not a Lightning checkpoint (no 'state_dict' entry)")
    return content


def use_atomic_checkpoints(trainer: L.Trainer) -> None:
    """Give the trainer `AtomicCheckpointIO` where it has Lightning's default checkpoint IO."""
    strategy = trainer.strategy
    if type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()


class InterruptCheckpoint(Callback):
    """Save `<dirpath>/<filename>.ckpt` when fit stops on an exception or a signal, once this run has stepped.

    The evolution callback stops at an evolution-step boundary, so the file is
    a consistent state that `ckpt_path=` resumes exactly.
    """

    def __init__(self, dirpath: str | os.PathLike, filename: str = "interrupted") -> None:
        self.path = Path(dirpath) / f"{filename}.ckpt"
        self._start_step: int | None = None
        self.saved: Path | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start_step = trainer.global_step

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if self._start_step is None or trainer.global_step <= self._start_step:
            return
        trainer.save_checkpoint(self.path)
        self.saved = self.path


def resource_hash(inputs: Tensor | Mapping[str, Tensor], targets: Tensor) -> str:
    """SHA-256 of the resources' shapes, dtypes and bytes (what a resumed run must score on)."""
    digest = hashlib.sha256()
    for tensor in [*(inputs.values() if isinstance(inputs, Mapping) else [inputs]), targets]:
        data = tensor.detach().contiguous().cpu()
        digest.update(f"{tuple(data.shape)}{data.dtype}".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def resume_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The entries of two fingerprints that differ, as 'key: saved -> current' lines."""
    keys = sorted(set(saved) | set(current))
    return [f"{key}: {saved.get(key)!r} in the checkpoint, {current.get(key)!r} now" for key in keys if saved.get(key) != current.get(key)]


#: The message for a resume on other resources.
RESOURCES_CHANGED = (
    "the checkpoint was made on other resources (their content hash differs: other data, split, normalisation "
    "or order); resume with the same data, or pass allow_resume_changes=True (train.py: "
    "allow_resume_changes=true) to continue anyway"
)


def run_fingerprint(engine: Any) -> dict[str, Any]:
    """What a run is: the strategy's class and settings and the parameter layout (compared on resume)."""
    strategy = engine.strategy
    layout = hashlib.sha256(repr(engine.flat.layout).encode()).hexdigest()[:16]
    return {"strategy": type(strategy).__name__, **strategy.settings(), "parameter_layout": layout}


def evolution_state(engine: Any, resources: str | None) -> dict[str, Any]:
    """The callback's checkpoint state: the strategy's state_dict, the run's fingerprint, the resources' hash."""
    return {"strategy": engine.strategy.state_dict(), "run": run_fingerprint(engine), "resources": resources}


def restore_evolution_state(engine: Any, state: dict[str, Any], allow_changes: bool) -> str | None:
    """Load `evolution_state` into the engine's strategy after comparing fingerprints (ValueError naming
    every difference unless `allow_changes`); returns the saved resources hash, checked once they are known."""
    if set(state) != {"strategy", "run", "resources"}:
        raise ValueError("the checkpoint's evolution state was not written by this version of M2N2Callback")
    differences = resume_differences(state["run"], run_fingerprint(engine))
    if differences and not allow_changes:
        raise ValueError(
            "the checkpoint was made with other settings than this run asks for:\n  " + "\n  ".join(differences)
            + "\nUse the checkpoint's settings, or pass allow_resume_changes=True (train.py: "
            "allow_resume_changes=true) to continue anyway with the checkpoint's evolutionary state."
        )
    try:
        engine.strategy.load_state_dict(state["strategy"])
    except (KeyError, RuntimeError, ValueError) as err:
        raise ValueError(f"the checkpoint's strategy state does not fit {type(engine.strategy).__name__}: {err}") from err
    return state["resources"]
