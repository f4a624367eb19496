"""An archive whose members are mixtures of the seed models: memory that does not grow with P x D.

When K seed models are merged without mutation (docs/ALGORITHM.md, "Initialisation",
"From pre-trained models"), every child is c_a a + c_b b with weights that
take one value per label of its pieces (one before the split point and one
from it on, `chromosomes.py`). By induction every member is, coordinate by
coordinate, sum_k C[s, k] seed_k, with a coefficient row C[s] that is constant
on each segment s between the split points of its ancestry. A member is stored
as that *form*: its breakpoints (int64 [B], strictly increasing in (0, D)) and
its coefficient table (float64 [B + 1, K]), both on the host. The seeds [K, D]
are held once, as a buffer that moves with the strategy but is not saved: a
checkpoint holds the forms (kilobytes) and a fingerprint of the seeds, which a
resume checks against the seeds it is given.

The SLERP angle needs <a, b>, |a|^2 and |b|^2 (docs/ALGORITHM.md, "Crossover"). Over a
segment where a and b have rows A and B they are A G B, A G A and B G B with
G the K x K Gram matrix of the seeds over that segment. The Gram of a segment
is always computed the same way (directly, in float64, in fixed chunks), so
the cache of Grams by segment changes the cost and never the numbers, and a
resumed run continues bit for bit. A child is materialised only to be scored.
"""

from __future__ import annotations

import zlib
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from m2n2_lightning.strategies import operators as ops
from m2n2_lightning.strategies.chromosomes import Piece

#: A member: breakpoints int64 [B] and coefficient table float64 [B + 1, K], on the host.
Form = tuple[Tensor, Tensor]
#: Columns of the seeds cast to float64 at a time when a Gram is computed (bounds the temporary).
GRAM_CHUNK = 1 << 18
#: Segments whose Gram matrices are kept (least recently used dropped first).
GRAM_CACHE_SIZE = 1 << 16
#: Coordinates of the seeds that enter the fingerprint, and of a told child that are checked.
FINGERPRINT_POINTS, CHECK_POINTS = 64, 8


def seed_fingerprint(seeds: Tensor) -> str:
    """Shape and a CRC of the seeds' values at evenly spaced coordinates: the same seeds give the same
    string on any device; other seeds (another fine-tune, another dtype) almost surely another."""
    positions = torch.linspace(0, seeds.shape[1] - 1, FINGERPRINT_POINTS).long().to(seeds.device)
    values = seeds.index_select(1, positions).to(torch.float64).cpu()
    return f"{seeds.shape[0]}x{seeds.shape[1]}:{zlib.crc32(values.numpy().tobytes()):08x}"


def unit_form(k: int, num_seeds: int) -> Form:
    """Seed k as a form: no breakpoint, the unit row e_k."""
    return torch.zeros(0, dtype=torch.long), torch.eye(num_seeds, dtype=torch.float64)[k : k + 1]


def merge_equal_rows(cuts: Tensor, table: Tensor) -> Form:
    """The same member with the breakpoints between equal rows removed (the shortest form)."""
    keep = torch.cat([torch.ones(1, dtype=torch.bool), (table[1:] != table[:-1]).any(dim=1)])
    return cuts[keep[1:]], table[keep]


