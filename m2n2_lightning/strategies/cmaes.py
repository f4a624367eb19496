"""CMA-ES in torch, update for update as pycma (`cma` 4.x) with its default options.

The paper's baseline is pycma's `CMAEvolutionStrategy` (popsize 20, sigma0 =
0.01, x0 ~ N(0, 0.01^2)). pycma runs in numpy on the CPU: at D = 19,210 one
generation takes seconds and the [D, D] covariance lives in host memory. This
is the same algorithm on the strategy's device, as in Hansen's tutorial
("The CMA Evolution Strategy: A Tutorial", arXiv:1604.00772) with the
parameter settings and update rules pycma applies by default:

- recombination weights with negative ("active") weights, scaled as in
  `RecombinationWeights.finalize_negative_weights`;
- learning rates c_c, c_1, c_mu (and their separable variants), c_sigma and
  the CSA damping of `CMAAdaptSigmaCSA`, chi_N as `Mh.chiN`;
- h_sigma from the bias-corrected length of p_sigma, c_1 lowered for the
  variance lost when it stalls;
- negative-weight steps rescaled to Mahalanobis length sqrt(D);
- the eigendecomposition of C refreshed lazily, every
  1 / (c_1 + c_mu) / D / 10 generations, when the next generation is sampled;
- pycma's initial C = diag(exp(1e-4 i / D)) (its tie-breaker for eigh);
- step-size adaptation: CSA below D = 300, two-point adaptation (TPA, with
  its mirrored pair along the last mean shift) from D = 300 on;
- `diagonal=True`: pycma's `CMA_diagonal=True`, i.e. separable CMA-ES whose
  coordinate-wise standard deviations get pycma's multiplicative update
  with the separable learning rates c_c_sep, c_1_sep, c_mu_sep.

Not replicated, as they do not arise in training with scores in [0, 1] or do
not change the sampled distribution: pycma's stopping criteria, its
re-expression of C when its condition exceeds 1e8 / 1e12, the rescaling when
sigma exceeds 1e9 sigma0, the Mahalanobis clipping of solutions it did not
sample itself, and the selective mirrored samples it adds when popsize < 6
(ours equals pycma with ``CMA_mirrors=0``). Ties in fitness are ranked in the
order the candidates were told (pycma's numpy quicksort leaves it open).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from m2n2_lightning.params import flat_vector
from m2n2_lightning.strategies.base import Strategy

#: The paper's sigma0 and the std of its random x0 (x0 ~ N(0, 0.01^2)).
PAPER_SIGMA = 0.01
#: `diagonal="auto"` uses separable CMA-ES above this D. A full covariance
#: holds about three [D, D] float64 matrices (C, its eigenvectors B and the
#: eigendecomposition's copy): 8.9 GB at the paper's D = 19,210, 1 TB at 203,530.
AUTO_DIAGONAL_ABOVE = 20_000
#: From this dimension on, pycma adapts sigma by TPA instead of CSA.
TPA_DIMENSION = 300
#: Eigendecompositions tried, lifting the diagonal of C in between, before giving up.
MAX_EIGEN_ATTEMPTS = 10


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
    """Strategy parameters fixed by D, popsize and the mode (pycma's defaults)."""

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
    ) -> "CMAParameters":
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


