"""The ask/tell protocol every strategy speaks.

    strategy = M2N2Strategy(num_params=D, seed=0)   # D is fixed here, at construction
    strategy.start(score)                           # the initial members, scored by score(children) -> [m, N]
    children = strategy.ask(k)                      # the k children it made (`Children`: .dense() is [k, D])
    strategy.tell(children, scores)                 # their scores [k, N], per-example, in [0, 1]

`tell` takes back the handle `ask` returned, so a storage that keeps members
in another form (mixtures of the seeds) stores each child by handle; the
counters (forward passes, N) are kept here, once, for every strategy.

A strategy is an `nn.Module`: its population lives in buffers, so `.to(device)`
moves it and `state_dict()` (hence Lightning's checkpoints) carries it. Its one
`torch.Generator` and its counters travel in the module's extra state, so a
strategy restored from a `state_dict()` continues exactly where it stopped.

The Lightning entry points take either a built strategy or a factory that they
call with `num_params=D` (and `init_models=[...]` when merging), e.g.
`functools.partial(M2N2Strategy, pop_size=20)` or a Hydra config with
`_partial_: true`; `build_strategy` is that one place.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from m2n2_lightning.strategies.children import Children

from m2n2_lightning.checks import check_positive_int

#: What scores candidates for `Strategy.start`: children -> scores [m, N].
ScoreCandidates = Callable[[Children], Tensor]


@contextlib.contextmanager
def rolled_back_on_error(generator: torch.Generator) -> Iterator[None]:
    """Restore `generator`'s state if the block raises (a failed start, an interrupted step)."""
    state = generator.get_state()
    try:
        yield
    except BaseException:
        generator.set_state(state)
        raise


def describe_bad_scores(scores: Tensor) -> str:
    """The error message for scores [k, N] that hold NaN or values outside [0, 1]."""
    nan = torch.isnan(scores)
    if nan.any():
        rows = nan.any(dim=1).nonzero().flatten().tolist()
        return f"scores contain NaN (candidates {rows}); check the model and the score function"
    return f"scores must lie in [0, 1], got values in [{scores.min().item()}, {scores.max().item()}]"


