"""CMA-ES settings and the strategy parameters pycma (`cma` 4.x) derives from them by default.

Pure functions of D, popsize and the mode (full or separable covariance, CSA
or TPA step-size adaptation): the recombination weights with pycma's active
(negative) weights, the learning rates c_c, c_1, c_mu, c_sigma, the CSA
damping d_sigma, E||N(0, I)||, the TPA damping and the gap between
eigendecompositions. The defaults follow Table 1 (Appendix A) of Hansen's
tutorial ("The CMA Evolution Strategy: A Tutorial", arXiv:1604.00772) where
pycma does, and pycma where it departs from it (its separable rates, its
capped CSA rate, `Mh.chiN`); tests/test_cmaes.py compares every value with pycma's.
Here too: the checks of the settings (at construction and of a saved state),
and the initial covariance and its eigendecomposition, as functions of tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from m2n2_lightning.checks import check_non_negative

#: `diagonal="auto"` uses separable CMA-ES above this D. A full covariance
#: holds about three [D, D] float64 matrices (C, its eigenvectors B and the
#: eigendecomposition's copy): 8.9 GB at the paper's D = 19,210, 1 TB at 203,530.
AUTO_DIAGONAL_ABOVE = 20_000
#: From this dimension on, pycma adapts sigma by TPA instead of CSA.
TPA_DIMENSION = 300
#: Eigendecompositions tried, lifting the diagonal of C in between, before giving up.
MAX_EIGEN_ATTEMPTS = 10


def resolve_mode(dim: int, diagonal: bool | str, sigma_adaptation: str) -> tuple[bool, str]:
    """The mode a run of dimension `dim` uses: (separable?, "csa" or "tpa"), resolving the "auto"s.

    "auto" is separable above AUTO_DIAGONAL_ABOVE (a full C would not fit in
    memory) and, as pycma chooses, TPA from TPA_DIMENSION on.
    """
    if diagonal not in (True, False, "auto"):
        raise ValueError(f"diagonal must be True, False or 'auto', got {diagonal!r}")
    if sigma_adaptation not in ("auto", "csa", "tpa"):
        raise ValueError(f"sigma_adaptation must be 'auto', 'csa' or 'tpa', got {sigma_adaptation!r}")
    separable = dim > AUTO_DIAGONAL_ABOVE if diagonal == "auto" else bool(diagonal)
    if sigma_adaptation == "auto":
        sigma_adaptation = "tpa" if dim >= TPA_DIMENSION else "csa"
    return separable, sigma_adaptation


def check_positive(name: str, value: Any) -> float:
    """`value` as a float if it is a finite number > 0, else a ValueError naming `name`."""
    if check_non_negative(name, value) == 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return float(value)


def check_float_dtype(name: str, value: Any) -> torch.dtype:
    """`value` if it is a floating-point torch.dtype, else a ValueError naming `name`."""
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"{name} must be a floating-point torch.dtype, got {value!r}")
    return value


def check_saved_settings(state: Any, expected: dict[str, Any]) -> None:
    """ValueError naming the difference unless the saved extra state `state` is of the
    strategy class `expected["strategy"]` with the same values for the other keys."""
    name = expected["strategy"]
    if not isinstance(state, dict) or "strategy" not in state:
        raise ValueError(f"the state_dict holds no strategy state ('_extra_state'), so it is not a {name}'s")
    if state["strategy"] != name:
        raise ValueError(f"the state_dict is a {state['strategy']}'s, not a {name}'s")
    for key, value in expected.items():
        if state.get(key) != value:
            raise ValueError(
                f"the saved {name} has {key} = {state.get(key)!r}, this one {value!r}; "
                f"build it with {key}={state.get(key)!r}"
            )


def expected_norm(dim: int) -> float:
    """E||N(0, I_dim)||, as pycma's `Mh.chiN`: exact up to D = 100, its series beyond."""
    if dim <= 100:
        return math.sqrt(2) * math.exp(math.lgamma((dim + 1) / 2) - math.lgamma(dim / 2))
    return dim**0.5 * (1 - 1 / (4 * dim) + 1 / (32 * dim**2))


def log_weights(popsize: int) -> list[float]:
    """pycma's raw weights ln((popsize + 1) / 2) - ln(i), the positive ones
    scaled to sum 1 and the negative ones to sum -1 (the last is always < 0)."""
    raw = [math.log((popsize + 1) / 2) - math.log(i) for i in range(1, popsize + 1)]
    positive_sum = sum(w for w in raw if w > 0)
    negative_sum = -sum(w for w in raw if w < 0)
    return [w / positive_sum if w > 0 else w / negative_sum for w in raw]


def scale_negative_weights(
    weights: list[float], dim: int, c1: float, cmu: float, positive_definite: bool
) -> list[float]:
    """pycma's `finalize_negative_weights`: negative weights summing to -(1 + c1/cmu)
    (no decay of C), capped at (1 - c1 - cmu) / cmu / dim so that C stays positive
    definite (full C only) and at 1 + 2 mueff^- / (mueff + 2)."""
    positive = [w for w in weights if w > 0]
    negative = [w for w in weights if w < 0]
    mueff = 1 / sum(w * w for w in positive)
    mueff_minus = sum(negative) ** 2 / sum(w * w for w in negative)
    target = 1 + c1 / cmu
    if positive_definite:
        target = min(target, (1 - c1 - cmu) / cmu / dim)
    target = min(target, 1 + 2 * mueff_minus / (mueff + 2))
    scale = target / -sum(negative)
    return [w * scale if w < 0 else w for w in weights]


