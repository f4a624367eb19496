"""The M2N2 operators as pure tensor functions (see docs/ALGORITHM.md for the formulas).

Every function works on tensors already on the device and never reads a value
back to the host, so a step of the algorithm costs no synchronisation (the
one exception, `combine_by_slices`, takes host split points and is chosen by
the archive's storage, `Archive.host_side`). Random numbers come from an
explicit `torch.Generator`. At the paper's sizes a step is a few dozen small
kernels, so each function uses as few as the formula allows.
"""

from __future__ import annotations

import torch
from torch import Tensor

from m2n2_lightning.strategies.mixture import mix

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


def shift_scores(scores: Tensor, occupied: Tensor) -> Tensor:
    """Scores [P, N] minus, per example, the lowest score among the occupied rows (section 4.3 of the
    paper, to sharpen small differences of continuous scores); unoccupied rows stay 0."""
    lowest = torch.where(occupied.unsqueeze(1), scores, torch.inf).amin(dim=0)
    lowest = torch.where(torch.isfinite(lowest), lowest, 0.0)
    return torch.where(occupied.unsqueeze(1), scores - lowest, 0.0)


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
    total = cdf[:, -1:].contiguous()  # (searchsorted copies, and warns, for a non-contiguous one)
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


#: Columns summed at a time when 16-bit vectors' dot products are taken in float64.
DOT_CHUNK = 1 << 20


def dot_products(a: Tensor, b: Tensor) -> Tensor:
    """[3, k]: <a, b>, |a|^2 and |b|^2 per row pair of a, b [k, D]; 16-bit rows are summed in float64,
    column chunk by column chunk (their own precision would round a cosine near 1 to 1)."""
    if a.element_size() >= 4:
        return torch.stack([torch.linalg.vecdot(a, b), torch.linalg.vecdot(a, a), torch.linalg.vecdot(b, b)])
    sums = torch.zeros(3, a.shape[0], dtype=torch.float64, device=a.device)
    for start in range(0, a.shape[-1], DOT_CHUNK):
        x, y = a[..., start : start + DOT_CHUNK].double(), b[..., start : start + DOT_CHUNK].double()
        sums += torch.stack([torch.linalg.vecdot(x, y), torch.linalg.vecdot(x, x), torch.linalg.vecdot(y, y)])
    return sums


def cosine(a: Tensor, b: Tensor) -> Tensor:
    """cos(Omega) = <a/|a|, b/|b|> per row pair of a, b [k, D] (one angle for the whole vectors)."""
    if a.element_size() >= 4:  # the reference's formula, in the members' dtype
        return torch.linalg.vecdot(a, b) / (torch.linalg.vector_norm(a, dim=-1) * torch.linalg.vector_norm(b, dim=-1))
    ab, aa, bb = dot_products(a, b)
    return ab / (aa.sqrt() * bb.sqrt())