class Strategy(nn.Module):
    """Base class: D fixed at construction, seeded generator, counters, checked tell(), state round-trip.

    Subclasses implement `_start`, `ask`, `_tell`, `best_params`, `population`
    and `candidates_per_step` (and `best_children` / `best_token` where the best
    member has a cheaper form). `start` is the one place where the initial
    members are made and scored; `num_resources` (N) is fixed there.
    """

    def __init__(self, num_params: int, seed: int = 0, validate_scores: bool = True) -> None:
        super().__init__()
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"seed must be an int, got {seed!r}")
        if not isinstance(validate_scores, bool):
            raise ValueError(f"validate_scores must be True or False, got {validate_scores!r}")
        self.num_params = check_positive_int("num_params (D)", num_params, 1)
        self.seed = seed
        self.validate_scores = validate_scores
        self.num_resources: int | None = None
        self.forward_passes = 0
        self.started = False
        self._generator: torch.Generator | None = None
        self._pending_rng: tuple[Tensor, str] | None = None

    # ----------------------------------------------------------------- protocol
    @torch.no_grad()
    def start(self, score: ScoreCandidates) -> None:
        """Make the initial members, score them with `score` and insert them (not counted as forward passes)."""
        if self.started:
            raise RuntimeError(f"{type(self).__name__} has already started")
        with rolled_back_on_error(self.generator):  # a failed start (bad scores) leaves the strategy as it was
            self._start(score)
        self.started = True

    def _start(self, score: ScoreCandidates) -> None:
        raise NotImplementedError

    def ask(self, k: int | None = None) -> Children:
        """Propose k children to be scored."""
        raise NotImplementedError

    def tell(self, children: Children | Tensor, scores: Tensor) -> None:
        """Report per-example scores [k, N] of the `children` of the last ask (checked first); counts them."""
        children = Children.of(children)
        self.check_told(children, scores)
        self._tell(children, scores)
        self.num_resources = scores.shape[1]
        self.forward_passes += len(children)

    def _tell(self, children: Children, scores: Tensor) -> None:
        raise NotImplementedError

    def best_params(self) -> Tensor:
        """The flat parameters [D] of the strategy's current best solution."""
        raise NotImplementedError

    def best_children(self) -> Children:
        """The best solution as one child (what is loaded into a module: `Children.load_into(0, ...)`)."""
        return Children(values=self.best_params().unsqueeze(0))

    def best_token(self) -> Any:
        """A value that changes whenever the best solution may have changed (None: always assume it did)."""
        return None

    @property
    def candidates_per_step(self) -> int:
        """How many candidates `ask()` returns by default (sets steps per budget)."""
        raise NotImplementedError

    def population(self) -> tuple[Tensor, Tensor]:
        """Scores [P, N] and fitness [P] of the current population, for metrics."""
        raise NotImplementedError

    def settings(self) -> dict[str, Any]:
        """The constructor settings that shape the run (for hyperparameters and resume checks)."""
        return {"seed": self.seed, "num_params": self.num_params}

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

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> Strategy:
        old = self._generator
        super()._apply(fn, *args, **kwargs)
        if old is not None and old.device.type != self.device.type:
            self._pending_rng = (old.get_state(), old.device.type)
            self._generator = None
        return self

    def check_k(self, k: int | None) -> int:
        """The number of candidates to ask for: `candidates_per_step` when None (after `start`)."""
        if not self.started:
            raise RuntimeError(f"{type(self).__name__} has not started: call start(score) before ask()")
        return self.candidates_per_step if k is None else check_positive_int("k", k, 1)

    def check_told(self, children: Children, scores: Tensor) -> None:
        """ValueError before any state changes if a tell() is malformed."""
        if not self.started:
            raise RuntimeError(f"{type(self).__name__} has not started: call start(score) before tell()")
        dim = self.num_params
        if children.num_params != dim:
            raise ValueError(f"candidates must have D = {dim} parameters, got {children.num_params}")
        k = len(children)
        if scores.dim() != 2 or scores.shape[0] != k:
            raise ValueError(f"scores must have shape [k={k}, N], got {tuple(scores.shape)}")
        if self.num_resources is not None and scores.shape[1] != self.num_resources:
            raise ValueError(
                f"scores must cover the same N = {self.num_resources} examples as before, got {scores.shape[1]}"
            )
        self.check_scores(scores)

    def check_scores(self, scores: Tensor) -> None:
        """ValueError unless `scores` [k, N] cover N >= 1 examples, in [0, 1] (one host sync)."""
        if scores.dim() != 2 or scores.shape[1] == 0:
            raise ValueError(f"scores must have shape [k, N] with N >= 1, got {tuple(scores.shape)}")
        if self.validate_scores:
            # One fused reduction and one read back; min and max are NaN when any score is.
            low, high = torch.stack(torch.aminmax(scores)).tolist()
            if not (0 <= low and high <= 1):
                raise ValueError(describe_bad_scores(scores))

    # -------------------------------------------------------------------- state
    def get_extra_state(self) -> dict[str, Any]:
        generator = self.generator
        return {
            "strategy": type(self).__name__,
            "rng_state": generator.get_state(),
            "rng_device": generator.device.type,
            "seed": self.seed,
            "num_params": self.num_params,
            "num_resources": self.num_resources,
            "forward_passes": self.forward_passes,
            "started": self.started,
            **self.extra_state(),
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if state.get("num_params") != self.num_params:
            raise ValueError(f"the saved strategy has D = {state.get('num_params')}, this one D = {self.num_params}")
        self.seed = state["seed"]
        self.num_resources = state["num_resources"]
        self.forward_passes = state["forward_passes"]
        self.started = state["started"]
        self._pending_rng = (state["rng_state"].cpu(), state["rng_device"])
        self._generator = None
        self.load_extra_state(state)

    def extra_state(self) -> dict[str, Any]:
        """Subclass state beyond buffers (plain Python values)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what `extra_state` returned."""


#: What the Lightning entry points accept as a strategy: a built one or a factory of one.
StrategySpec = Strategy | Callable[..., Strategy]


def build_strategy(
    spec: StrategySpec,
    num_params: int,
    init_models: Sequence[Tensor] | None = None,
    layout: Sequence[tuple[str, int]] | None = None,
) -> Strategy:
    """The strategy for a model of D = `num_params`: `spec` itself, or `spec(num_params=D[, init_models=...])`.

    A factory whose strategy takes a `layout` (the parameter names and sizes,
    for chromosome patterns) also receives `layout`. A built strategy must
    already have that D, and cannot receive seed models (they are constructor
    arguments): pass a factory then.
    """
    if isinstance(spec, Strategy):
        if spec.num_params != num_params:
            raise ValueError(
                f"{type(spec).__name__} was built for D = {spec.num_params} parameters, but the model has "
                f"{num_params}; build it with num_params={num_params}, or pass a factory such as "
                f"functools.partial({type(spec).__name__}, ...)"
            )
        if init_models is not None:
            raise ValueError(
                f"init_from gives seed models, which a built {type(spec).__name__} cannot receive: pass a factory "
                f"instead, e.g. strategy=functools.partial({type(spec).__name__}, ...), which is called with "
                "num_params=D and init_models=[...]"
            )
        return spec
    if not callable(spec):
        raise ValueError(f"strategy must be a Strategy or a factory returning one, got {spec!r}")
    if init_models is not None and not isinstance(init_models, list) and not hasattr(init_models, "segment"):
        init_models = list(init_models)  # a list (a `SeedVectors` keeps its stack; seeds in files stay as they are)
    extra: dict[str, Any] = {} if init_models is None else {"init_models": init_models}
    if layout is not None and "layout" in inspect.signature(spec).parameters:
        extra.setdefault("layout", list(layout))
    strategy = spec(num_params=num_params, **extra)
    if not isinstance(strategy, Strategy):
        raise ValueError(f"the strategy factory {spec!r} returned {type(strategy).__name__}, not a Strategy")
    return strategy
