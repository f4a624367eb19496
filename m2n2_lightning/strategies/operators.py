"""The M2N2 operators as pure tensor functions (see M2N2.md for the formulas).

Every function works on tensors already on the device and never reads a value
back to the host, so a step of the algorithm costs no synchronisation. Random
numbers come from an explicit `torch.Generator`.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Below this sin(Omega) the SLERP falls back to a plain linear mix.
SLERP_EPS = 1e-6


def niche_fitness(scores: Tensor, alpha: float, capacity: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Fitness under competition for limited resources.

    n_j = sum_i s_ij, z_j = n_j ** alpha (1 where n_j = 0), F_ij = c_j s_ij / z_j,
    fit_i = sum_j F_ij. Returns (fitness [P], shares F [P, N]). alpha = 0 gives
    the plain number of examples solved.
    """
    taken = scores.sum(dim=0)
    z = torch.where(taken > 0, taken.pow(alpha), torch.ones_like(taken))
    shares = scores / z
    if capacity is not None:
        shares = shares * capacity
    return shares.sum(dim=1), shares


def attraction(shares: Tensor, first: Tensor) -> Tensor:
    """g_k = sum_j max(0, F_kj - F_aj) for each first parent a in `first` [m]: returns [m, P]."""
    return (shares.unsqueeze(0) - shares[first].unsqueeze(1)).clamp_min(0).sum(dim=-1)


def sample_categorical(weights: Tensor, uniforms: Tensor) -> Tensor:
    """Inverse-CDF draws from Categorical(weights / sum(weights)).

    `weights` is [P] or [m, P] (non-negative, positive sum per row), `uniforms`
    is [m] in [0, 1). Entries of weight zero are never returned.
    """
    weights = weights.expand(uniforms.shape[0], -1) if weights.dim() == 1 else weights
    cdf = weights.cumsum(dim=-1)
    targets = uniforms.to(cdf.dtype).unsqueeze(-1) * cdf[:, -1:]
    index = torch.searchsorted(cdf, targets, right=True).squeeze(-1)
    # Rounding can put the target at the very top of the CDF: take the last positive entry.
    positive = weights > 0
    last_positive = weights.shape[-1] - 1 - positive.flip(-1).to(torch.int8).argmax(dim=-1)
    return torch.minimum(index, last_positive)


def _with_fallback(weights: Tensor, fallback: Tensor) -> Tensor:
    """`weights` per row, or `fallback` where a row of `weights` sums to zero."""
    empty = weights.sum(dim=-1, keepdim=True) <= 0
    return torch.where(empty, fallback.to(weights.dtype).expand_as(weights), weights)


def sample_parents(
    fitness: Tensor,
    shares: Tensor,
    occupied: Tensor,
    num_pairs: int,
    generator: torch.Generator,
    use_matchmaker: bool = True,
) -> tuple[Tensor, Tensor]:
    """Draw `num_pairs` parent index pairs (a, b) from the archive.

    a ~ Categorical(fit / sum fit). With the matchmaker b ~ Categorical(g / sum g)
    with g the attraction to a; without it b is drawn like a, independently.
    Where sum fit = 0 the draw is uniform over occupied slots; where sum g = 0
    b falls back to fitness-proportional (the reference leaves both undefined).
    """
    uniforms = torch.rand(num_pairs, 2, generator=generator, device=fitness.device)
    by_fitness = _with_fallback(fitness, occupied)
    first = sample_categorical(by_fitness, uniforms[:, 0])
    if use_matchmaker:
        second_weights = _with_fallback(attraction(shares, first), by_fitness)
    else:
        second_weights = by_fitness
    second = sample_categorical(second_weights, uniforms[:, 1])
    return first, second


def slerp(a: Tensor, b: Tensor, t: Tensor) -> Tensor:
    """Spherical interpolation of rows of a and b [k, D] with ratios t ([k, D] or [k, 1]).

    One angle per pair, cos(Omega) = <a/|a|, b/|b|> clipped to [-1, 1]; where
    sin(Omega) <= 1e-6 (or undefined) the mix is linear: (1 - t) a + t b.
    """
    cos = (a * b).sum(-1, keepdim=True) / (a.norm(dim=-1, keepdim=True) * b.norm(dim=-1, keepdim=True))
    omega = torch.arccos(cos.clamp(-1.0, 1.0))
    sin = torch.sin(omega)
    spherical = (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / sin
    linear = (1 - t) * a + t * b
    return torch.where(sin > SLERP_EPS, spherical, linear)


def split_point_ratios(weight: Tensor, split: Tensor | None, dim: int) -> Tensor:
    """Mixing ratios t [k, D]: w before the split point, 1 - w from it on.

    Without a split point (the ablation) t = w everywhere, returned as [k, 1].
    """
    weight = weight.unsqueeze(-1)
    if split is None:
        return weight
    before = torch.arange(dim, device=weight.device) < split.unsqueeze(-1)
    return torch.where(before, weight, 1 - weight)


def crossover(
    a: Tensor, b: Tensor, generator: torch.Generator, use_split_point: bool = True
) -> Tensor:
    """Split-point SLERP children of parent rows a and b [k, D].

    Draws the split point k ~ U{0..D-1} (when used) and then w ~ U(0, 1) per child.
    """
    k, dim = a.shape
    split = None
    if use_split_point:
        split = torch.randint(0, dim, (k,), generator=generator, device=a.device)
    weight = torch.rand(k, generator=generator, device=a.device, dtype=a.dtype)
    return slerp(a, b, split_point_ratios(weight, split, dim))


def mutate(x: Tensor, sigma: float, generator: torch.Generator) -> Tensor:
    """x + N(0, sigma^2) noise (a no-op for sigma = 0)."""
    if sigma == 0:
        return x
    return x + sigma * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def worst_after_insert(scores: Tensor, new_scores: Tensor, alpha: float, capacity: Tensor | None = None) -> Tensor:
    """Index of the row dropped when `new_scores` [N] joins `scores` [P, N].

    Niche fitness is recomputed over the P + 1 rows; the lowest fitness is dropped,
    the first one on ties. Returns a 0-dim tensor; P means the newcomer itself.
    """
    extended = torch.cat([scores, new_scores.unsqueeze(0)])
    fitness, _ = niche_fitness(extended, alpha, capacity)
    return fitness.argmin()


def replace_worst(
    archive: Tensor,
    scores: Tensor,
    occupied: Tensor,
    child: Tensor,
    child_scores: Tensor,
    alpha: float,
    capacity: Tensor | None = None,
) -> Tensor:
    """Insert a child by the replace-the-worst rule, in place, without a host sync.

    If the dropped row is the child the archive is left as it was. Returns the
    dropped index (0-dim tensor; archive size P means the child was rejected).
    """
    worst = worst_after_insert(scores, child_scores, alpha, capacity)
    accept = worst < archive.shape[0]
    slot = worst.clamp(max=archive.shape[0] - 1).reshape(1)
    # 1-dim index tensors throughout: a 0-dim one would be read back to the host.
    archive.index_copy_(0, slot, torch.where(accept, child.unsqueeze(0), archive[slot]))
    scores.index_copy_(0, slot, torch.where(accept, child_scores.unsqueeze(0), scores[slot]))
    occupied.index_copy_(0, slot, occupied[slot] | accept)
    return worst