def slerp_weights(cos: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """Weights (c_a, c_b) [k, m] of the SLERP child c_a a + c_b b, for cos(Omega) [k] and ratios t [k, m].

    cos is clipped to [-1, 1]; c_a = sin((1 - t) Omega) / sin(Omega), c_b = sin(t Omega) / sin(Omega);
    where sin(Omega) <= 1e-6 (or undefined) the mix is linear: c_a = 1 - t, c_b = t.
    """
    omega = cos.clamp(-1.0, 1.0).arccos_().unsqueeze(-1)
    sin = omega.sin()
    linear = torch.cat([1 - t, t], dim=-1)  # c_a then c_b, in one tensor: half the small kernels
    coefficients = torch.where(sin > SLERP_EPS, (linear * omega).sin_().div_(sin), linear)
    return coefficients.tensor_split(2, dim=-1)


def slerp(a: Tensor, b: Tensor, t: Tensor) -> Tensor:
    """Spherical interpolation of rows of a and b [k, D] with ratios t ([k, D] or [k, 1]).

    See `slerp_weights`; where sin(Omega) <= 1e-6 the mix is linear: (1 - t) a + t b.
    """
    coef_a, coef_b = slerp_weights(cosine(a, b), t)
    return (coef_a * a).add_(coef_b * b)


def crossover_draws(
    num_children: int, num_params: int, generator: torch.Generator, use_split_point: bool, like: Tensor
) -> tuple[Tensor | None, Tensor]:
    """The random part of a split-point SLERP: split points k ~ U{0..D-1} [m] (None without
    a split point) and then mixing ratios w ~ U(0, 1) [m, 1] in the dtype of `like`."""
    split = None
    if use_split_point:
        split = torch.randint(0, num_params, (num_children,), generator=generator, device=like.device)
    weight = torch.rand(num_children, generator=generator, device=like.device, dtype=like.dtype).unsqueeze(-1)
    return split, weight


def combine_by_mask(a: Tensor, b: Tensor, coef_a: Tensor, coef_b: Tensor, split: Tensor) -> Tensor:
    """c_a a + c_b b with the weights [k, 2] of each child taken before / from its split point [k]."""
    before = torch.arange(a.shape[1], device=a.device) < split.unsqueeze(-1)
    if a.element_size() < 4:  # 16-bit members: weights and sums in float32, rounded once
        coef_a, coef_b = coef_a.float(), coef_b.float()
        child = torch.where(before, coef_a[:, :1], coef_a[:, 1:]).mul_(a)
        return child.add_(torch.where(before, coef_b[:, :1], coef_b[:, 1:]).mul_(b)).to(a.dtype)
    child = torch.where(before, coef_a[:, :1], coef_a[:, 1:]).mul_(a)
    return child.add_(torch.where(before, coef_b[:, :1], coef_b[:, 1:]).mul_(b))


def combine_by_slices(a: Tensor, b: Tensor, coef_a: Tensor, coef_b: Tensor, split: list[int]) -> Tensor:
    """`combine_by_mask` with host split points: two slices per child, the same products and sums."""
    child = torch.empty_like(a)
    for out, a_row, b_row, cut, weights_a, weights_b in zip(child, a, b, split, coef_a.tolist(), coef_b.tolist()):
        for part, columns in enumerate((slice(0, cut), slice(cut, None))):
            mix_pair(a_row[columns], b_row[columns], weights_a[part], weights_b[part], out[columns])
    return child


def mix_pair(a: Tensor, b: Tensor, weight_a: float, weight_b: float, out: Tensor) -> Tensor:
    """out = weight_a a + weight_b b: in the members' dtype for 32 and 64 bits (the reference's arithmetic),
    in float32 rounded once for 16-bit members (`mixture.mix`: rounding each product would cost 3 roundings)."""
    if a.element_size() < 4:
        return mix([a, b], [weight_a, weight_b], out)
    return torch.mul(a, weight_a, out=out).add_(b * weight_b)


def mutate(x: Tensor, sigma: float, generator: torch.Generator) -> Tensor:
    """x + N(0, sigma^2) noise (a no-op for sigma = 0)."""
    if sigma == 0:
        return x
    # normal_(0, sigma) draws the same numbers as sigma * randn, in one kernel.
    return torch.empty_like(x).normal_(0.0, sigma, generator=generator).add_(x)


def worst_after_insert(scores: Tensor, new_scores: Tensor, alpha: float, capacity: Tensor | None = None) -> Tensor:
    """Index of the row dropped when `new_scores` [N] joins `scores` [P, N] (replace the worst).

    Niche fitness is recomputed over the P + 1 rows; the lowest fitness is dropped,
    the first one on ties. Returns a 0-dim tensor; P means the newcomer itself.
    """
    extended = torch.cat([scores, new_scores.unsqueeze(0)])
    fitness, _ = niche_fitness(extended, alpha, capacity)
    return fitness.argmin()
