"""CMA-ES in torch, update for update as pycma (`cma` 4.x), the paper's baseline, with its defaults.

`tell` is the sequence of updates of Hansen's tutorial ("The CMA Evolution
Strategy: A Tutorial", arXiv:1604.00772, its algorithm summary, eqs. 38-47),
one method each, naming where pycma departs from it, with pycma's parameters
(cmaes_parameters.py). Not replicated, as they do not arise with scores in
[0, 1] or do not change the sampled distribution: pycma's stopping criteria,
the re-expression of C at condition 1e8 / 1e12, the rescaling at sigma > 1e9
sigma0, the clipping of solutions it did not sample, and its mirrored samples
at popsize < 6 (ours is pycma with ``CMA_mirrors=0``). Ties in fitness rank in
the order told (pycma's numpy quicksort leaves it open).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.module import _EXTRA_STATE_KEY_SUFFIX

from m2n2_lightning.params import flat_vector
from m2n2_lightning.strategies import cmaes_parameters as cp
from m2n2_lightning.strategies.children import Children
from m2n2_lightning.strategies.base import (
    ScoreCandidates,
    Strategy,
)
from m2n2_lightning.checks import check_non_negative, check_positive_int

#: D above which `diagonal="auto"` is separable (a full C would not fit in memory).
AUTO_DIAGONAL_ABOVE = cp.AUTO_DIAGONAL_ABOVE

#: The paper's sigma0 and the std of its random x0 (x0 ~ N(0, 0.01^2)).
PAPER_SIGMA = 0.01


class CMAESStrategy(Strategy):
    """CMA-ES (pycma's defaults) over flat parameter vectors, in torch.

    Args:
        num_params: D, the length of the flat parameter vector.
        popsize: lambda, candidates per generation (>= 2); `ask` always returns
            a whole generation and `tell` takes one.
        sigma0: initial step size (> 0).
        init_sigma: std of the random initial mean x0 ~ N(0, init_sigma^2) that `start` draws.
        x0: initial mean instead (a module or a flat [D] tensor).
        diagonal: separable CMA-ES (pycma's ``CMA_diagonal=True``), O(D) memory;
            "auto" chooses it when D > AUTO_DIAGONAL_ABOVE.
        sigma_adaptation: "csa", "tpa", or "auto" (pycma's choice: TPA when D >= 300).
        eigen_update_gap: generations between eigendecompositions of C; None is
            pycma's 1 / (c1 + cmu) / D / 10 (its option ``updatecovwait``).
        dtype: dtype of the internal state (mean, sigma, paths, C, B, D).
        candidate_dtype: dtype of the candidates `ask` returns (the model's).
        seed: seed of the strategy's generator.
        validate_scores: check told scores for NaN and range (one host sync).

    `start(score)` sets the mean and scores nothing; `tell` takes the candidates
    of the last `ask`, in its order. pycma minimises minus the mean told score.
    The state is pycma's: `mean`, `sigma`, `p_sigma`, `p_c`, `C` ([D, D], or its
    diagonal [D]), its eigenvectors `B` (columns) and the square roots `D` of its
    eigenvalues (the coordinate stds when separable), and TPA's `tpa_s`.
    """

    def __init__(
        self,
        num_params: int,
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
        validate_scores: bool = True,
    ) -> None:
        super().__init__(num_params, seed=seed, validate_scores=validate_scores)
        dim = self.num_params
        self.popsize = check_positive_int("popsize", popsize, 2)
        self.sigma0 = cp.check_positive("sigma0", sigma0)
        self.init_sigma = check_non_negative("init_sigma", init_sigma)
        dtype = cp.check_float_dtype("dtype", dtype)
        self.candidate_dtype = cp.check_float_dtype("candidate_dtype", candidate_dtype)
        self._x0 = flat_vector(x0).to(dtype) if x0 is not None else None
        if self._x0 is not None and self._x0.numel() != dim:
            raise ValueError(f"x0 has {self._x0.numel()} parameters but the model being evolved has {dim}")
        self.diagonal, self.sigma_adaptation = cp.resolve_mode(dim, diagonal, sigma_adaptation)
        self.params = cp.CMAParameters.default(dim, popsize, self.diagonal, self.sigma_adaptation, eigen_update_gap)
        self.generation = self.eigen_updated_at = 0  # generations told; the one of the last eigh
        kw = {"dtype": dtype}
        for name in ("mean", "p_sigma", "p_c", "mean_shift"):
            self.register_buffer(name, torch.zeros(dim, **kw))
        self.register_buffer("sigma", torch.tensor(self.sigma0, **kw))
        for name, value in zip("CBD", cp.initial_covariance(dim, self.diagonal, dtype)):
            self.register_buffer(name, value)
        self.register_buffer("tpa_s", torch.zeros((), **kw))
        self.register_buffer("best_x", torch.zeros(dim, dtype=candidate_dtype))
        self.register_buffer("best_score", torch.tensor(-math.inf, **kw))
        self.register_buffer("last_scores", torch.zeros(0, 0, **kw))  # [popsize, N] from the first tell on
        self.register_buffer("weights", torch.tensor(self.params.weights, **kw), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.mean.dtype

    def _start(self, score: ScoreCandidates) -> None:
        """Set the initial mean x0: the given one, or N(0, init_sigma^2) from the generator (`score` is unused)."""
        if self._x0 is not None:
            self.mean.copy_(self._x0)
        else:
            noise = torch.randn(self.num_params, generator=self.generator, dtype=self.dtype, device=self.device)
            self.mean.copy_(noise * self.init_sigma)

    def _whiten(self, v: Tensor) -> Tensor:
        """Rows v -> D^(-1) B^T v (C^(-1/2) v = B of it; its norm is the Mahalanobis length)."""
        return v / self.D if self.diagonal else (v @ self.B) / self.D

    def _update_eigensystem(self) -> None:
        """C = B diag(D^2) B^T, refreshed once `eigen_update_gap` generations have passed (tutorial, B.2), as pycma."""
        since, gap = self.generation - self.eigen_updated_at, self.params.eigen_update_gap
        if since < gap or since == gap == 0:
            return
        self.B = self.B.new_zeros(0)  # free it before eigh allocates the new one
        self.D, self.B = cp.eigendecompose_(self.C, self.D)
        self.eigen_updated_at = self.generation

    # ----------------------------------------------------------------- protocol
    @torch.no_grad()
    def ask(self, k: int | None = None) -> Children:
        """One generation x_k = m + sigma B D z_k, z_k ~ N(0, I) (tutorial eqs. 38-40) [popsize, D];
        with TPA the first two are mirrored along the last mean shift."""
        k = self.check_k(k)
        if k != self.popsize:
            raise ValueError(f"CMA-ES asks whole generations: k must be popsize = {self.popsize} (or None), got {k}")
        if not self.diagonal:
            self._update_eigensystem()
        dim, mirrored = self.num_params, self.sigma_adaptation == "tpa" and self.generation > 0
        z = torch.randn(k - 2 if mirrored else k, dim, generator=self.generator, dtype=self.dtype, device=self.device)
        steps = z * self.D if self.diagonal else (z * self.D) @ self.B.mT  # C^(1/2) z = B (D z), as pycma
        if mirrored:
            # The mean shift, rescaled to the Mahalanobis length of a random sample.
            length = torch.randn(dim, generator=self.generator, dtype=self.dtype, device=self.device).norm()
            norm = self._whiten(self.mean_shift).norm(dim=-1)
            line = self.mean_shift * torch.where(norm > 0, length / norm, torch.zeros_like(norm))
            steps = torch.cat([line[None], -line[None], steps])
        return Children(values=(self.mean + self.sigma * steps).to(self.candidate_dtype))

    def check_told(self, children: Children, scores: Tensor) -> None:
        """The base checks, and one whole generation."""
        super().check_told(children, scores)
        if len(children) != self.popsize:
            raise ValueError(f"tell() takes one generation of popsize = {self.popsize}, got {len(children)}")

    @torch.no_grad()
    def _tell(self, children: Children, scores: Tensor) -> None:
        """One generation's updates, in the order of the tutorial's summary (eqs. 41-47)."""
        candidates = children.dense()
        fitness = self._record(candidates, scores)
        self.generation += 1
        sigma = self.sigma.clone()  # this generation's sigma (the step-size update comes last)
        sorted_x = candidates.to(self.mean)[torch.argsort(fitness, stable=True)]  # x_{i:lambda}
        new_mean = self._recombine(sorted_x)
        shift = new_mean - self.mean  # sigma <y>_w
        steps = (sorted_x - self.mean) / sigma  # y_{i:lambda}
        self._update_p_sigma(shift, sigma)
        hsig = self._h_sigma()
        self._update_p_c(shift, sigma, hsig)
        self._update_covariance(steps, hsig)
        self._update_sigma(fitness)
        self.mean.copy_(new_mean)
        self.mean_shift.copy_(shift)

    def _record(self, candidates: Tensor, scores: Tensor) -> Tensor:
        """Keep the generation's scores and the best candidate; the fitness -mean score (pycma minimises)."""
        self.last_scores = scores.to(self.mean, copy=True)
        mean_scores = self.last_scores.mean(dim=1)
        best = mean_scores.argmax()
        better = mean_scores[best] > self.best_score
        self.best_score.copy_(torch.where(better, mean_scores[best], self.best_score))
        self.best_x.copy_(torch.where(better, candidates[best].to(self.best_x), self.best_x))
        return -mean_scores

    def _recombine(self, sorted_x: Tensor) -> Tensor:
        """Selection and recombination, tutorial eqs. 41-42 with c_m = 1: the new mean
        m + sigma <y>_w = sum_{i <= mu} w_i x_{i:lambda} over the mu positive weights."""
        return self.weights[: self.params.mu] @ sorted_x[: self.params.mu]

    def _update_p_sigma(self, shift: Tensor, sigma: Tensor) -> None:
        """Conjugate evolution path, tutorial eq. 43 (B, D as sampled, before C changes):
        p_sigma <- (1 - c_s) p_sigma + sqrt(c_s (2 - c_s) mueff) C^(-1/2) <y>_w."""
        cs, mueff = self.params.cs, self.params.mueff
        whitened = self._whiten(shift) if self.diagonal else self._whiten(shift) @ self.B.mT  # C^(-1/2) sigma <y>_w
        self.p_sigma.mul_(1 - cs).add_(whitened * ((cs * (2 - cs)) ** 0.5 * mueff**0.5 / sigma))

    def _h_sigma(self) -> Tensor:
        """h_sigma (tutorial, below eq. 47): 1 unless p_sigma is long, stalling p_c. pycma's
        form: ||p_sigma||^2 / (1 - (1 - c_s)^(2g)) / D < 2 + 4 / (D + 1), g generations told."""
        dim, cs = self.num_params, self.params.cs
        squared = self.p_sigma.square().sum() / (1 - (1 - cs) ** (2 * self.generation))
        return (squared / dim - 1 < 1 + 4 / (dim + 1)).to(self.dtype)

    def _update_p_c(self, shift: Tensor, sigma: Tensor, hsig: Tensor) -> None:
        """Evolution path, tutorial eq. 45: p_c <- (1 - c_c) p_c + h_sigma sqrt(c_c (2 - c_c) mueff) <y>_w
        (separable: in the coordinates scaled by D, as pycma)."""
        cc, mueff = self.params.cc, self.params.mueff
        scaling = self.D if self.diagonal else 1.0
        self.p_c.mul_(1 - cc).add_(shift / scaling * (hsig * (cc * (2 - cc) * mueff) ** 0.5 / sigma))

    def _update_covariance(self, steps: Tensor, hsig: Tensor) -> None:
        """Covariance matrix adaptation, tutorial eq. 47, rank-one (p_c) plus rank-mu with active weights:

        C <- (1 + c_1 delta(h_sigma) - c_1 - c_mu sum w_j) C + c_1 p_c p_c^T + c_mu sum w°_i y_i y_i^T,
        delta(h_sigma) = (1 - h_sigma) c_c (2 - c_c) making up for a stalled p_c, and (eq. 46) w°_i =
        w_i n / ||C^(-1/2) y_i||^2 (n = num_params) for the negative weights. Separable: `_update_diagonal`.
        """
        p = self.params
        c1a = p.c1 * (1 - (1 - hsig) * p.cc * (2 - p.cc))  # c_1 (1 - delta(h_sigma))
        if self.diagonal:
            self._update_diagonal(steps, c1a)
            return
        coefficients = p.cmu * self.weights
        decay = 1 - c1a - coefficients.sum()
        tail = coefficients[p.mu :] * (self.num_params / (self._whiten(steps[p.mu :]).norm(dim=-1) + 1e-9) ** 2)
        coefficients = torch.cat([coefficients.new_full((1,), p.c1), coefficients[: p.mu], tail])
        vectors = torch.cat([self.p_c[None], steps])
        self.C.mul_(decay).addmm_(vectors.mT * coefficients, vectors)

    def _update_diagonal(self, steps: Tensor, c1a: Tensor) -> None:
        """pycma's separable update (`CMA_diagonal`): multiply the coordinate stds D by
        exp((sum_i c_i (z_i^2 - 1)) / 2) with c = log(2) [c1a, cmu w], z = [p_c, y / D]."""
        p = self.params
        coefficients = math.log(2) * torch.cat([c1a.reshape(1), p.cmu * self.weights])
        squares = torch.cat([self.p_c[None], steps / self.D]).square()
        self.D.mul_(((coefficients @ squares - coefficients.sum()) / 2).exp())
        self.C.copy_(self.D.square())

    def _update_sigma(self, fitness: Tensor) -> None:
        """Step size: CSA, tutorial eq. 44, sigma <- sigma exp(c_s / d_s (||p_sigma|| / E||N(0, I)|| - 1)),
        the exponent clipped to [-1, 1] as pycma; or TPA (Hansen 2008, arXiv:0805.0231, as pycma's
        `CMAAdaptSigmaTPA`): s <- 0.7 s + 0.3 sign(r) |r|^(1/2) from the rank difference r of the
        mirrored pair (told first), sigma <- sigma exp(s / d_TPA)."""
        p = self.params
        if self.sigma_adaptation == "csa":
            self.sigma.mul_(((self.p_sigma.norm() / p.chi_n - 1) * (p.cs / p.damps)).clamp(-1, 1).exp())
            return
        rank_gap = ((fitness < fitness[1]).sum() - (fitness < fitness[0]).sum()).to(self.dtype) / (self.popsize - 1)
        self.tpa_s.mul_(0.7).add_(0.3 * rank_gap.sign() * rank_gap.abs().sqrt())
        self.sigma.mul_((self.tpa_s / p.tpa_damp).exp())

    @property
    def candidates_per_step(self) -> int:
        return self.popsize

    def population(self) -> tuple[Tensor, Tensor]:
        """Scores [popsize, N] of the last generation told and their means (the fitness); empty before."""
        return self.last_scores, self.last_scores.mean(dim=1)

    def best_params(self) -> Tensor:
        """The told candidate with the highest mean score so far (first on ties); before any, the mean."""
        if not self.started:
            raise RuntimeError(f"{type(self).__name__} has not started: call start(score) first")
        return torch.where(torch.isinf(self.best_score), self.mean.to(self.best_x), self.best_x)

    def settings(self) -> dict[str, Any]:
        """The base's, popsize, sigma0, init_sigma, whether x0 was given, the resolved mode and gap, dtypes."""
        return {
            **super().settings(), "popsize": self.popsize, "sigma0": self.sigma0, "init_sigma": self.init_sigma,
            "x0_given": self._x0 is not None, "diagonal": self.diagonal, "sigma_adaptation": self.sigma_adaptation,
            "eigen_update_gap": self.params.eigen_update_gap, "dtype": str(self.dtype).removeprefix("torch."),
            "candidate_dtype": str(self.candidate_dtype).removeprefix("torch."),
        }  # fmt: skip

    # -------------------------------------------------------------------- state
    def extra_state(self) -> dict[str, Any]:
        return {"popsize": self.popsize, "diagonal": self.diagonal, "sigma_adaptation": self.sigma_adaptation,
                "generation": self.generation, "eigen_updated_at": self.eigen_updated_at}  # fmt: skip

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.generation, self.eigen_updated_at = state["generation"], state["eigen_updated_at"]

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # The saved strategy first: a ValueError naming the difference, before any shape error.
        shaping = ("num_params", "popsize", "diagonal", "sigma_adaptation")
        expected = {"strategy": type(self).__name__, **{key: getattr(self, key) for key in shaping}}
        cp.check_saved_settings(state_dict.get(prefix + _EXTRA_STATE_KEY_SUFFIX), expected)
        # Sized or laid out at run time, so taken from the saved tensors: last_scores [popsize, N] (from the first
        # tell, [0, 0] before) and B (eigh's, column-major: a row-major copy would round the matmuls differently).
        for name, rows in (("last_scores", (0, self.popsize)), ("B", (self.num_params,))):
            saved = state_dict.get(prefix + name)
            if isinstance(saved, Tensor) and saved.dim() == 2 and saved.shape[0] in rows:
                setattr(self, name, torch.empty_like(saved, dtype=self.dtype, device=self.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={value}" for name, value in self.settings().items())
