"""The M2N2 operators as pure tensor functions (see M2N2.md for the formulas).

Every function works on tensors already on the device and never reads a value
back to the host from an accelerator, so a step of the algorithm costs no
synchronisation. Random numbers come from an explicit `torch.Generator`. At
the paper's sizes a step is a few dozen small kernels, so on the CPU their
count sets the speed: each function uses as few as the formula allows, and
where the tensors live on the CPU (where reading a value back is free) the
crossover and the archive update read the split points and the dropped row
to use slices and row copies instead of masks over D. Both ways give
bit-identical results (tests/test_speed_paths.py); the timings are in
benchmarks/RESULTS.md.
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
    z = torch.where(taken > 0, taken if alpha == 1 else taken.pow(alpha), 1.0)
    shares = scores / z
    if capacity is not None:
        shares = shares * capacity
    return shares.sum(dim=1), shares


def attraction(shares: Tensor, first: Tensor) -> Tensor:
    """g_k = sum_j max(0, F_kj - F_aj) for each first parent a in `first` [m]: returns [m, P]."""
    return (shares.unsqueeze(0) - shares.index_select(0, first).unsqueeze(1)).clamp_min_(0).sum(dim=-1)


def sample_categorical(weights: Tensor, uniforms: Tensor) -> Tensor:
    """Inverse-CDF draws from Categorical(weights / sum(weights)).

    `weights` is [P] or [m, P] (non-negative, positive sum per row), `uniforms`
    is [m] in [0, 1). Entries of weight zero are never returned.
    """
    weights = weights.expand(uniforms.shape[0], -1) if weights.dim() == 1 else weights
    cdf = weights.cumsum(dim=-1)
    total = cdf[:, -1:]
    draw = torch.searchsorted(cdf, uniforms.to(cdf.dtype).unsqueeze(-1) * total, right=True)
    # u < 1, but u * total can round up to the total, and the draw then lands past the
    # last positive entry (on a trailing zero, or out of range): cap it there, at the
    # first entry where the CDF reaches its total.
    return torch.minimum(draw, torch.searchsorted(cdf, total)).squeeze(-1)


def _with_fallback(weights: Tensor, fallback: Tensor) -> Tensor:
    """`weights` per row, or `fallback` where a row of `weights` sums to zero."""
    return torch.where(weights.sum(dim=-1, keepdim=True) <= 0, fallback.to(weights.dtype), weights)


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


def slerp_coefficients(a: Tensor, b: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """Weights (c_a, c_b) of the SLERP child c_a a + c_b b for rows of a, b [k, D] and ratios t [k, m].

    One angle per pair, cos(Omega) = <a/|a|, b/|b|> clipped to [-1, 1]:
    c_a = sin((1 - t) Omega) / sin(Omega), c_b = sin(t Omega) / sin(Omega); where
    sin(Omega) <= 1e-6 (or undefined) the mix is linear: c_a = 1 - t, c_b = t.
    """
    cos = torch.linalg.vecdot(a, b) / (torch.linalg.vector_norm(a, dim=-1) * torch.linalg.vector_norm(b, dim=-1))
    omega = cos.clamp_(-1.0, 1.0).arccos_().unsqueeze(-1)
    sin = omega.sin()
    linear = torch.cat([1 - t, t], dim=-1)  # c_a then c_b, in one tensor: half the small kernels
    coefficients = torch.where(sin > SLERP_EPS, (linear * omega).sin_().div_(sin), linear)
    return coefficients.tensor_split(2, dim=-1)


def slerp(a: Tensor, b: Tensor, t: Tensor) -> Tensor:
    """Spherical interpolation of rows of a and b [k, D] with ratios t ([k, D] or [k, 1]).

    See `slerp_coefficients`; where sin(Omega) <= 1e-6 the mix is linear: (1 - t) a + t b.
    """
    coef_a, coef_b = slerp_coefficients(a, b, t)
    return (coef_a * a).add_(coef_b * b)


def split_point_ratios(weight: Tensor, split: Tensor | None, dim: int) -> Tensor:
    """Mixing ratios t [k, D]: w before the split point, 1 - w from it on.

    Without a split point (the ablation) t = w everywhere, returned as [k, 1].
    The entry-by-entry form of the definition; `crossover` uses its two values
    directly (the tests check the two against each other).
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
    The ratio takes two values only (w before the split, 1 - w from it on), so the
    sines are evaluated once per child and each entry just picks its pair of weights.
    """
    k, dim = a.shape
    split = None
    if use_split_point:
        split = torch.randint(0, dim, (k,), generator=generator, device=a.device)
    weight = torch.rand(k, generator=generator, device=a.device, dtype=a.dtype).unsqueeze(-1)
    if split is None:
        return slerp(a, b, weight)
    coef_a, coef_b = slerp_coefficients(a, b, torch.cat([weight, 1 - weight], dim=-1))
    if a.device.type == "cpu":
        return children_by_slices(a, b, coef_a, coef_b, split.tolist())
    return children_by_mask(a, b, coef_a, coef_b, split)


def children_by_mask(a: Tensor, b: Tensor, coef_a: Tensor, coef_b: Tensor, split: Tensor) -> Tensor:
    """c_a a + c_b b with the weights [k, 2] of each child taken before / from its split point [k]."""
    before = torch.arange(a.shape[1], device=a.device) < split.unsqueeze(-1)
    child = torch.where(before, coef_a[:, :1], coef_a[:, 1:]).mul_(a)
    return child.add_(torch.where(before, coef_b[:, :1], coef_b[:, 1:]).mul_(b))


def children_by_slices(a: Tensor, b: Tensor, coef_a: Tensor, coef_b: Tensor, split: list[int]) -> Tensor:
    """`children_by_mask` with host split points: two slices per child, the same products and sums."""
    child = torch.empty_like(a)
    for out, a_row, b_row, cut, weights_a, weights_b in zip(child, a, b, split, coef_a.tolist(), coef_b.tolist()):
        for part, columns in enumerate((slice(0, cut), slice(cut, None))):
            torch.mul(a_row[columns], weights_a[part], out=out[columns]).add_(b_row[columns] * weights_b[part])
    return child


def mutate(x: Tensor, sigma: float, generator: torch.Generator) -> Tensor:
    """x + N(0, sigma^2) noise (a no-op for sigma = 0)."""
    if sigma == 0:
        return x
    # normal_(0, sigma) draws the same numbers as sigma * randn, in one kernel.
    return torch.empty_like(x).normal_(0.0, sigma, generator=generator).add_(x)


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
    valid: Tensor | None = None,
) -> Tensor:
    """Insert a child by the replace-the-worst rule, in place.

    If the dropped row is the child, or `valid` (a 0-dim bool) is False, the
    archive is left as it was. Returns the dropped index (0-dim tensor;
    archive size P means the child was rejected by the rule).
    """
    worst = worst_after_insert(scores, child_scores, alpha, capacity)
    insert = insert_on_host if archive.device.type == "cpu" else insert_on_device
    insert(archive, scores, occupied, child, child_scores, worst, valid)
    return worst


def insert_on_device(
    archive: Tensor, scores: Tensor, occupied: Tensor, child: Tensor, child_scores: Tensor, worst: Tensor, valid: Tensor | None
) -> None:
    """Write the child into row `worst` unless it is P or `valid` is False, without a host sync."""
    accept = worst < archive.shape[0]
    if valid is not None:
        accept = accept & valid
    slot = worst.clamp(max=archive.shape[0] - 1).reshape(1)
    # 1-dim index tensors throughout: a 0-dim one would be read back to the host.
    archive.index_copy_(0, slot, torch.where(accept, child.unsqueeze(0), archive.index_select(0, slot)))
    scores.index_copy_(0, slot, torch.where(accept, child_scores.unsqueeze(0), scores.index_select(0, slot)))
    occupied.index_copy_(0, slot, occupied.index_select(0, slot) | accept)


def insert_on_host(
    archive: Tensor, scores: Tensor, occupied: Tensor, child: Tensor, child_scores: Tensor, worst: Tensor, valid: Tensor | None
) -> None:
    """`insert_on_device` with the row read back: three row copies (for CPU tensors)."""
    row = int(worst)
    if row < archive.shape[0] and (valid is None or bool(valid)):
        archive[row] = child
        scores[row] = child_scores
        occupied[row] = True
