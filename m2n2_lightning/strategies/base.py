"""The ask/tell protocol every strategy speaks.

    candidates = strategy.ask(k)          # [k, D] on the strategy's device
    strategy.tell(candidates, scores)     # scores [k, N], per-example, in [0, 1]

A strategy is an `nn.Module`: its population lives in buffers, so `.to(device)`
moves it and `state_dict()` (hence Lightning's checkpoints) carries it. Its one
`torch.Generator` and its counters travel in the module's extra state, so a
strategy restored from a `state_dict()` continues exactly where it stopped.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn


def describe_bad_scores(scores: Tensor) -> str:
    """The error message for scores [k, N] that hold NaN or values outside [0, 1]."""
    nan = torch.isnan(scores)
    if nan.any():
        rows = nan.any(dim=1).nonzero().flatten().tolist()
        return f"scores contain NaN (candidates {rows}); check the model and the score function"
    return f"scores must lie in [0, 1], got values in [{scores.min().item()}, {scores.max().item()}]"


class Strategy(nn.Module):
    """Base class: seeded generator, counters, checked tell(), state round-trip.

    Subclasses implement `setup`, `ask`, `_tell`, `best_params` and keep their
    population in buffers registered at construction (resized on load).
    """

    #: Buffers whose shape is only known after setup/first tell; loading resizes them.
    resizable_buffers: tuple[str, ...] = ()

    def __init__(self, seed: int = 0, validate_scores: bool = True) -> None:
        super().__init__()
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self.seed = seed
        self.validate_scores = validate_scores
        self.num_params: int | None = None
        self.num_resources: int | None = None
        self.forward_passes = 0
        self._generator: torch.Generator | None = None
        self._pending_rng: tuple[Tensor, str] | None = None

    # ----------------------------------------------------------------- protocol
    def setup(self, num_params: int) -> None:
        """Fix the dimension D of the search space (allocates the population)."""
        raise NotImplementedError

    def ask(self, k: int | None = None) -> Tensor:
        """Propose candidates [k, D] to be scored."""
        raise NotImplementedError

    def tell(self, candidates: Tensor, scores: Tensor) -> None:
        """Report per-example scores [k, N] of `candidates` [k, D] (checked first)."""
        self.check_told(candidates, scores)
        self._tell(candidates, scores)

    def _tell(self, candidates: Tensor, scores: Tensor) -> None:
        raise NotImplementedError

    def best_params(self) -> Tensor:
        """The flat parameters [D] of the strategy's current best solution."""
        raise NotImplementedError

    @property
    def candidates_per_step(self) -> int:
        """How many candidates `ask()` returns by default (sets steps per budget)."""
        raise NotImplementedError

    def population(self) -> tuple[Tensor, Tensor]:
        """Scores [P, N] and fitness [P] of the current population, for metrics."""
        raise NotImplementedError

    @property
    def initialized(self) -> bool:
        """Whether the population is ready for `ask` to make children."""
        return True

    # ------------------------------------------------------------------ helpers
    @property
    def device(self) -> torch.device:
        return next(self.buffers()).device

    @property
    def generator(self) -> torch.Generator:
        """The strategy's one random generator, on the population's device."""
        if self._generator is None or self._generator.device.type != self.device.type:
            self._generator = self._make_generator()
        return self._generator

    def _make_generator(self) -> torch.Generator:
        generator = torch.Generator(device=self.device)
        if self._pending_rng is None:
            generator.manual_seed(self.seed)
            return generator
        state, device_type = self._pending_rng
        self._pending_rng = None
        if device_type == self.device.type:
            generator.set_state(state)
        else:
            # Generator states do not transfer between device types: re-seed from it.
            warnings.warn(
                f"restoring a {device_type} random state on {self.device.type}: the random "
                "stream is re-seeded deterministically from it, so the run will not match "
                f"one that stayed on {device_type}.",
                stacklevel=3,
            )
            generator.manual_seed(int.from_bytes(bytes(state[:8].tolist()), "little") ^ self.seed)
        return generator

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> "Strategy":
        old = self._generator
        super()._apply(fn, *args, **kwargs)
        if old is not None and old.device.type != self.device.type:
            self._pending_rng = (old.get_state(), old.device.type)
            self._generator = None
        return self

    def claim_num_params(self, num_params: int) -> bool:
        """Check D; True when it is new (allocate then), False when already set to it."""
        self.check_positive_int("num_params", num_params, 1)
        if self.num_params == num_params:
            return False
        if self.num_params is not None:
            raise ValueError(f"strategy already set up for D = {self.num_params}, not {num_params}")
        return True

    def require_setup(self) -> int:
        if self.num_params is None:
            raise RuntimeError(
                f"{type(self).__name__} does not know the number of parameters yet: pass "
                "num_params=... or call setup(num_params) before ask()."
            )
        return self.num_params

    @staticmethod
    def check_positive_int(name: str, value: Any, minimum: int) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
        return value

    @staticmethod
    def check_non_negative(name: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or value == float("inf"):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        return float(value)

    def check_told(self, candidates: Tensor, scores: Tensor) -> None:
        """ValueError before any state changes if a tell() is malformed."""
        dim = self.require_setup()
        if candidates.dim() != 2 or candidates.shape[1] != dim:
            raise ValueError(f"candidates must have shape [k, {dim}], got {tuple(candidates.shape)}")
        k = candidates.shape[0]
        if scores.dim() != 2 or scores.shape[0] != k:
            raise ValueError(f"scores must have shape [k={k}, N], got {tuple(scores.shape)}")
        if self.num_resources is not None and scores.shape[1] != self.num_resources:
            raise ValueError(
                f"scores must cover the same N = {self.num_resources} examples as before, "
                f"got {scores.shape[1]}"
            )
        if scores.shape[1] == 0:
            raise ValueError("scores must cover at least one example (N >= 1)")
        if self.validate_scores:
            # One fused reduction and one read back; min and max are NaN when any score is.
            low, high = torch.stack(torch.aminmax(scores)).tolist()
            if not (0 <= low and high <= 1):
                raise ValueError(describe_bad_scores(scores))

    # -------------------------------------------------------------------- state
    def get_extra_state(self) -> dict[str, Any]:
        generator = self.generator
        return {
            "rng_state": generator.get_state(),
            "rng_device": generator.device.type,
            "seed": self.seed,
            "num_params": self.num_params,
            "num_resources": self.num_resources,
            "forward_passes": self.forward_passes,
            **self.extra_state(),
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.seed = state["seed"]
        self.num_params = state["num_params"]
        self.num_resources = state["num_resources"]
        self.forward_passes = state["forward_passes"]
        self._pending_rng = (state["rng_state"].cpu(), state["rng_device"])
        self._generator = None
        self.load_extra_state(state)

    def extra_state(self) -> dict[str, Any]:
        """Subclass state beyond buffers (plain Python values)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what `extra_state` returned."""

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # Buffers allocated lazily have their size only after setup: take the saved size.
        for name in self.resizable_buffers:
            saved = state_dict.get(prefix + name)
            current = getattr(self, name)
            if saved is not None and saved.shape != current.shape:
                setattr(self, name, torch.empty(saved.shape, dtype=current.dtype, device=current.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
