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

from m2n2_lightning.strategies.layerwise import SEED_TOLERANCE, LayerwiseStrategy
from m2n2_lightning.strategies.operators import slerp_weights

__all__ = ["SEED_TOLERANCE", "LayerwiseSlerpStrategy"]


class LayerwiseSlerpStrategy(LayerwiseStrategy):
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

    `best_params` maps CMA-ES's best told coefficients (its mean before any
    tell), clipped. The state holds the inner CMA-ES and the seeds' per-group
    Gram entries [G, 3] (`LayerwiseStrategy`). For more than two seeds, see
    `LayerwiseSimplexStrategy`.
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
        super().__init__(num_params, init_models, layout, groups, popsize, sigma0, x0, seed, validate_scores)

    def _count_error(self, count: int | None) -> str | None:
        if count is None:
            return (
                "LayerwiseSlerpStrategy merges exactly two seed models: pass init_models=[a, b] (modules or flat "
                "[D] tensors; M2N2Callback(init_from=[a, b]) does)"
            )
        if count != 2:
            return (
                f"LayerwiseSlerpStrategy interpolates between exactly two seed models, got {count}; "
                "to merge more, use LayerwiseSimplexStrategy or M2N2Strategy"
            )
        return None

    def _check_x0(self, x0: Any) -> float | list[float]:
        num_groups = self.num_groups
        try:
            values = torch.as_tensor(list(x0) if isinstance(x0, Sequence) else x0, dtype=torch.float64).flatten()
        except (TypeError, ValueError, RuntimeError):
            values = None  # not numbers
        fits = values is not None and len(values) in (1, num_groups) and bool(((values >= 0) & (values <= 1)).all())
        if isinstance(x0, bool) or not fits:
            raise ValueError(f"x0 must be one value or {num_groups} values (one per group) in [0, 1], got {x0!r}")
        return values.item() if len(values) == 1 else values.tolist()

    def _start_mean(self) -> Tensor:
        return torch.tensor(self.x0, dtype=torch.float64).expand(self.num_groups).clone()

    @property
    def coefficient_shape(self) -> tuple[int, ...]:
        return (self.num_groups,)

    def _bounded(self, coefficients: Tensor) -> Tensor:
        return coefficients.clamp(0, 1)

    def mixing_weights(self, coefficients: Tensor) -> Tensor:
        """The SLERP weights (c_a, c_b) [k, G, 2] of coefficients [k, G], each clipped to [0, 1] (the module
        docstring's map)."""
        squares_a, squares_b, dots = self.gram.unbind(-1)
        cos = dots / (squares_a * squares_b).sqrt()  # NaN for a zero group: slerp_weights mixes it linearly
        ratios = self._bounded(coefficients.to(self.gram))
        weights_a, weights_b = (w.mT.cpu() for w in slerp_weights(cos, ratios.mT))  # [k, G] each, float64
        return torch.stack([weights_a, weights_b], dim=-1)
