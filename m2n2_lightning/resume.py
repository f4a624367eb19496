"""The evolution callback's checkpoint state, and the checks that a resume continues what was asked for.

A checkpoint holds the strategy's state (archive, scores, generator,
counters), the run's fingerprint (strategy class and settings, a hash of the
parameter layout) and a content hash of the resources. A resume whose
fingerprint or resources differ is refused before any step, naming every
difference, unless the user passes `allow_resume_changes=True`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor


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


def run_fingerprint(engine: Any) -> dict[str, Any]:
    """What a run is: the strategy's class and settings and the parameter layout (compared on resume)."""
    strategy = engine.strategy
    layout = hashlib.sha256(repr(engine.flat.layout).encode()).hexdigest()[:16]
    return {"strategy": type(strategy).__name__, **strategy.settings(), "parameter_layout": layout}


class ResumeRecord:
    """The callback's checkpoint state (strategy state, run fingerprint, resources hash) and a resume's checks.

    `load_state_dict` compares the checkpoint's fingerprint with this run's
    (Lightning restores callbacks after `setup`, before any step) and keeps
    the checkpoint's resources hash; `set_resources`, called once the
    resources are known, compares it with theirs. Either difference is a
    ValueError naming it, unless `allow_changes`.
    """

    def __init__(self, allow_changes: bool = False) -> None:
        self.allow_changes = bool(allow_changes)
        #: This run's resources: a content hash (or a description for the `evaluate` hook).
        self.resources: str | None = None
        self._saved_resources: str | None = None

    def set_resources(self, resources: str) -> None:
        """Record this run's resources; ValueError when a resumed checkpoint was made on others."""
        if self._saved_resources not in (None, resources) and not self.allow_changes:
            raise ValueError(
                "the checkpoint was made on other resources (their content hash differs: other data, split, "
                "normalisation or order); resume with the same data, or pass allow_resume_changes=True (train.py: "
                "allow_resume_changes=true) to continue anyway"
            )
        self.resources = resources

    def state_dict(self, engine: Any) -> dict[str, Any]:
        """The strategy's state_dict, the run's fingerprint and the resources' hash."""
        return {"strategy": engine.strategy.state_dict(), "run": run_fingerprint(engine), "resources": self.resources}

    def load_state_dict(self, engine: Any, state: dict[str, Any]) -> None:
        """Load a `state_dict` into the engine's strategy after comparing fingerprints (a ValueError naming
        every difference unless `allow_changes`)."""
        if set(state) != {"strategy", "run", "resources"}:
            raise ValueError("the checkpoint's evolution state was not written by this version of M2N2Callback")
        differences = resume_differences(state["run"], run_fingerprint(engine))
        if differences and not self.allow_changes:
            raise ValueError(
                "the checkpoint was made with other settings than this run asks for:\n  " + "\n  ".join(differences)
                + "\nUse the checkpoint's settings, or pass allow_resume_changes=True (train.py: "
                "allow_resume_changes=true) to continue anyway with the checkpoint's evolutionary state."
            )
        try:
            engine.strategy.load_state_dict(state["strategy"])
        except (KeyError, RuntimeError, ValueError) as err:
            raise ValueError(
                f"the checkpoint's strategy state does not fit {type(engine.strategy).__name__}: {err}"
            ) from err
        self._saved_resources = state["resources"]
