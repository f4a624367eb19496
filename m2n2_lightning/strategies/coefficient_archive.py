"""An archive whose members are mixtures of the seed models: memory that does not grow with P x D.

When K seed models are merged without mutation (docs/ALGORITHM.md, "Initialisation",
"From pre-trained models"), every member is a *form* over the seeds
(`mixture.py`): breakpoints and a coefficient table, kilobytes on the host.
The seeds [K, D] are held once, in their own dtype (or the `dtype` asked
for), as a buffer that moves with the strategy but is not saved: a
checkpoint holds the forms and the SHA-256 fingerprint of the seeds, which a
resume checks against the seeds it is given. Children are `Children` of
forms: written into a module's parameters only when scored.

The SLERP angle needs <a, b>, |a|^2 and |b|^2 (docs/ALGORITHM.md, "Crossover"). Over a
segment where a and b have rows A and B they are A G B, A G A and B G B with
G the K x K Gram matrix of the seeds over that segment (`SeedGrams`: float64,
whole blocks from prefix sums made once, so an ask costs O(segments x
block) and not O(D)). A segment's Gram is a fixed function of its ends, so
a resumed run continues bit for bit.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from m2n2_lightning.strategies import operators as ops
from m2n2_lightning.strategies.children import Children
from m2n2_lightning.strategies.chromosomes import Piece
from m2n2_lightning.strategies.mixture import Form, SeedVectors, merge_equal_rows, seed_segment, unit_form
from m2n2_lightning.strategies.score_table import ScoreTable

#: Coordinates per block of the seeds' prefix Gram sums (and the largest partial block computed directly).
GRAM_BLOCK = 1 << 16
#: Blocks of each seed fetched at a time for the prefix sums (a read of 4 MiB of bf16 from seed files).
READ_BLOCKS = 32
#: Segments whose Gram matrices are kept (least recently used dropped first).
GRAM_CACHE_SIZE = 1 << 12


class SeedGrams:
    """G(start, stop) = X X^T [K, K] in float64 for seeds X = seeds[:, start:stop], any range of the flat vector.

    `seeds` is a [K, D] tensor or seeds read on demand (`mixture.seed_segment`).
    """

    def __init__(self, seeds: Any) -> None:
        self.seeds = seeds
        self._prefix: Tensor | None = None  # [blocks + 1, K, K]: sums over the whole blocks before each block
        self._cache: OrderedDict[tuple[int, int], Tensor] = OrderedDict()
        self._scratch: Tensor | None = None

    def __call__(self, start: int, stop: int) -> Tensor:
        key = (start, stop)
        gram = self._cache.get(key)
        if gram is None:
            first, last = -(-start // GRAM_BLOCK), stop // GRAM_BLOCK
            if first >= last:
                gram = self._direct(start, stop)
            else:
                prefix = self.prefix()
                whole = prefix[last] - prefix[first]
                gram = self._direct(start, first * GRAM_BLOCK) + whole + self._direct(last * GRAM_BLOCK, stop)
            self._cache[key] = gram
            if len(self._cache) > GRAM_CACHE_SIZE:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        return gram

    def prefix(self) -> Tensor:
        """The prefix sums of the whole blocks' Grams (one pass over the seeds, the first time: READ_BLOCKS
        blocks of each seed fetched at a time, each block's Gram its own product)."""
        if self._prefix is None:
            num_seeds, blocks = self.seeds.shape[0], self.seeds.shape[1] // GRAM_BLOCK
            # preallocated: small results made between the reads would pin freed read buffers in the heap
            grams = torch.zeros(blocks + 1, num_seeds, num_seeds, dtype=torch.float64)
            for group in range(0, blocks, READ_BLOCKS):
                stop = min(blocks, group + READ_BLOCKS) * GRAM_BLOCK
                rows = [seed_segment(self.seeds, k, group * GRAM_BLOCK, stop) for k in range(num_seeds)]
                for index, begin in enumerate(range(0, stop - group * GRAM_BLOCK, GRAM_BLOCK), start=group + 1):
                    grams[index] = self._product([row[begin : begin + GRAM_BLOCK] for row in rows])
                del rows  # before the next group is read
            self._prefix = grams.cumsum(dim=0)
        return self._prefix

    def _direct(self, start: int, stop: int) -> Tensor:
        """X X^T over [start, stop) in float64, GRAM_BLOCK columns at a time (host result)."""
        num_seeds = self.seeds.shape[0]
        gram = torch.zeros(num_seeds, num_seeds, dtype=torch.float64)
        for chunk in range(start, stop, GRAM_BLOCK):
            end = min(chunk + GRAM_BLOCK, stop)
            gram += self._product([seed_segment(self.seeds, k, chunk, end) for k in range(num_seeds)])
        return gram

    def _product(self, rows: list[Tensor]) -> Tensor:
        """X X^T [K, K] in float64 of K rows of at most GRAM_BLOCK values (host result)."""
        if self._scratch is None:  # one scratch, made once: a temporary per block fragments the heap
            self._scratch = torch.empty(len(rows), GRAM_BLOCK, dtype=torch.float64, device=rows[0].device)
        block = self._scratch[:, : rows[0].numel()]
        for target, row in zip(block, rows):
            target.copy_(row)
        return (block @ block.T).cpu()


