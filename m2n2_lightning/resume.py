"""The evolution callback's checkpoint state, and the checks that a resume continues what was asked for.

A checkpoint holds the strategy's state (archive, scores, generator,
counters), the run's fingerprint (strategy class and settings, a hash of the
parameter layout, the `evaluate` function's name) and a content hash of the
resources (tensors, or every example of an `evaluate` hook's dataset: prompts
and answers). A resume whose fingerprint or resources differ is refused before
any step, naming every difference, unless the user passes
`allow_resume_changes=True`; a checkpoint without evolution state (a plain
Lightning checkpoint) is refused too, since Lightning would skip the missing
state and restart evolution under a restored step count.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

#: The keys of the evolution callback's checkpoint state, and the entry Lightning keeps it under (its state_key).
STATE_KEYS = frozenset({"strategy", "run", "resources"})
CALLBACK_KEY = "M2N2Callback"


def resource_hash(inputs: Tensor | Mapping[str, Tensor], targets: Tensor) -> str:
    """SHA-256 of the resources' shapes, dtypes and bytes (what a resumed run must score on)."""
    digest = hashlib.sha256()
    for tensor in [*(inputs.values() if isinstance(inputs, Mapping) else [inputs]), targets]:
        data = tensor.detach().contiguous().cpu()
        digest.update(f"{tuple(data.shape)}{data.dtype}".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def dataset_hash(resources: Any) -> str:
    """SHA-256 of every example of a fixed-order dataset (or a DataLoader's), in order: what an `evaluate`
    hook scores on (prompts and answers, tensors, numbers), so that other or reordered examples differ."""
    dataset = resources.dataset if isinstance(resources, DataLoader) else resources
    digest = hashlib.sha256(f"{len(dataset)} examples".encode())
    for index in range(len(dataset)):
        _update(digest, dataset[index])
    return digest.hexdigest()


def _update(digest: Any, value: Any) -> None:
    """Feed one example's content to `digest`, recursively, with its type (never a memory address)."""
    digest.update(type(value).__name__.encode())
    if isinstance(value, Tensor):
        resource = value.detach().contiguous().cpu()
        digest.update(f"{tuple(resource.shape)}{resource.dtype}".encode())
        digest.update(resource.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, (str, bytes, int, float, bool, type(None))):
        digest.update(repr(value).encode())
    elif isinstance(value, Mapping):
        for key in value:
            _update(digest, key)
            _update(digest, value[key])
    elif isinstance(value, (list, tuple)):
        digest.update(str(len(value)).encode())
        for item in value:
            _update(digest, item)
    else:
        try:
            digest.update(pickle.dumps(value, protocol=4))
        except Exception:  # not picklable: its text, where that names no memory address
            digest.update(_without_addresses(repr(value)).encode())


def _without_addresses(text: str) -> str:
    return re.sub(r" at 0x[0-9a-fA-F]+", "", text)


def function_identity(function: Callable) -> str:
    """A name for a function that is the same in every process: `module.qualname`; a partial's function and
    arguments; a callable object's class (and its repr, where that names no memory address)."""
    if isinstance(function, functools.partial):
        arguments = [function_identity(a) if callable(a) else _without_addresses(repr(a)) for a in function.args]
        arguments += [
            f"{key}={function_identity(v) if callable(v) else _without_addresses(repr(v))}"
            for key, v in sorted(function.keywords.items())
        ]
        return f"functools.partial({function_identity(function.func)}, {', '.join(arguments)})"
    owner = getattr(function, "__self__", None)
    if owner is not None and not isinstance(owner, type(os)):  # a bound method: its class (or object's) and name
        return f"{function_identity(owner if isinstance(owner, type) else type(owner))}.{function.__name__}"
    if hasattr(function, "__qualname__"):
        return f"{getattr(function, '__module__', '')}.{function.__qualname__}"
    kind = type(function)
    text = repr(function)
    shown = "" if re.search(r"0x[0-9a-fA-F]{6,}", text) else f" {text}"
    return f"{kind.__module__}.{kind.__qualname__} object{shown}"


def check_evolution_state(checkpoint: Mapping[str, Any], path: str | os.PathLike) -> None:
    """ValueError, before any work, when a loaded Lightning checkpoint holds no evolution callback state."""
    state = (checkpoint.get("callbacks") or {}).get(CALLBACK_KEY)
    if not (isinstance(state, Mapping) and set(state) == STATE_KEYS):
        raise ValueError(
            f"checkpoint {path} holds no evolution state (no M2N2Callback entry with the strategy's archive): it "
            "is a plain Lightning checkpoint or one whose callback state was renamed. Resuming it would restart "
            "evolution from scratch under its step count; resume from a checkpoint of an evolution run "
            "(checkpoints/last.ckpt, interrupted.ckpt), or start a new run without ckpt_path"
        )


def resume_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The entries of two fingerprints that differ, as 'key: saved -> current' lines."""
    keys = sorted(set(saved) | set(current))
    return [f"{key}: {saved.get(key)!r} in the checkpoint, {current.get(key)!r} now" for key in keys if saved.get(key) != current.get(key)]


def run_fingerprint(engine: Any) -> dict[str, Any]:
    """What a run is: the strategy's class and settings and the parameter layout (compared on resume)."""
    strategy = engine.strategy
    layout = hashlib.sha256(repr(engine.flat.layout).encode()).hexdigest()[:16]
    seeds = getattr(engine, "seed_digests", None)  # every tensor of every seed, hashed as it was read
    return {"strategy": type(strategy).__name__, **strategy.settings(), "parameter_layout": layout,
            **({"seeds": seeds} if seeds else {})}


class ResumeRecord:
    """The callback's checkpoint state (strategy state, run fingerprint, resources hash) and a resume's checks.

    `load_state_dict` compares the checkpoint's fingerprint with this run's
    (Lightning restores callbacks after `setup`, before any step) and keeps
    the checkpoint's resources hash; `set_resources`, called once the
    resources are known, compares it with theirs. Either difference is a
    ValueError naming it, unless `allow_changes`.
    """

    def __init__(self, allow_changes: bool = False, evaluate: Callable | None = None) -> None:
        self.allow_changes = bool(allow_changes)
        #: The `evaluate` hook's stable name (part of the fingerprint), None for vectorised scoring.
        self.evaluate = None if evaluate is None else function_identity(evaluate)
        #: Whether a checkpoint's evolution state was loaded (Lightning skips a missing one silently).
        self.restored = False
        #: This run's resources: a content hash (or a description for the `evaluate` hook).
        self.resources: str | None = None
        self._saved_resources: str | None = None

    def set_resources(self, resources: str) -> None:
        """Record this run's resources; ValueError when a resumed checkpoint was made on others."""
        if self._saved_resources not in (None, resources) and not self.allow_changes:
            raise ValueError(
                "the checkpoint was made on other resources (their content hash differs: other examples, labels, "
                "prompts or answers, another split or normalisation, or the same examples in another order); resume "
                "with the same data, or pass allow_resume_changes=True (train.py: allow_resume_changes=true) to "
                "continue anyway"
            )
        self.resources = resources

    def check_restored(self, ckpt_path: str | os.PathLike | None) -> None:
        """ValueError when fit resumes `ckpt_path` but no evolution state was loaded from it."""
        if ckpt_path is not None and not self.restored:
            raise ValueError(
                f"checkpoint {ckpt_path} holds no evolution state (no M2N2Callback entry): Lightning would restore "
                "its step count and restart evolution from scratch. Resume from a checkpoint of an evolution run, "
                "or fit without ckpt_path"
            )

    def fingerprint(self, engine: Any) -> dict[str, Any]:
        """`run_fingerprint(engine)`, with the `evaluate` hook's name when there is one."""
        return run_fingerprint(engine) | ({"evaluate": self.evaluate} if self.evaluate else {})

    def state_dict(self, engine: Any) -> dict[str, Any]:
        """The strategy's state_dict, the run's fingerprint and the resources' hash."""
        return {"strategy": engine.strategy.state_dict(), "run": self.fingerprint(engine), "resources": self.resources}

    def load_state_dict(self, engine: Any, state: dict[str, Any]) -> None:
        """Load a `state_dict` into the engine's strategy after comparing fingerprints (a ValueError naming
        every difference unless `allow_changes`)."""
        if set(state) != STATE_KEYS:
            raise ValueError("the checkpoint's evolution state was not written by this version of M2N2Callback")
        differences = resume_differences(state["run"], self.fingerprint(engine))
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
        self.restored = True
