"""Members as mixtures of the seed models: the form of a member and the one function that writes its values.

When K seed models are merged without mutation, every child of a SLERP is
c_a a + c_b b, so every member is, coordinate by coordinate, sum_k C[s, k]
seed_k, with a coefficient row C[s] that is constant on each segment s
between breakpoints (docs/ALGORITHM.md, "Crossover"). Its *form* is
`(cuts, table)`: breakpoints int64 [B], strictly increasing in (0, D), and
coefficients float64 [B + 1, K] (row s holds segment s's).

`write_form` is the only place that turns a form into values. The coefficient
archive (children written into a module's parameters, or dense rows), the
recipe of a saved merge and its rebuild all call it, on any ranges they like:
the arithmetic of one coordinate never depends on the range or the chunk it
is written in, so every path gives the same bits.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

#: A member: breakpoints int64 [B] and coefficient table float64 [B + 1, K], on the host.
Form = tuple[Tensor, Tensor]
#: Coordinates mixed at a time: two float32 temporaries of 1 MiB, near a core's cache, in few
#: kernel calls (timings against other sizes: benchmarks/RESULTS.md, "Merging at real size").
MIX_CHUNK = 1 << 18
#: Up to this many coordinates a mix is made in a few small calls (the per-call cost of small parameters).
SMALL = 1 << 14
#: Coordinates read at a time from seeds that stay in their files (4 MiB of bf16 a seed).
READ_SPAN = 1 << 21


def unit_form(k: int, num_seeds: int) -> Form:
    """Seed k as a form: no breakpoint, the unit row e_k."""
    return torch.zeros(0, dtype=torch.long), torch.eye(num_seeds, dtype=torch.float64)[k : k + 1]


def merge_equal_rows(cuts: Tensor, table: Tensor) -> Form:
    """The same member with the breakpoints between equal rows removed (the shortest form)."""
    keep = torch.cat([torch.ones(1, dtype=torch.bool), (table[1:] != table[:-1]).any(dim=1)])
    return cuts[keep[1:]], table[keep]


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 where any tensor is float64, else float32 (bf16 / fp16 seeds are mixed in float32)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def mix(parts: Sequence[Tensor | None], coefficients: Sequence[float], out: Tensor) -> Tensor:
    """out = sum_k coefficients[k] parts[k], each coordinate computed alone, in `compute_dtype`.

    Every part is widened, multiplied by its coefficient and added in that
    order (separate kernels: no fused multiply-add), then rounded once to
    `out`'s dtype (three kernels a chunk for two parts); parts
    with coefficient 0 are skipped (and may be None: a seed's own row is an exact copy). The
    result does not depend on how a range is cut into calls.
    """
    used = [(part, float(c)) for part, c in zip(parts, coefficients) if c != 0]
    if not used:
        return out.zero_()
    if len(used) == 1 and used[0][1] == 1.0:
        return out.copy_(used[0][0])
    dtype = compute_dtype(out, *(part for part, _ in used))
    flat_out = out.view(-1)
    if flat_out.numel() <= SMALL:  # the same arithmetic in fewer calls: widened copies, scalar products
        acc = used[0][0].view(-1).to(out.device, dtype, copy=True).mul_(used[0][1])
        for part, c in used[1:]:
            acc.add_(part.view(-1).to(out.device, dtype, copy=True).mul_(c))
        flat_out.copy_(acc)
        return out
    # one-element weights take part in type promotion: a 16-bit part is widened exactly, then multiplied in `dtype`
    weights = [torch.tensor([c], dtype=dtype, device=out.device) for _, c in used]
    size = min(out.numel(), MIX_CHUNK)
    total = torch.empty(size, dtype=dtype, device=out.device)
    term = torch.empty(size, dtype=dtype, device=out.device)
    last = len(used) - 1
    for start in range(0, flat_out.numel(), MIX_CHUNK):
        stop = min(start + MIX_CHUNK, flat_out.numel())
        acc, scratch = total[: stop - start], term[: stop - start]
        for i, ((part, _), weight) in enumerate(zip(used, weights)):
            values = part.view(-1)[start:stop].to(out.device)
            if i == 0:  # with one part, straight into out (rounded once from `dtype`)
                torch.mul(values, weight, out=acc if last else flat_out[start:stop])
                continue
            torch.mul(values, weight, out=scratch)
            if i < last:
                acc.add_(scratch)
            else:  # the last sum rounded once from `dtype` into out
                torch.add(acc, scratch, out=flat_out[start:stop])
    return out


def seed_segment(seeds: Any, k: int, start: int, stop: int) -> Tensor:
    """Seed k's values at [start, stop): a view of a [K, D] tensor or of the k-th of K tensors, or a read from
    seeds that stay in their files (an object with `segment(k, start, stop)`, `merging.seed_store.SeedFiles`)."""
    if hasattr(seeds, "segment"):
        return seeds.segment(k, start, stop)
    return seeds[k].view(-1)[start:stop]


def write_form(seeds: Any, form: Form, start: int, stop: int, out: Tensor, offset: int = 0) -> Tensor:
    """Coordinates [start, stop) of the member `form` into `out` (stop - start elements, any shape and dtype).

    `seeds` holds coordinates [offset, offset + len) of each seed k (a [K, D]
    tensor or K flat tensors: the whole vectors with offset 0, or one
    parameter's tensors with its offset in the flat vector), or reads them
    (`seed_segment`: then READ_SPAN coordinates at a time). Segments of the
    form are cut at the range's ends.
    """
    cuts, table = form
    flat_out = out.view(-1)
    if flat_out.numel() != stop - start:
        raise ValueError(f"out holds {flat_out.numel()} values for the range [{start}, {stop})")
    cut_list = cuts.tolist()
    first, last = bisect.bisect_right(cut_list, start), bisect.bisect_right(cut_list, max(start, stop - 1))
    bounds = [start, *cut_list[first:last], stop]
    rows = table[first : last + 1].tolist()
    span = READ_SPAN if hasattr(seeds, "segment") else stop - start
    for begin, end, coefficients in zip(bounds, bounds[1:], rows):
        for lo in range(begin, end, max(span, 1)):
            hi = min(end, lo + span)
            parts = [seed_segment(seeds, k, lo - offset, hi - offset) if c else None for k, c in enumerate(coefficients)]
            mix(parts, coefficients, flat_out[lo - start : hi - start])
    return out


class SeedVectors(list):
    """Seed models as flat [D] vectors, with their [K, D] stack when they came as one (no copy is then made)
    and the SHA-256 digest of each seed's tensors (computed while they were read, or here from the values)."""

    def __init__(self, vectors: Sequence[Tensor], stacked: Tensor | None = None, digests: Sequence[str] | None = None):
        super().__init__(vectors)
        self.stacked = stacked
        self.digests = None if digests is None else list(digests)

    def stack(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        """The seeds [K, D] in `dtype` on `device`: the given stack itself when it already is, else a new one."""
        stacked = self.stacked
        if stacked is not None and stacked.dtype == dtype and stacked.device == device and len(stacked) == len(self):
            return stacked
        return torch.stack([vector.to(device, dtype) for vector in self])

    def fingerprint(self) -> str:
        """One SHA-256 over every seed's digest: the same seeds, in the same order, give the same string."""
        if self.digests is None:
            self.digests = [tensor_digest(vector) for vector in self]
        return combined_digest(self.digests)


def combined_digest(digests: Sequence[str]) -> str:
    """One SHA-256 over the seeds' digests, in order."""
    return hashlib.sha256(" ".join(digests).encode()).hexdigest()


def tensor_digest(tensor: Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes."""
    data = tensor.detach().contiguous().cpu()
    digest = hashlib.sha256(f"{data.dtype}{tuple(data.shape)}".encode())
    digest.update(data.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()