class CMAESStrategy(Strategy):
    """CMA-ES (pycma's defaults) over flat parameter vectors, in torch.

    Args:
        popsize: lambda, candidates per generation (>= 2); `ask` always returns
            a whole generation and `tell` takes one.
        sigma0: initial step size (> 0).
        init_sigma: std of the random initial mean x0 ~ N(0, init_sigma^2),
            drawn from the strategy's generator at the first `ask`.
        x0: initial mean instead (a module or a flat [D] tensor).
        diagonal: separable CMA-ES (pycma's ``CMA_diagonal=True``), O(D) memory;
            "auto" chooses it when D > AUTO_DIAGONAL_ABOVE.
        sigma_adaptation: "csa", "tpa", or "auto" (pycma's choice: TPA when D >= 300).
        eigen_update_gap: generations between eigendecompositions of C; None is
            pycma's 1 / (c1 + cmu) / D / 10 (its option ``updatecovwait``).
        dtype: dtype of the internal state (mean, sigma, paths, C, B, D).
        candidate_dtype: dtype of the candidates `ask` returns (the model's).
        seed: seed of the strategy's generator.
        num_params: D; may instead be given later through `setup(D)`.
        validate_scores: check told scores for NaN and range (one host sync).

    The fitness pycma minimises is minus the mean of the told scores. The state
    is pycma's: `mean`, `sigma`, `p_sigma`, `p_c`, the covariance `C` ([D, D],
    or its diagonal [D] when separable), its eigenvectors `B` (columns) and the
    square roots `D` of its eigenvalues (the coordinate stds when separable),
    as of the last eigendecomposition. `tell` recomputes each step
    y = (x - mean) / sigma from the told candidates, which must be those of
    the last `ask`, in its order (with TPA the first two are the mirrored pair).
    """

    resizable_buffers = ("mean", "p_sigma", "p_c", "C", "B", "D", "mean_shift", "best_x", "last_scores")

    def __init__(
        self,
        popsize: int = 20,
        sigma0: float = PAPER_SIGMA,
        init_sigma: float = PAPER_SIGMA,
        x0: nn.Module | Tensor | None = None,
        diagonal: bool | str = False,
        sigma_adaptation: str = "auto",
        eigen_update_gap: float | None = None,
        dtype: torch.dtype = torch.float64,
        candidate_dtype: torch.dtype = torch.float32,
        seed: int = 0,
        num_params: int | None = None,
        validate_scores: bool = True,
    ) -> None:
        super().__init__(seed=seed, validate_scores=validate_scores)
        self.popsize = self.check_positive_int("popsize", popsize, 2)
        self.sigma0 = self.check_non_negative("sigma0", sigma0)
        if self.sigma0 == 0:
            raise ValueError("sigma0 must be > 0, got 0")
        self.init_sigma = self.check_non_negative("init_sigma", init_sigma)
        if diagonal not in (True, False, "auto"):
            raise ValueError(f"diagonal must be True, False or 'auto', got {diagonal!r}")
        if sigma_adaptation not in ("auto", "csa", "tpa"):
            raise ValueError(f"sigma_adaptation must be 'auto', 'csa' or 'tpa', got {sigma_adaptation!r}")
        if eigen_update_gap is not None:
            eigen_update_gap = self.check_non_negative("eigen_update_gap", eigen_update_gap)
        for name, value in (("dtype", dtype), ("candidate_dtype", candidate_dtype)):
            if not isinstance(value, torch.dtype) or not value.is_floating_point:
                raise ValueError(f"{name} must be a floating-point torch.dtype, got {value!r}")
        self.requested_diagonal = diagonal
        self.requested_sigma_adaptation = sigma_adaptation
        self.requested_eigen_update_gap = eigen_update_gap
        self.candidate_dtype = candidate_dtype
        self._x0 = flat_vector(x0).to(dtype) if x0 is not None else None
        # Resolved by setup (they depend on D):
        self.diagonal: bool | None = None
        self.sigma_adaptation: str | None = None
        self.params: CMAParameters | None = None
        self.generation = 0
        self.eigen_updated_at = 0
        self._started = False

        self.register_buffer("mean", torch.zeros(0, dtype=dtype))
        self.register_buffer("sigma", torch.tensor(self.sigma0, dtype=dtype))
        self.register_buffer("p_sigma", torch.zeros(0, dtype=dtype))
        self.register_buffer("p_c", torch.zeros(0, dtype=dtype))
        self.register_buffer("C", torch.zeros(0, dtype=dtype))
        self.register_buffer("B", torch.zeros(0, dtype=dtype))
        self.register_buffer("D", torch.zeros(0, dtype=dtype))
        self.register_buffer("mean_shift", torch.zeros(0, dtype=dtype))
        self.register_buffer("tpa_s", torch.zeros((), dtype=dtype))
        self.register_buffer("best_x", torch.zeros(0, dtype=candidate_dtype))
        self.register_buffer("best_score", torch.tensor(-math.inf, dtype=dtype))
        self.register_buffer("last_scores", torch.zeros(0, 0, dtype=dtype))
        self.register_buffer("weights", torch.zeros(0, dtype=dtype), persistent=False)
        if num_params is not None or x0 is not None:
            self.setup(num_params if num_params is not None else self._x0.numel())

    # -------------------------------------------------------------------- setup
    @property
    def dtype(self) -> torch.dtype:
        return self.mean.dtype

    def setup(self, num_params: int) -> None:
        """Fix D and allocate the state (a no-op when D is already set)."""
        if not self.claim_num_params(num_params):
            return
        if self._x0 is not None and self._x0.numel() != num_params:
            raise ValueError(f"x0 has {self._x0.numel()} parameters but the model being evolved has {num_params}")
        diagonal = num_params > AUTO_DIAGONAL_ABOVE if self.requested_diagonal == "auto" else self.requested_diagonal
        adaptation = self.requested_sigma_adaptation
        if adaptation == "auto":
            adaptation = "tpa" if num_params >= TPA_DIMENSION else "csa"
        self.num_params = num_params
        self._configure(diagonal, adaptation)
        kw = {"dtype": self.dtype, "device": self.device}
        self.mean = torch.zeros(num_params, **kw)
        self.p_sigma = torch.zeros(num_params, **kw)
        self.p_c = torch.zeros(num_params, **kw)
        self.mean_shift = torch.zeros(num_params, **kw)
        self.best_x = torch.zeros(num_params, dtype=self.candidate_dtype, device=self.device)
        if diagonal:
            self.C = torch.ones(num_params, **kw)
            self.D = torch.ones(num_params, **kw)
        else:
            variances = torch.exp(torch.arange(num_params, **kw) * (1e-4 / num_params))
            self.C = torch.diag(variances)
            self.B = torch.eye(num_params, **kw)
            self.D = variances.sqrt()

    def _configure(self, diagonal: bool, sigma_adaptation: str) -> None:
        """Derive the strategy parameters for the set-up D and resolved mode."""
        self.diagonal = diagonal
        self.sigma_adaptation = sigma_adaptation
        self.params = CMAParameters.default(
            self.num_params, self.popsize, diagonal, sigma_adaptation, self.requested_eigen_update_gap
        )
        self.weights = torch.tensor(self.params.weights, dtype=self.dtype, device=self.device)

    def _start(self) -> None:
        """Set the initial mean x0 (drawn on the device, hence not in setup)."""
        if self._started:
            return
        if self._x0 is not None:
            self.mean.copy_(self._x0)
        else:
            noise = torch.randn(self.num_params, generator=self.generator, dtype=self.dtype, device=self.device)
            self.mean.copy_(noise * self.init_sigma)
        self._started = True

    # ------------------------------------------------------- linear algebra
    def _sqrt_c(self, z: Tensor) -> Tensor:
        """Rows z -> C^(1/2) z with the current B, D (pycma samples B (D z))."""
        return z * self.D if self.diagonal else (z * self.D) @ self.B.mT

    def _inv_sqrt_c(self, v: Tensor) -> Tensor:
        """Rows v -> C^(-1/2) v with the current B, D."""
        return v / self.D if self.diagonal else ((v @ self.B) / self.D) @ self.B.mT

    def _mahalanobis(self, v: Tensor) -> Tensor:
        """||C^(-1/2) v|| per row, with the current B, D."""
        return (v / self.D if self.diagonal else (v @ self.B) / self.D).norm(dim=-1)

    def _maybe_decompose(self) -> None:
        """Refresh B, D from C when pycma's lazy-update gap has passed."""
        since = self.generation - self.eigen_updated_at
        gap = self.params.eigen_update_gap
        if since < gap or since == gap == 0:
            return
        if not torch.isfinite(self.C).all():
            raise RuntimeError("the covariance matrix has non-finite entries; check the told scores")
        symmetrize_(self.C)
        self.B = self.B.new_zeros(0)  # free it before eigh allocates the new one
        old_d = self.D
        for _ in range(MAX_EIGEN_ATTEMPTS):
            try:
                eigenvalues, eigenvectors = torch.linalg.eigh(self.C)
                if bool(eigenvalues.min() > 0):
                    break
            except torch.linalg.LinAlgError:
                pass
            # pycma's recovery: lift the spectrum by the smallest previous eigenvalue.
            lift = old_d.min().square()
            self.C.diagonal().add_(lift)
            old_d = (old_d.square() + lift).sqrt()
        else:
            raise RuntimeError(f"C is not positive definite after {MAX_EIGEN_ATTEMPTS} lifts of its diagonal")
        self.B = eigenvectors
        self.D = eigenvalues.sqrt()
        self.eigen_updated_at = self.generation

    # ----------------------------------------------------------------- protocol
    @torch.no_grad()
    def ask(self, k: int | None = None) -> Tensor:
        """One generation [popsize, D]; with TPA the first two are mirrored along the last mean shift."""
        dim = self.require_setup()
        k = self.popsize if k is None else self.check_positive_int("k", k, 1)
        if k != self.popsize:
            raise ValueError(
                f"CMA-ES samples whole generations: k must equal popsize = {self.popsize} (or be None), got {k}"
            )
        self._start()
        if not self.diagonal:
            self._maybe_decompose()
        mirrored = self.sigma_adaptation == "tpa" and self.generation > 0
        z = torch.randn(k - 2 if mirrored else k, dim, generator=self.generator, dtype=self.dtype, device=self.device)
        steps = self._sqrt_c(z)
        if mirrored:
            # The mean shift, rescaled to the Mahalanobis length of a random sample.
            length = torch.randn(dim, generator=self.generator, dtype=self.dtype, device=self.device).norm()
            norm = self._mahalanobis(self.mean_shift)
            line = self.mean_shift * torch.where(norm > 0, length / norm, torch.zeros_like(norm))
            steps = torch.cat([line[None], -line[None], steps])
        return (self.mean + self.sigma * steps).to(self.candidate_dtype)

    def check_told(self, candidates: Tensor, scores: Tensor) -> None:
        """The base checks, and one whole generation."""
        super().check_told(candidates, scores)
        if candidates.shape[0] != self.popsize:
            raise ValueError(f"tell() takes one generation of popsize = {self.popsize}, got {candidates.shape[0]}")

    @torch.no_grad()
    def _tell(self, candidates: Tensor, scores: Tensor) -> None:
        self._start()
        p, dim = self.params, self.num_params
        x = candidates.to(self.mean)
        self.last_scores = scores.to(self.mean, copy=True)
        mean_scores = self.last_scores.mean(dim=1)
        self._track_best(candidates, mean_scores)
        fitness = -mean_scores  # pycma minimises
        order = torch.argsort(fitness, stable=True)
        self.generation += 1
        sigma = self.sigma.clone()
        sorted_x = x[order]
        new_mean = self.weights[: p.mu] @ sorted_x[: p.mu]
        shift = new_mean - self.mean
        steps = (sorted_x - self.mean) / sigma

        # Evolution paths, with B, D as sampled (before C changes).
        cs, cc = p.cs, p.cc
        self.p_sigma.mul_(1 - cs).add_(self._inv_sqrt_c(shift) * ((cs * (2 - cs)) ** 0.5 * p.mueff**0.5 / sigma))
        squared = self.p_sigma.square().sum() / (1 - (1 - cs) ** (2 * self.generation))
        hsig = (squared / dim - 1 < 1 + 4 / (dim + 1)).to(self.dtype)
        scaling = self.D if self.diagonal else 1.0
        self.p_c.mul_(1 - cc).add_(shift / scaling * (hsig * (cc * (2 - cc) * p.mueff) ** 0.5 / sigma))
        c1a = p.c1 * (1 - (1 - hsig) * cc * (2 - cc))  # makes up for the variance a stalled p_c misses
        if self.diagonal:
            self._update_diagonal(steps, c1a)
        else:
            self._update_full(steps, c1a)

        if self.sigma_adaptation == "csa":
            change = (self.p_sigma.norm() / p.chi_n - 1) * (cs / p.damps)
            self.sigma.mul_(change.clamp(-1, 1).exp())
        else:
            # TPA: rank difference of the mirrored pair (told first) along the last mean shift.
            rank_gap = ((fitness < fitness[1]).sum() - (fitness < fitness[0]).sum()).to(self.dtype)
            rank_gap = rank_gap / (self.popsize - 1)
            self.tpa_s.mul_(0.7).add_(0.3 * rank_gap.sign() * rank_gap.abs().sqrt())
            self.sigma.mul_((self.tpa_s / p.tpa_damp).exp())
        self.mean.copy_(new_mean)
        self.mean_shift.copy_(shift)
        self.forward_passes += len(candidates)

    def _update_full(self, steps: Tensor, c1a: Tensor) -> None:
        """C <- (1 - c1a - cmu sum w) C + c1 p_c p_c^T + cmu sum w_i y_i y_i^T, with
        negative-weight steps rescaled to Mahalanobis length sqrt(D)."""
        p = self.params
        coefficients = p.cmu * self.weights
        decay = 1 - c1a - coefficients.sum()
        tail = coefficients[p.mu :] * (self.num_params / (self._mahalanobis(steps[p.mu :]) + 1e-9) ** 2)
        coefficients = torch.cat([coefficients.new_full((1,), p.c1), coefficients[: p.mu], tail])
        vectors = torch.cat([self.p_c[None], steps])
        self.C.mul_(decay).addmm_(vectors.mT * coefficients, vectors)

    def _update_diagonal(self, steps: Tensor, c1a: Tensor) -> None:
        """pycma's separable update: multiply the coordinate stds D by
        exp((sum_i c_i (z_i^2 - 1)) / 2) with c = log(2) [c1a, cmu w], z = [p_c, y / D]."""
        p = self.params
        coefficients = math.log(2) * torch.cat([c1a.reshape(1), p.cmu * self.weights])
        squares = torch.cat([self.p_c[None], steps / self.D]).square()
        self.D.mul_(((coefficients @ squares - coefficients.sum()) / 2).exp())
        self.C.copy_(self.D.square())

    def _track_best(self, candidates: Tensor, mean_scores: Tensor) -> None:
        best = mean_scores.argmax()
        better = mean_scores[best] > self.best_score
        self.best_score.copy_(torch.where(better, mean_scores[best], self.best_score))
        self.best_x.copy_(torch.where(better, candidates[best].to(self.best_x), self.best_x))

    @property
    def candidates_per_step(self) -> int:
        return self.popsize

    def population(self) -> tuple[Tensor, Tensor]:
        """Scores [popsize, N] of the last generation told and their means (the fitness
        maximised); empty before the first tell."""
        return self.last_scores, self.last_scores.mean(dim=1)

    def best_params(self) -> Tensor:
        """The told candidate with the highest mean score so far (the first on ties);
        the initial mean before any tell."""
        self.require_setup()
        self._start()
        return torch.where(torch.isinf(self.best_score), self.mean.to(self.best_x), self.best_x)

    # -------------------------------------------------------------------- state
    def extra_state(self) -> dict[str, Any]:
        return {
            "popsize": self.popsize,
            "diagonal": self.diagonal,
            "sigma_adaptation": self.sigma_adaptation,
            "generation": self.generation,
            "eigen_updated_at": self.eigen_updated_at,
            "started": self._started,
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if state["popsize"] != self.popsize:
            raise ValueError(f"the saved strategy has popsize {state['popsize']}, this one {self.popsize}")
        self.generation = state["generation"]
        self.eigen_updated_at = state["eigen_updated_at"]
        self._started = state["started"]
        if self.num_params is not None:
            self._configure(state["diagonal"], state["sigma_adaptation"])

    def extra_repr(self) -> str:
        return (
            f"popsize={self.popsize}, sigma0={self.sigma0}, diagonal={self.requested_diagonal}, "
            f"sigma_adaptation={self.requested_sigma_adaptation}, dtype={self.dtype}"
        )


def symmetrize_(matrix: Tensor, block: int = 2048) -> None:
    """matrix <- (matrix + matrix^T) / 2 in place, a block of rows at a time (no [D, D] copy)."""
    n = matrix.shape[0]
    for start in range(0, n, block):
        stop = min(start + block, n)
        average = (matrix[start:stop, start:] + matrix[start:, start:stop].mT) / 2
        matrix[start:stop, start:].copy_(average)
        matrix[start:, start:stop].copy_(average.mT)
