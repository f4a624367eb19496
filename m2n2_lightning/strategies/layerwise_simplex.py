"""CMA-ES over per-layer mixing weights of K seed models on the simplex (the layerwise baseline for K > 2).

The paper's LLM baseline (section 4.2) tunes one SLERP coefficient per layer
between two seeds (`LayerwiseSlerpStrategy`). With K seeds, group g of the
child is a weighted average of the seeds' groups, w_g on the simplex
(w_gk >= 0, sum_k w_gk = 1): the per-layer linear merge that mergekit-evolve
searches, with its weights normalised. CMA-ES searches K - 1 free coordinates
x_g in R^(K-1) per group, mapped to the simplex by the inverse isometric
log-ratio transform:

    w_g = softmax(H x_g),   child_g = sum_k w_gk seed_k,g

H [K, K-1] is the Helmert basis of the sum-zero subspace of R^K (column j:
1 / sqrt(j (j+1)) on the first j seeds, -j / sqrt(j (j+1)) on seed j + 1, 0
after; orthonormal, H^T 1 = 0). Why this map: every x is valid (no bound, no
clipped plateau on which CMA-ES's samples tie), x = 0 is the uniform average
(the mean start), and since H is an isometry onto the logits modulo a common
shift, CMA-ES's isotropic samples treat the seeds alike (softmax of (0, x)
would single out seed 0: its log-ratios to the others would have half the
variance of theirs to one another). A seed's own group (a simplex vertex) is
approached, not reached: at |x| = 4.5 along the direction of seed k, w_gk is
about 0.98 for K = 4. K = 2 gives the logistic mix (w_0 = sigmoid(sqrt(2) x)) of the
two seeds (linear, where the SLERP strategy interpolates on the sphere).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from m2n2_lightning.strategies.layerwise import LayerwiseStrategy


def helmert_basis(num_seeds: int) -> Tensor:
    """H [K, K-1] float64: an orthonormal basis of {v in R^K : sum v = 0} (the module docstring's columns)."""
    basis = torch.zeros(num_seeds, num_seeds - 1, dtype=torch.float64)
    for j in range(1, num_seeds):
        basis[:j, j - 1] = 1 / math.sqrt(j * (j + 1))
        basis[j, j - 1] = -j / math.sqrt(j * (j + 1))
    return basis


def simplex_weights(coordinates: Tensor, basis: Tensor) -> Tensor:
    """Weights softmax(H x) [..., K] float64 on the host for coordinates x [..., K-1] (the inverse ilr)."""
    return torch.softmax(coordinates.to("cpu", torch.float64) @ basis.mT, dim=-1)


def simplex_coordinates(weights: Tensor, basis: Tensor) -> Tensor:
    """Coordinates H^T log w [..., K-1] of positive weights w [..., K] (any scale): `simplex_weights`' inverse."""
    return weights.to(torch.float64).log() @ basis


def _as_lists(value: Any) -> Any:
    """Nested sequences (lists, Hydra's ListConfig, tensors) as nested lists; anything else as it is."""
    if isinstance(value, Tensor):
        return value.tolist()
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [_as_lists(item) for item in value]
    return value


class LayerwiseSimplexStrategy(LayerwiseStrategy):
    """CMA-ES over K - 1 coordinates per parameter group, mapped to mixing weights over K seeds.

    Args:
        num_params: D, the length of the flat parameter vector.
        init_models: K >= 2 seeds, modules or flat [D] tensors (or one [K, D]
            tensor), all of D values. Held as given, not copied.
        layout: (name, numel) of the parameters in vector order
            (`FlatParams.layout`; `build_strategy` passes it).
        groups: "layers" (one group per transformer layer and one for the rest)
            or regex patterns, one group each (`layer_groups.group_parameters`).
        popsize: candidates per generation (the paper's 25).
        sigma0: initial step size in the coordinates, 1.0: x0 +- 3 sigma0
            (pycma's advice for where the optimum should lie) reaches weights
            of about 0.91 on one seed's group (K = 4).
        x0: initial weights: None for the uniform average (x = 0), or K positive
            weights (normalised) for every group, or [G, K] of them.
        seed: seed of the inner CMA-ES's generator (the strategy's one generator).
        validate_scores: check told scores for NaN and range.

    Coefficients are [G, K-1] (`best_coefficients`); `best_weights` gives the
    best merge's weights [G, K]. The state holds the inner CMA-ES and the
    seeds' per-group Gram matrix entries [G, K(K+1)/2] (a fingerprint of the
    seeds, checked on load), not the seeds.
    """

    def __init__(
        self,
        num_params: int,
        init_models: Sequence[nn.Module | Tensor] | Tensor | None = None,
        layout: Sequence[tuple[str, int]] | None = None,
        groups: str | Sequence[str] = "layers",
        popsize: int = 25,
        sigma0: float = 1.0,
        x0: Sequence[float] | Sequence[Sequence[float]] | Tensor | None = None,
        seed: int = 0,
        validate_scores: bool = True,
    ) -> None:
        super().__init__(num_params, init_models, layout, groups, popsize, sigma0, x0, seed, validate_scores)

    def _count_error(self, count: int | None) -> str | None:
        if count is None:
            return (
                "LayerwiseSimplexStrategy merges K >= 2 seed models: pass init_models=[a, b, ...] (modules or flat "
                "[D] tensors; M2N2Callback(init_from=[...]) does)"
            )
        return None if count >= 2 else f"LayerwiseSimplexStrategy mixes K >= 2 seed models, got {count}"

    def _check_x0(self, x0: Any) -> list[float] | list[list[float]] | None:
        if x0 is None:
            return None
        shapes = ((self.num_seeds,), (self.num_groups, self.num_seeds))
        try:
            values = torch.as_tensor(_as_lists(x0), dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            values = None  # not numbers
        fits = values is not None and tuple(values.shape) in shapes and bool((values > 0).all() & values.isfinite().all())
        if isinstance(x0, str) or not fits:
            raise ValueError(
                f"x0 must be None (the uniform average) or positive weights over the {self.num_seeds} seeds, "
                f"{self.num_seeds} values or [{self.num_groups}, {self.num_seeds}] (one row per group), got {x0!r}"
            )
        return values.tolist()

    def _start_mean(self) -> Tensor:
        if self.x0 is None:
            return torch.zeros(self.coefficient_shape, dtype=torch.float64)
        weights = torch.tensor(self.x0, dtype=torch.float64).expand(self.num_groups, self.num_seeds)
        return simplex_coordinates(weights, self.basis)

    @property
    def basis(self) -> Tensor:
        """The Helmert basis H [K, K-1] of the map (made once)."""
        if getattr(self, "_basis", None) is None:
            self._basis = helmert_basis(self.num_seeds)
        return self._basis

    @property
    def coefficient_shape(self) -> tuple[int, ...]:
        return (self.num_groups, self.num_seeds - 1)

    def mixing_weights(self, coefficients: Tensor) -> Tensor:
        """The weights softmax(H x_g) [k, G, K] of coordinates [k, G, K-1] (the module docstring's map)."""
        return simplex_weights(coefficients, self.basis)

    def best_weights(self) -> Tensor:
        """The best merge's weights [G, K] over the seeds (float64, rows on the simplex)."""
        return self.mixing_weights(self.best_coefficients()[None])[0]

    def settings(self) -> dict[str, Any]:
        """The layerwise settings and K."""
        return {**super().settings(), "num_seeds": self.num_seeds}

    def extra_state(self) -> dict[str, Any]:
        return {**super().extra_state(), "num_seeds": self.num_seeds}