@dataclass(frozen=True)
class CMAParameters:
    """Strategy parameters fixed by D, popsize and the mode (pycma's defaults).

    `weights` are all popsize recombination weights w_i (the first `mu`
    positive, summing to 1; the rest negative, for the active update), `mueff`
    the variance-effective selection mass of the positive ones; `cc`, `c1`,
    `cmu` the covariance learning rates (pycma's separable ones when diagonal),
    `cs` and `damps` the path rate and damping of CSA, `chi_n` = E||N(0, I)||,
    `tpa_damp` the TPA damping and `eigen_update_gap` the generations between
    eigendecompositions of C.
    """

    weights: list[float]
    mu: int
    mueff: float
    cc: float
    c1: float
    cmu: float
    cs: float
    damps: float
    chi_n: float
    tpa_damp: float
    eigen_update_gap: float

    @classmethod
    def default(
        cls, dim: int, popsize: int, diagonal: bool, sigma_adaptation: str, eigen_update_gap: float | None
    ) -> CMAParameters:
        """pycma's defaults for D = `dim`; `eigen_update_gap` None is its 1 / (c1 + cmu) / D / 10."""
        if eigen_update_gap is not None:
            eigen_update_gap = check_non_negative("eigen_update_gap", eigen_update_gap)
        weights = log_weights(popsize)
        mu = sum(w > 0 for w in weights)
        mueff = 1 / sum(w * w for w in weights[:mu])
        c1_full = min(1, popsize / 6) * 2 / ((dim + 1.3) ** 2 + mueff)
        cmu_full = min(1 - c1_full, 2 * (0.25 + mueff - 2 + 1 / mueff) / ((dim + 2) ** 2 + 2 * mueff / 2))
        if diagonal:
            cc = (1 + 1 / dim + mueff / dim) / (dim**0.5 + 1 / dim + 2 * mueff / dim)
            c1 = 1 / (dim + 2 * dim**0.5 + mueff / dim)
            cmu = min(1 - c1, (0.25 + mueff + 1 / mueff - 2) / (dim + 4 * dim**0.5 + mueff / 2))
        else:
            cc = (4 + mueff / dim) / (dim + (4 + 2 * mueff / dim))
            c1, cmu = c1_full, cmu_full
        if sigma_adaptation == "csa":
            cs = min(0.5, (mueff + 2) / (dim + mueff + 3))
        else:  # TPA keeps p_sigma (for h_sigma) with the unclipped rate
            cs = (mueff + 2) / (dim + mueff + 3)
        inner = max(1.0, 3 * (1 - 0.5 ** (dim / 9)))
        damps = 0.5 + 0.5 + 2 * max(0.0, inner * ((mueff - 1) / (dim + 1)) ** 0.5 - 1) + cs
        return cls(
            weights=scale_negative_weights(weights, dim, c1, cmu, positive_definite=not diagonal),
            mu=mu,
            mueff=mueff,
            cc=cc,
            c1=c1,
            cmu=cmu,
            cs=cs,
            damps=damps,
            chi_n=expected_norm(dim),
            tpa_damp=0.7 + 2 * math.log(dim) + 2 * math.log(max(1, popsize - dim)),
            eigen_update_gap=(
                1 / (c1_full + cmu_full + 1e-23) / dim / 10 if eigen_update_gap is None else eigen_update_gap
            ),
        )


def symmetrize_(matrix: Tensor, block: int = 2048) -> None:
    """matrix <- (matrix + matrix^T) / 2 in place, a block of rows at a time (no [D, D] copy)."""
    n = matrix.shape[0]
    for start in range(0, n, block):
        stop = min(start + block, n)
        average = (matrix[start:stop, start:] + matrix[start:, start:stop].mT) / 2
        matrix[start:stop, start:].copy_(average)
        matrix[start:, start:stop].copy_(average.mT)


def initial_covariance(dim: int, diagonal: bool, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """pycma's initial (C, B, D): C = diag(exp(1e-4 i / D)), its tie-breaker for eigh, with
    B = I and D = sqrt(diag C); separable: C = D = ones [D] and no B (an empty tensor)."""
    if diagonal:
        return torch.ones(dim, dtype=dtype), torch.zeros(0, dtype=dtype), torch.ones(dim, dtype=dtype)
    variances = torch.exp(torch.arange(dim, dtype=dtype) * (1e-4 / dim))
    return torch.diag(variances), torch.eye(dim, dtype=dtype), variances.sqrt()


def eigendecompose_(covariance: Tensor, previous_d: Tensor) -> tuple[Tensor, Tensor]:
    """(D, B) of C = B diag(D^2) B^T, D ascending, B's columns the eigenvectors.

    C is symmetrized in place first. Where eigh fails or finds an eigenvalue
    <= 0, the diagonal of C is lifted in place by the smallest previous
    eigenvalue (`previous_d` squared) and eigh tried again, as pycma recovers,
    up to MAX_EIGEN_ATTEMPTS times.
    """
    if not torch.isfinite(covariance).all():
        raise RuntimeError("the covariance matrix has non-finite entries; check the told scores")
    symmetrize_(covariance)
    for _ in range(MAX_EIGEN_ATTEMPTS):
        try:
            eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
            if bool(eigenvalues.min() > 0):
                return eigenvalues.sqrt(), eigenvectors
        except torch.linalg.LinAlgError:
            pass
        lift = previous_d.min().square()
        covariance.diagonal().add_(lift)
        previous_d = (previous_d.square() + lift).sqrt()
    raise RuntimeError(f"C is not positive definite after {MAX_EIGEN_ATTEMPTS} lifts of its diagonal")