class CoefficientArchive(nn.Module):
    """P members stored as forms over K seeds [K, D], with their scores [P, N] and occupancy [P].

    The interface is `Archive`'s. `crossover`, `crossover_by_pieces` and `copies`
    return dense children [m, D] to be scored and remember their forms; `write`
    stores the form of the row `made` of that last batch (after `allocate`, the
    last batch is the seeds themselves). It refuses a member it did not make.
    The given seed vectors are kept by reference (the strategy's `init_models`)
    so that a change of dtype casts them afresh, as the dense archive would.
    """

    def __init__(
        self, capacity: int, num_params: int, seeds: Sequence[Tensor], dtype: torch.dtype = torch.float32
    ) -> None:
        super().__init__()
        if len(seeds) < 2 or any(seed.shape != (num_params,) for seed in seeds):
            raise ValueError(f"seeds must be two or more vectors of D = {num_params} parameters")
        self.capacity = capacity
        self.num_params = num_params
        self._sources = list(seeds)
        self.register_buffer("seeds", self._stack(dtype, torch.device("cpu")), persistent=False)
        self.register_buffer("scores", torch.zeros(capacity, 0))
        self.register_buffer("occupied", torch.zeros(capacity, dtype=torch.bool))
        self.forms: list[Form | None] = [None] * capacity
        self._made: list[Form] = []
        self._grams: OrderedDict[tuple[int, int], Tensor] = OrderedDict()
        self._scratch: Tensor | None = None

    @property
    def num_seeds(self) -> int:
        return self.seeds.shape[0]

    @property
    def num_resources(self) -> int:
        return self.scores.shape[1]

    @property
    def like(self) -> Tensor:
        """A tensor of the children's dtype and device (for random draws and casts)."""
        return self.seeds

    def allocate(self, num_resources: int) -> None:
        """Fix N: all-zero scores [P, N] for the (still empty) slots; the seeds become the last batch made."""
        self.scores = self.scores.new_zeros(self.capacity, num_resources)
        self._made = [unit_form(k, self.num_seeds) for k in range(self.num_seeds)]

    def rows(self, index: Tensor) -> Tensor:
        """Members [m, D] at the slots `index` [m], materialised."""
        return self._materialise([self.forms[i] for i in index.tolist()])

    def copies(self, index: Tensor) -> Tensor:
        """Children [m, D] that copy the members at `index` (the "no crossover" ablation)."""
        children = self.rows(index)
        self._made = [self.forms[i] for i in index.tolist()]
        return children

    def crossover(self, first: Tensor, second: Tensor, split: Tensor | None, weight: Tensor) -> Tensor:
        """The children of `Archive.crossover`: ratio w before the split point, 1 - w from it on, one angle."""
        d = self.num_params
        if split is None:
            return self.crossover_by_pieces(first, second, [[(0, d, 0)]] * len(first), weight, per_part=False)
        pieces = [[(0, cut, 0), (cut, d, 1)] for cut in split.tolist()]
        return self.crossover_by_pieces(first, second, pieces, torch.cat([weight, 1 - weight], dim=-1), False)

    def crossover_by_pieces(
        self, first: Tensor, second: Tensor, pieces: Sequence[Sequence[Piece]], ratios: Tensor, per_part: bool
    ) -> Tensor:
        """The children of `Archive.crossover_by_pieces`, made as forms and then materialised."""
        ratios = ratios.detach().to("cpu", torch.float64)
        made = []
        for i, (a, b) in enumerate(zip(first.tolist(), second.tolist())):
            made.append(self._child(self.forms[a], self.forms[b], pieces[i], ratios[i], per_part))
        self._made = made
        return self._materialise(made)

    def _child(self, form_a: Form, form_b: Form, pieces: Sequence[Piece], t: Tensor, per_part: bool) -> Form:
        """The form of the SLERP child of a and b: on each segment c_a[label] A + c_b[label] B.

        Its segments are those of a, b and the pieces together; on each one the
        dot products come from the seeds' Gram (docs/ALGORITHM.md, "Crossover": cos Omega).
        """
        pieces = [piece for piece in pieces if piece[1] > piece[0]]
        piece_starts = torch.tensor([start for start, _, _ in pieces], dtype=torch.long)
        cuts = torch.unique(torch.cat([form_a[0], form_b[0], piece_starts[1:]]))
        starts = torch.cat([piece_starts[:1], cuts])
        rows_a = form_a[1][torch.searchsorted(form_a[0], starts, right=True)]
        rows_b = form_b[1][torch.searchsorted(form_b[0], starts, right=True)]
        labels = torch.tensor([label for _, _, label in pieces])[torch.searchsorted(piece_starts, starts, right=True) - 1]
        stops = [*cuts.tolist(), self.num_params]
        grams = torch.stack([self._gram(start, stop) for start, stop in zip(starts.tolist(), stops)])
        pairs = ((rows_a, rows_b), (rows_a, rows_a), (rows_b, rows_b))  # <a, b>, |a|^2, |b|^2 per segment
        products = torch.stack([torch.einsum("sk,skl,sl->s", x, grams, y) for x, y in pairs])
        if per_part:  # equation 2: one angle per label, from that label's sub-vectors
            sums = products.new_zeros(3, len(t)).index_add_(1, labels, products)
        else:  # the reference: one angle between the whole vectors, for every label
            sums = products.sum(dim=1, keepdim=True).expand(3, len(t))
        coef_a, coef_b = ops.slerp_weights(sums[0] / (sums[1].sqrt() * sums[2].sqrt()), t.unsqueeze(-1))
        return merge_equal_rows(cuts, coef_a[labels] * rows_a + coef_b[labels] * rows_b)

    def _gram(self, start: int, stop: int) -> Tensor:
        """G [K, K] = seeds[:, start:stop] seeds[:, start:stop]^T in float64 (host), cached by segment."""
        key = (start, stop)
        gram = self._grams.get(key)
        if gram is not None:
            self._grams.move_to_end(key)
            return gram
        gram = torch.zeros(self.num_seeds, self.num_seeds, dtype=torch.float64, device=self.seeds.device)
        for chunk in range(start, stop, GRAM_CHUNK):
            block = self.seeds[:, chunk : min(chunk + GRAM_CHUNK, stop)]
            if block.dtype != torch.float64:
                block = self._float64_block()[:, : block.shape[1]].copy_(block)
            gram.addmm_(block, block.T)
        gram = gram.cpu()
        self._grams[key] = gram
        if len(self._grams) > GRAM_CACHE_SIZE:
            self._grams.popitem(last=False)
        return gram

    def _float64_block(self) -> Tensor:
        """One float64 [K, GRAM_CHUNK] scratch for the casts, made once: a temporary made and freed per
        chunk would raise the allocator's mmap threshold and then fragment the heap, a cost that grows
        with the number of members."""
        if self._scratch is None:
            self._scratch = self.seeds.new_empty(self.num_seeds, GRAM_CHUNK, dtype=torch.float64)
        return self._scratch

    def _materialise(self, forms: Sequence[Form | None]) -> Tensor:
        """Dense members [m, D] of the seeds' dtype and device: sum_k C[s, k] seed_k on every segment s
        (zeros for an empty slot, as in the dense archive)."""
        out = self.seeds.new_empty(len(forms), self.num_params)
        for row, form in zip(out, forms):
            if form is None:
                row.zero_()
                continue
            cuts, table = form
            bounds = [0, *cuts.tolist(), self.num_params]
            for start, stop, coefficients in zip(bounds, bounds[1:], table.tolist()):
                part = torch.mul(self.seeds[0, start:stop], coefficients[0], out=row[start:stop])
                for k in range(1, self.num_seeds):
                    part.add_(self.seeds[k, start:stop], alpha=coefficients[k])
        return out

    def _check_made(self, made: int | None, member: Tensor) -> Form:
        """The form of row `made` of the last batch, after checking a few coordinates of `member` against it."""
        if made is None or not 0 <= made < len(self._made):
            raise ValueError(
                f"a coefficient archive stores only the children it made (row {made} of a batch of {len(self._made)}): "
                "tell the candidates of the last ask(), in order, or use storage='dense'"
            )
        cuts, table = self._made[made]
        positions = torch.linspace(0, self.num_params - 1, CHECK_POINTS).long()
        coefficients = table[torch.searchsorted(cuts, positions, right=True)]
        values = self.seeds.index_select(1, positions.to(self.seeds.device)).to("cpu", torch.float64).T
        expected = (coefficients * values).sum(dim=1)
        got = member.detach().index_select(0, positions.to(member.device)).to("cpu", torch.float64)
        eps = max(torch.finfo(member.dtype).eps, torch.finfo(self.seeds.dtype).eps)
        if ((got - expected).abs() > 16 * self.num_seeds * eps * (coefficients.abs() * values.abs()).sum(dim=1)).any():
            raise ValueError(f"the member told as row {made} of the last batch is not the child made there")
        return self._made[made]

    @torch.no_grad()
    def write(
        self, slot: Tensor, member: Tensor, member_scores: Tensor, accept: Tensor | None = None, made: int | None = None
    ) -> None:
        """Put the form of `member` (row `made` of the last batch) and its scores [N] into `slot`.

        Nothing changes when `slot` is P or more (the newcomer lost) or `accept` is False.
        """
        form = self._check_made(made, member)
        row = int(slot)
        if row < self.capacity and (accept is None or bool(accept)):
            self.forms[row] = form
            self.scores[row] = member_scores
            self.occupied[row] = True

    def get_extra_state(self) -> dict[str, Any]:
        """The forms packed in three tensors (breakpoints per slot, -1 for an empty one) and the seeds' fingerprint."""
        forms = [form for form in self.forms if form is not None]
        empty = torch.zeros(0, self.num_seeds, dtype=torch.float64)
        return {
            "seeds": seed_fingerprint(self.seeds),
            "counts": torch.tensor([-1 if form is None else len(form[0]) for form in self.forms]),
            "cuts": torch.cat([form[0] for form in forms]) if forms else torch.zeros(0, dtype=torch.long),
            "tables": torch.cat([form[1] for form in forms]) if forms else empty,
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        current = seed_fingerprint(self.seeds)
        if state["seeds"] != current:
            raise ValueError(
                f"the checkpoint's archive holds mixtures of other seed models (fingerprint {state['seeds']}, "
                f"these seeds {current}): resume with the same init_models, in the same order and dtype"
            )
        cuts, tables = state["cuts"].cpu(), state["tables"].cpu()
        self.forms, offset, row = [], 0, 0
        for count in state["counts"].tolist():
            if count < 0:
                self.forms.append(None)
                continue
            self.forms.append((cuts[offset : offset + count], tables[row : row + count + 1]))
            offset, row = offset + count, row + count + 1
        self._made = []

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # N is fixed when a run starts: an archive that has not started takes the saved one.
        saved = state_dict.get(prefix + "scores")
        if saved is not None and self.num_resources == 0 and saved.dim() == 2 and saved.shape[0] == self.capacity:
            self.allocate(saved.shape[1])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _stack(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        """The seeds [K, D] cast from the given vectors, as the dense archive casts its initial members."""
        return torch.stack([seed.to(device, dtype) for seed in self._sources])

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> CoefficientArchive:
        # The Grams are of the seeds as held: a new dtype or device computes them again.
        self._grams.clear()
        self._scratch = None
        dtype = self.seeds.dtype
        super()._apply(fn, *args, **kwargs)
        if self.seeds.dtype != dtype:  # cast from the given seeds, not from the buffer's rounded values
            self.seeds = self._stack(self.seeds.dtype, self.seeds.device)
        return self
