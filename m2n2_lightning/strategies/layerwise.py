"""CMA-ES over per-layer mixing coefficients of seed models: the common part of the layerwise baselines.

The paper's LLM baseline (section 4.2) is a CMA-ES (population 25) over a few
coefficients per parameter group g (a transformer layer, or whatever `groups`
names) that say how the seeds are mixed on that group. A subclass names the
coefficients of a group (`coefficient_shape`) and maps them to weights over the
K seeds (`mixing_weights`); this class holds the seeds, the groups, the inner
`CMAESStrategy` and the state, and turns weights into children: forms over the
seeds (`mixture.py`) with one coefficient row per group, written straight into
a model when scored, in the seeds' dtype.

- `LayerwiseSlerpStrategy`: two seeds, one SLERP coefficient per group;
- `LayerwiseSimplexStrategy`: K seeds, K - 1 coordinates per group mapped onto
  the simplex (the group's child is a weighted average of the seeds').
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.nn.modules.module import _EXTRA_STATE_KEY_SUFFIX

from m2n2_lightning.checks import check_positive_int
from m2n2_lightning.params import flat_vector
from m2n2_lightning.strategies import cmaes_parameters as cp
from m2n2_lightning.strategies.base import ScoreCandidates, Strategy
from m2n2_lightning.strategies.children import Children
from m2n2_lightning.strategies.cmaes import CMAESStrategy
from m2n2_lightning.strategies.layer_groups import (
    group_gram,
    group_parameters,
    segments_of,
)
from m2n2_lightning.strategies.mixture import Form, SeedVectors, merge_equal_rows

#: Relative difference of the seeds' per-group Gram entries above which a resume is refused.
SEED_TOLERANCE = 1e-6


class LayerwiseStrategy(Strategy):
    """CMA-ES (the library's `CMAESStrategy`, float64) over the coefficients [G, ...] of G parameter groups.

    Subclasses set `coefficient_shape`, `mixing_weights`, `_start_mean` and
    `_count_error`, and may bound the coefficients in `_bounded`. Fitness is
    CMA-ES's: the mean told score over the N resources. `ask` returns popsize
    children in the first seed's dtype; `tell` takes them with their scores, in
    the order asked. The state holds the inner CMA-ES and the seeds' per-group
    Gram entries (`group_gram`), not the seeds: a restored strategy is built
    with the same seeds, and loading checks them against the saved Gram entries
    (and keeps the saved ones, for exactness).
    """

    def __init__(
        self,
        num_params: int,
        init_models: Any,
        layout: Sequence[tuple[str, int]] | None,
        groups: str | Sequence[str],
        popsize: int,
        sigma0: float,
        x0: Any,
        seed: int,
        validate_scores: bool,
    ) -> None:
        super().__init__(num_params, seed=seed, validate_scores=validate_scores)
        check_positive_int("popsize", popsize, 2)  # the inner CMA-ES checks them too; here before the O(D) work
        cp.check_positive("sigma0", sigma0)
        seeds = self._check_seeds(init_models)
        name = type(self).__name__
        if layout is None:
            raise ValueError(
                f"{name} needs layout, the (name, numel) of the parameters in vector order, to find "
                "its groups: M2N2Callback / build_strategy pass it, or pass layout=FlatParams(model).layout"
            )
        layout = [(param, int(numel)) for param, numel in layout]
        if sum(numel for _, numel in layout) != self.num_params:
            raise ValueError(f"layout covers {sum(n for _, n in layout)} parameters, but D = {self.num_params}")
        self.group_names, owner = group_parameters(layout, groups)
        self.groups = groups if isinstance(groups, str) else list(self.group_names)
        self.segments = segments_of(layout, owner)
        self.num_seeds = len(seeds)
        self.x0 = self._check_x0(x0)
        self.register_buffer("seeds", seeds.stack(seeds[0].dtype, seeds[0].device), persistent=False)
        self.register_buffer("gram", group_gram(list(self.seeds), self.segments, self.num_groups))
        if not torch.isfinite(self.gram).all():
            raise ValueError("the seeds hold non-finite values (inf or NaN); check the seed models")
        start = self._start_mean().reshape(-1)
        self.search = CMAESStrategy(
            len(start), popsize=popsize, sigma0=sigma0, x0=start, dtype=torch.float64,
            candidate_dtype=torch.float64, seed=seed, validate_scores=validate_scores,
        )  # fmt: skip
        self._asked: Tensor | None = None  # the flat coefficients [k, G * c] of the last ask, until told

    # ------------------------------------------------------------ subclass hooks
    @property
    def coefficient_shape(self) -> tuple[int, ...]:
        """The shape of one candidate's coefficients: (G,) or (G, c)."""
        raise NotImplementedError

    def mixing_weights(self, coefficients: Tensor) -> Tensor:
        """Weights [k, G, K] float64 on the host over the K seeds, for coefficients [k, *coefficient_shape]."""
        raise NotImplementedError

    def _check_x0(self, x0: Any) -> Any:
        """x0 checked (the value `settings` shows)."""
        raise NotImplementedError

    def _start_mean(self) -> Tensor:
        """The inner CMA-ES's initial mean, float64 [*coefficient_shape], from `self.x0`."""
        raise NotImplementedError

    def _count_error(self, count: int | None) -> str | None:
        """The error for `count` seeds (None: they did not come as a list), or None where the count is fine."""
        raise NotImplementedError

    def _bounded(self, coefficients: Tensor) -> Tensor:
        """The coefficients as the merge uses them (a subclass that clips, clips here)."""
        return coefficients

    # ------------------------------------------------------------------ checks
    def _check_seeds(self, init_models: Any) -> SeedVectors:
        if hasattr(init_models, "segment"):  # seeds left in their files: this strategy mixes them in memory
            init_models = SeedVectors(list(init_models), digests=init_models.digests)
        if isinstance(init_models, Tensor):  # one [K, D] tensor holds K seeds; a [D] one is a single seed
            init_models = list(init_models) if init_models.dim() == 2 else [init_models]
        if not isinstance(init_models, Sequence):
            raise ValueError(self._count_error(None))
        seeds = [flat_vector(model) for model in init_models]
        stacked = getattr(init_models, "stacked", None)
        message = self._count_error(len(seeds))
        if message is not None:
            raise ValueError(message)
        for i, seed_vector in enumerate(seeds):
            if seed_vector.numel() != self.num_params or not seed_vector.is_floating_point():
                raise ValueError(
                    f"init_models[{i}] has {seed_vector.numel()} {seed_vector.dtype} values, but the model has "
                    f"D = {self.num_params} floating-point parameters"
                )
        vectors = [seeds[0]] + [vector.to(seeds[0]) for vector in seeds[1:]]
        return SeedVectors(vectors, stacked, getattr(init_models, "digests", None))

    # ----------------------------------------------------------------- protocol
    @property
    def generator(self) -> torch.Generator:
        """The inner CMA-ES's generator: the strategy's one (what a rolled-back step restores)."""
        return self.search.generator

    @property
    def num_groups(self) -> int:
        return len(self.group_names)

    def _start(self, score: ScoreCandidates) -> None:
        """Start the inner CMA-ES at x0 (nothing is scored, as CMAESStrategy)."""
        self.search.start(score)

    @torch.no_grad()
    def ask(self, k: int | None = None) -> Children:
        """One generation of coefficients from CMA-ES, as merges of the seeds (forms, written when scored)."""
        self._asked = self.search.ask(self.check_k(k)).dense()
        return self.merge(self._asked.view(-1, *self.coefficient_shape))

    def check_told(self, children: Children, scores: Tensor) -> None:
        """The base checks, and the children of the last ask (one per coefficient vector asked)."""
        super().check_told(children, scores)
        if self._asked is None:
            raise RuntimeError("tell() takes the candidates of the last ask(), but nothing was asked since the last tell")
        if len(children) != len(self._asked):
            raise ValueError(f"tell() takes the {len(self._asked)} candidates of the last ask(), got {len(children)}")

    @torch.no_grad()
    def _tell(self, children: Children, scores: Tensor) -> None:
        """Tell CMA-ES the asked coefficients with the scores of their merges (it ranks by the mean score)."""
        self.search.tell(self._asked, scores)
        self._asked = None

    @torch.no_grad()
    def merge(self, coefficients: Tensor) -> Children:
        """The merges of coefficients [k, *coefficient_shape] as forms over the seeds: on group g's segments the
        weights `mixing_weights` gives group g."""
        if coefficients.dim() != 1 + len(self.coefficient_shape) or coefficients.shape[1:] != self.coefficient_shape:
            shape = ", ".join(map(str, self.coefficient_shape))
            raise ValueError(f"coefficients must have shape [k, {shape}], got {tuple(coefficients.shape)}")
        weights = self.mixing_weights(coefficients)  # [k, G, K]
        groups = torch.tensor([group for _, _, group in self.segments])
        cuts = torch.tensor([start for start, _, _ in self.segments[1:]], dtype=torch.long)
        forms = [merge_equal_rows(cuts, row[groups]) for row in weights]
        return Children(forms=forms, seeds=self.seeds, owner=self)

    def best_coefficients(self) -> Tensor:
        """CMA-ES's best told coefficients [*coefficient_shape] (its mean before any tell), as the merge uses them."""
        if not self.started:
            raise RuntimeError(f"{type(self).__name__} has not started: call start(score) first")
        return self._bounded(self.search.best_params().view(self.coefficient_shape))

    def best_params(self) -> Tensor:
        """The merged model [D] of `best_coefficients`."""
        return self.best_children().dense()[0]

    def best_children(self) -> Children:
        return self.merge(self.best_coefficients()[None])

    def best_token(self) -> tuple[float, ...]:
        """The best coefficients themselves: the merge changes exactly when they do."""
        return tuple(self.best_coefficients().flatten().tolist())

    def best_form(self) -> Form:
        """The best merge's form over the seeds (a merge's recipe)."""
        return self.best_children().forms[0]

    @property
    def candidates_per_step(self) -> int:
        return self.search.popsize

    def population(self) -> tuple[Tensor, Tensor]:
        """CMA-ES's: the last generation's scores [popsize, N] and mean scores (empty before a tell)."""
        return self.search.population()

    def settings(self) -> dict[str, Any]:
        """The base's, popsize, sigma0, x0, the groups asked for and how many they made."""
        return {**super().settings(), "popsize": self.search.popsize, "sigma0": self.search.sigma0, "x0": self.x0,
                "groups": self.groups, "num_groups": self.num_groups}  # fmt: skip

    # -------------------------------------------------------------------- state
    def extra_state(self) -> dict[str, Any]:
        return {"popsize": self.search.popsize, "group_names": self.group_names}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self._asked = None

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # Before any state changes: the same kind of strategy, groups and seeds, or a ValueError naming what differs.
        expected = {"strategy": type(self).__name__, "num_params": self.num_params, **self.extra_state()}
        cp.check_saved_settings(state_dict.get(prefix + _EXTRA_STATE_KEY_SUFFIX), expected)
        saved = state_dict.get(prefix + "gram")
        if isinstance(saved, Tensor) and saved.shape == self.gram.shape:
            saved = saved.to(self.gram)
            if not torch.allclose(saved, self.gram, rtol=SEED_TOLERANCE, atol=0):
                raise ValueError(
                    f"the seeds given (init_models) are not those the saved {type(self).__name__} was run with (their "
                    f"per-group norms and inner products differ); build it with the run's {self.num_seeds} seed "
                    "models, in order"
                )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={value}" for name, value in self.settings().items())