class CoefficientArchive(ScoreTable):
    """P members stored as forms over K seeds [K, D] (and, from `ScoreTable`, their scores [P, N] and occupancy [P]).

    The interface is `Archive`'s: `crossover`, `crossover_by_pieces`, `copies`
    and `member_children` return `Children` of forms, and `write` stores the
    form of a told child by handle: only children this archive made. The
    given seed vectors are kept by reference, and stacked without a copy when
    they come as one `SeedVectors` stack in the archive's dtype.

    With `task_vectors`, the last seed is the base the others were fine-tuned
    from: it is no member, and a child is the base plus the SLERP of its
    parents' task vectors (member - base) instead of the SLERP of the members.
    """

    def __init__(
        self, capacity: int, num_params: int, seeds: Sequence[Tensor], dtype: torch.dtype | None = None,
        host_seeds: bool = False, task_vectors: bool = False,
    ) -> None:
        super().__init__(capacity)
        self.host_seeds = bool(host_seeds)
        self.task_vectors = bool(task_vectors)
        if self.task_vectors and len(seeds) < 3:
            raise ValueError(
                f"task_vectors takes the last of init_models as the base: give two or more fine-tunes and then their "
                f"base (got {len(seeds)} models)"
            )
        if len(seeds) < 2 or (seeds.shape[1] != num_params if hasattr(seeds, "segment") else any(seed.shape != (num_params,) for seed in seeds)):
            raise ValueError(f"seeds must be two or more vectors of D = {num_params} parameters")
        self.num_params = num_params
        self.seeds_in_files = hasattr(seeds, "segment")  # `merging.seed_store.SeedFiles`: read when needed
        if self.seeds_in_files:
            self._sources = self.seeds = seeds
        else:
            self._sources = seeds if isinstance(seeds, SeedVectors) else SeedVectors(seeds)
            stack = self._sources.stack(dtype or self._sources[0].dtype, self._sources[0].device)
            self.register_buffer("seeds", stack, persistent=False)
        self.forms: list[Form | None] = [None] * capacity
        self._grams = SeedGrams(self.seeds)

    @property
    def num_seeds(self) -> int:
        return self.seeds.shape[0]

    @property
    def like(self) -> Tensor:
        """A tensor of the children's dtype on the strategy's device (for random draws and casts)."""
        if self.host_seeds or self.seeds_in_files:
            return self.scores.new_empty(0, dtype=self.seeds.dtype)
        return self.seeds

    def _children(self, forms: Sequence[Form]) -> Children:
        return Children(forms=forms, seeds=self.seeds, owner=self)

    def member_children(self, index: Tensor) -> Children:
        """The members at `index` as children (an empty slot is the all-zero form, as in the dense archive)."""
        empty = (torch.zeros(0, dtype=torch.long), torch.zeros(1, self.num_seeds, dtype=torch.float64))
        return self._children([self.forms[i] or empty for i in index.tolist()])

    def initial_children(self, init_models: Sequence[Tensor] | None, init_sigma: float, generator: torch.Generator) -> Children:
        """The seeds themselves, as unit forms (with `task_vectors`, all but the base)."""
        members = self.num_seeds - 1 if self.task_vectors else self.num_seeds
        return self._children([unit_form(k, self.num_seeds) for k in range(members)])

    def copies(self, index: Tensor) -> Children:
        """Children that copy the members at `index` (the "no crossover" ablation)."""
        return self.member_children(index)

    def crossover(self, first: Tensor, second: Tensor, split: Tensor | None, weight: Tensor) -> Children:
        """The children of `Archive.crossover`: ratio w before the split point, 1 - w from it on, one angle."""
        d = self.num_params
        if split is None:
            return self.crossover_by_pieces(first, second, [[(0, d, 0)]] * len(first), weight, per_part=False)
        pieces = [[(0, cut, 0), (cut, d, 1)] for cut in split.tolist()]
        return self.crossover_by_pieces(first, second, pieces, torch.cat([weight, 1 - weight], dim=-1), False)

    def crossover_by_pieces(
        self, first: Tensor, second: Tensor, pieces: Sequence[Sequence[Piece]], ratios: Tensor, per_part: bool
    ) -> Children:
        """The children of `Archive.crossover_by_pieces`, made as forms."""
        ratios = ratios.detach().to("cpu", torch.float64)
        made = []
        for i, (a, b) in enumerate(zip(first.tolist(), second.tolist())):
            made.append(self._child(self.forms[a], self.forms[b], pieces[i], ratios[i], per_part))
        return self._children(made)

    def _child(self, form_a: Form, form_b: Form, pieces: Sequence[Piece], t: Tensor, per_part: bool) -> Form:
        """The form of the SLERP child of a and b: on each segment c_a[label] A + c_b[label] B.

        Its segments are those of a, b and the pieces together; on each one the
        dot products come from the seeds' Gram (docs/ALGORITHM.md, "Crossover": cos Omega).
        With `task_vectors`, A and B are the parents' task vectors (their rows
        less the base's unit row), and the base is added back to the child.
        """
        pieces = [piece for piece in pieces if piece[1] > piece[0]]
        piece_starts = torch.tensor([start for start, _, _ in pieces], dtype=torch.long)
        cuts = torch.unique(torch.cat([form_a[0], form_b[0], piece_starts[1:]]))
        starts = torch.cat([piece_starts[:1], cuts])
        rows_a = form_a[1][torch.searchsorted(form_a[0], starts, right=True)]
        rows_b = form_b[1][torch.searchsorted(form_b[0], starts, right=True)]
        base = unit_form(self.num_seeds - 1, self.num_seeds)[1] if self.task_vectors else None
        if base is not None:
            rows_a, rows_b = rows_a - base, rows_b - base
        labels = torch.tensor([label for _, _, label in pieces])[torch.searchsorted(piece_starts, starts, right=True) - 1]
        stops = [*cuts.tolist(), self.num_params]
        grams = torch.stack([self._grams(start, stop) for start, stop in zip(starts.tolist(), stops)])
        pairs = ((rows_a, rows_b), (rows_a, rows_a), (rows_b, rows_b))  # <a, b>, |a|^2, |b|^2 per segment
        products = torch.stack([torch.einsum("sk,skl,sl->s", x, grams, y) for x, y in pairs])
        if per_part:  # equation 2: one angle per label, from that label's sub-vectors
            sums = products.new_zeros(3, len(t)).index_add_(1, labels, products)
        else:  # the reference: one angle between the whole vectors, for every label
            sums = products.sum(dim=1, keepdim=True).expand(3, len(t))
        coef_a, coef_b = ops.slerp_weights(sums[0] / (sums[1].sqrt() * sums[2].sqrt()), t.unsqueeze(-1))
        rows = coef_a[labels] * rows_a + coef_b[labels] * rows_b
        return merge_equal_rows(cuts, rows if base is None else rows + base)

    def _store(self, slot: int, children: Children, row: int) -> None:
        if children.owner is not self or children.forms is None:
            raise ValueError(
                "a coefficient archive stores only the children it made: tell() the Children its ask() returned "
                "(not a tensor of their values), or use storage='dense'"
            )
        self.forms[slot] = children.forms[row]

    def get_extra_state(self) -> dict[str, Any]:
        """The forms packed in three tensors (breakpoints per slot, -1 for an empty one) and the seeds' fingerprint."""
        forms = [form for form in self.forms if form is not None]
        empty = torch.zeros(0, self.num_seeds, dtype=torch.float64)
        return {
            "seeds": self._sources.fingerprint(),
            "counts": torch.tensor([-1 if form is None else len(form[0]) for form in self.forms]),
            "cuts": torch.cat([form[0] for form in forms]) if forms else torch.zeros(0, dtype=torch.long),
            "tables": torch.cat([form[1] for form in forms]) if forms else empty,
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        current = self._sources.fingerprint()
        if state["seeds"] != current:
            raise ValueError(
                f"the checkpoint's archive holds mixtures of other seed models (SHA-256 of their tensors "
                f"{state['seeds'][:16]}..., these seeds {current[:16]}...): resume with the same init_models, in the "
                "same order"
            )
        cuts, tables = state["cuts"].cpu(), state["tables"].cpu()
        self.forms, offset, row = [], 0, 0
        for count in state["counts"].tolist():
            if count < 0:
                self.forms.append(None)
                continue
            self.forms.append((cuts[offset : offset + count], tables[row : row + count + 1]))
            offset, row = offset + count, row + count + 1

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> CoefficientArchive:
        if self.seeds_in_files:  # nothing held to move or convert: reads come in the files' dtype
            return super()._apply(fn, *args, **kwargs)
        seeds = self.seeds
        if self.host_seeds:  # the seeds stay in host memory: Module._apply skips a None buffer
            self._buffers["seeds"] = None
        try:
            super()._apply(fn, *args, **kwargs)
        finally:
            if self.host_seeds:
                self._buffers["seeds"] = seeds
        dtype = fn(seeds[:, :0]).dtype  # what the conversion asks for, read off an empty view
        if dtype != seeds.dtype:  # cast from the given seeds, not from the buffer's rounded values
            self.seeds = self._sources.stack(dtype, seeds.device if self.host_seeds else fn(seeds[:, :0]).device)
        self._grams = SeedGrams(self.seeds)  # the Grams are of the seeds as held: computed again
        return self
