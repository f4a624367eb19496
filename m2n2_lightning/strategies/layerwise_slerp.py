"""CMA-ES over one SLERP coefficient per layer between two seed models (the paper's LLM baseline).

Section 4.2 of the paper compares M2N2 with a CMA-ES (population 25) that tunes
one mixing coefficient per transformer layer of the two fine-tuned seeds, the
search of Akiba et al. and mergekit-evolve. The search space is G coefficients
t in R^G, one per parameter group g (a layer, or whatever `groups` names); a
coefficient vector stands for the model whose group g is the SLERP of the
seeds' sub-vectors a_g, b_g (docs/ALGORITHM.md's formula, with the angle of
the group: the paper's equation 2, a SLERP per sub-array):

    cos(Omega_g) = <a_g, b_g> / (|a_g| |b_g|),   u_g = clip(t_g, 0, 1)
    child_g = sin((1 - u_g) Omega_g) / sin(Omega_g) a_g + sin(u_g Omega_g) / sin(Omega_g) b_g

(the linear mix (1 - u_g) a_g + u_g b_g where sin(Omega_g) <= 1e-6). Bounding by
clipping: CMA-ES samples unbounded coefficients and a sample beyond a bound
scores as the bound itself (the seed's group), so the bounds themselves, where
merges often do best, are reached with no penalty term.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.module import _EXTRA_STATE_KEY_SUFFIX

from m2n2_lightning.params import flat_vector
from m2n2_lightning.strategies import cmaes_parameters as cp
from m2n2_lightning.strategies.base import ScoreCandidates, Strategy
from m2n2_lightning.checks import check_positive_int
from m2n2_lightning.strategies.cmaes import CMAESStrategy
from m2n2_lightning.strategies.layer_groups import (
    group_gram,
    group_parameters,
    segments_of,
)
from m2n2_lightning.strategies.children import Children
from m2n2_lightning.strategies.mixture import Form, SeedVectors, merge_equal_rows
from m2n2_lightning.strategies.operators import slerp_weights

#: Relative difference of the seeds' per-group Gram entries above which a resume is refused.
SEED_TOLERANCE = 1e-6


class LayerwiseSlerpStrategy(Strategy):
    """CMA-ES (the library's `CMAESStrategy`) over G per-group SLERP coefficients between two seeds.

    Args:
        num_params: D, the length of the flat parameter vector.
        init_models: exactly two seeds, modules or flat [D] tensors (a and b:
            coefficient 0 is a's group, 1 is b's). Held as given, not copied.
        layout: (name, numel) of the parameters in vector order
            (`FlatParams.layout`; `build_strategy` passes it).
        groups: "layers" (one coefficient per transformer layer, from names with
            `.layers.<i>.` or `.h.<i>.`, and one for the rest) or regex patterns,
            one group each, every parameter in exactly one.
        popsize: candidates per generation (the paper's 25).
        sigma0: initial step size, 0.2: a quarter of the range [0, 1], so that
            x0 +- 2 sigma0 spans most of it (pycma's advice: the optimum within
            x0 +- 3 sigma0), while a sample beyond a bound is clipped to it.
        x0: initial mean, one value for every group or G values in [0, 1];
            0.5 is the midpoint of the seeds, as far from one as from the other.
        seed: seed of the inner CMA-ES's generator (the strategy's one generator).
        validate_scores: check told scores for NaN and range.

    Fitness is CMA-ES's: the mean told score over the N resources. `ask`
    returns [popsize, D] candidates in seed a's dtype; `tell` takes them with
    their scores, in the order asked. `best_params` maps CMA-ES's best told
    coefficients (its mean before any tell), clipped. The state holds the inner
    CMA-ES and the seeds' per-group Gram entries [G, 3], not the seeds: a
    restored strategy is built with the same seeds, and loading checks them
    against the saved Gram entries (and keeps the saved ones, for exactness).
    """

    def __init__(
        self,
        num_params: int,
        init_models: Sequence[nn.Module | Tensor] | Tensor | None = None,
        layout: Sequence[tuple[str, int]] | None = None,
        groups: str | Sequence[str] = "layers",
        popsize: int = 25,
        sigma0: float = 0.2,
        x0: float | Sequence[float] | Tensor = 0.5,
        seed: int = 0,
        validate_scores: bool = True,
    ) -> None:
        super().__init__(num_params, seed=seed, validate_scores=validate_scores)
        check_positive_int("popsize", popsize, 2)  # the inner CMA-ES checks them too; here before the O(D) work
        cp.check_positive("sigma0", sigma0)
        seeds = self._check_seeds(init_models)
        if layout is None:
            raise ValueError(
                "LayerwiseSlerpStrategy needs layout, the (name, numel) of the parameters in vector order, to find "
                "its groups: M2N2Callback / build_strategy pass it, or pass layout=FlatParams(model).layout"
            )
        layout = [(name, int(numel)) for name, numel in layout]
        if sum(numel for _, numel in layout) != self.num_params:
            raise ValueError(f"layout covers {sum(n for _, n in layout)} parameters, but D = {self.num_params}")
        self.group_names, owner = group_parameters(layout, groups)
        self.groups = groups if isinstance(groups, str) else list(self.group_names)
        self.segments = segments_of(layout, owner)
        num_groups = len(self.group_names)
        self.x0 = self._check_x0(x0, num_groups)
        self.register_buffer("seeds", seeds.stack(seeds[0].dtype, seeds[0].device), persistent=False)
        self.register_buffer("gram", group_gram(self.seeds[0], self.seeds[1], self.segments, num_groups))
        if not torch.isfinite(self.gram).all():
            raise ValueError("the seeds hold non-finite values (inf or NaN); check the seed models")
        start = torch.tensor(self.x0, dtype=torch.float64).expand(num_groups).clone()
        self.search = CMAESStrategy(
            num_groups, popsize=popsize, sigma0=sigma0, x0=start, dtype=torch.float64,
            candidate_dtype=torch.float64, seed=seed, validate_scores=validate_scores,
        )  # fmt: skip
        self._asked: Tensor | None = None  # the coefficients [k, G] of the last ask, until told

    def _check_seeds(self, init_models: Any) -> SeedVectors:
        if hasattr(init_models, "segment"):  # seeds left in their files: this strategy mixes them in memory
            init_models = SeedVectors(list(init_models), digests=init_models.digests)
        if isinstance(init_models, Tensor):  # one [2, D] tensor holds two seeds; a [D] one is a single seed
            init_models = list(init_models) if init_models.dim() == 2 else [init_models]
        if not isinstance(init_models, Sequence):
            raise ValueError(
                "LayerwiseSlerpStrategy merges exactly two seed models: pass init_models=[a, b] (modules or flat "
                "[D] tensors; M2N2Callback(init_from=[a, b]) does)"
            )
        seeds = [flat_vector(model) for model in init_models]
        stacked = getattr(init_models, "stacked", None)
        if len(seeds) != 2:
            raise ValueError(
                f"LayerwiseSlerpStrategy interpolates between exactly two seed models, got {len(seeds)}; "
                "to merge more, use M2N2Strategy"
            )
        for i, seed_vector in enumerate(seeds):
            if seed_vector.numel() != self.num_params or not seed_vector.is_floating_point():
                raise ValueError(
                    f"init_models[{i}] has {seed_vector.numel()} {seed_vector.dtype} values, but the model has "
                    f"D = {self.num_params} floating-point parameters"
                )
        return SeedVectors([seeds[0], seeds[1].to(seeds[0])], stacked, getattr(init_models, "digests", None))

    @staticmethod
    def _check_x0(x0: Any, num_groups: int) -> float | list[float]:
        try:
            values = torch.as_tensor(list(x0) if isinstance(x0, Sequence) else x0, dtype=torch.float64).flatten()
        except (TypeError, ValueError, RuntimeError):
            values = None  # not numbers
        fits = values is not None and len(values) in (1, num_groups) and bool(((values >= 0) & (values <= 1)).all())
        if isinstance(x0, bool) or not fits:
            raise ValueError(f"x0 must be one value or {num_groups} values (one per group) in [0, 1], got {x0!r}")
        return values.item() if len(values) == 1 else values.tolist()

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
        return self.merge(self._asked)

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
        """The merges of coefficients [k, G], each clipped to [0, 1] (the module docstring's map), as forms over
        the two seeds: on group g's segments the SLERP weights (c_a, c_b) of that group."""
        if coefficients.dim() != 2 or coefficients.shape[1] != self.num_groups:
            raise ValueError(f"coefficients must have shape [k, {self.num_groups}], got {tuple(coefficients.shape)}")
        squares_a, squares_b, dots = self.gram.unbind(-1)
        cos = dots / (squares_a * squares_b).sqrt()  # NaN for a zero group: slerp_weights mixes it linearly
        ratios = coefficients.to(self.gram).clamp(0, 1)
        weights_a, weights_b = (w.mT.cpu() for w in slerp_weights(cos, ratios.mT))  # [k, G] each, float64
        groups = torch.tensor([group for _, _, group in self.segments])
        cuts = torch.tensor([start for start, _, _ in self.segments[1:]], dtype=torch.long)
        forms = [merge_equal_rows(cuts, torch.stack([a[groups], b[groups]], dim=1)) for a, b in zip(weights_a, weights_b)]
        return Children(forms=forms, seeds=self.seeds, owner=self)

    def best_coefficients(self) -> Tensor:
        """CMA-ES's best told coefficients [G] (its mean before any tell), clipped to [0, 1]."""
        if not self.started:
            raise RuntimeError(f"{type(self).__name__} has not started: call start(score) first")
        return self.search.best_params().clamp(0, 1)

    def best_params(self) -> Tensor:
        """The merged model [D] of `best_coefficients`."""
        return self.best_children().dense()[0]

    def best_children(self) -> Children:
        return self.merge(self.best_coefficients()[None])

    def best_token(self) -> tuple[float, ...]:
        """The best coefficients themselves: the merge changes exactly when they do."""
        return tuple(self.best_coefficients().tolist())

    def best_form(self) -> Form:
        """The best merge's form over the two seeds (a merge's recipe)."""
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
        expected = {"strategy": type(self).__name__, "num_params": self.num_params, "popsize": self.search.popsize,
                    "group_names": self.group_names}  # fmt: skip
        cp.check_saved_settings(state_dict.get(prefix + _EXTRA_STATE_KEY_SUFFIX), expected)
        saved = state_dict.get(prefix + "gram")
        if isinstance(saved, Tensor) and saved.shape == self.gram.shape:
            saved = saved.to(self.gram)
            if not torch.allclose(saved, self.gram, rtol=SEED_TOLERANCE, atol=0):
                raise ValueError(
                    "the seeds given (init_models) are not those the saved LayerwiseSlerpStrategy was run with (their "
                    "per-group norms and inner products differ); build it with the run's two seed models, in order"
                )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={value}" for name, value in self.settings().items())
