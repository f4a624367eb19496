"""Seeds that stay in their files: read through the OS page cache each time a child is written.

`read_seeds` copies the K seeds into one `[K, D]` stack, so a merge holds
K + 1 models (the seeds and the module a child is written into). `SeedFiles`
keeps none of them: a range of seed k's flat vector is read from its
safetensors file when it is needed (a file opened per read, so no mapped
pages stay resident), and the OS page cache serves the repeated reads, the
way mergekit streams its tensors. A merge then holds one model, the module,
at the cost of reading the seeds' bytes again for every child. Every seed is
checked and SHA-256 hashed once, when it is opened (one streaming pass).
Pickled checkpoints (`.bin`, `.ckpt`) are memory-mapped instead: their pages
count as resident once read, as with `read_seeds`.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn

from m2n2_lightning.merging.seed_files import SeedSource
from m2n2_lightning.merging.seeds import SeedReader, read_seeds
from m2n2_lightning.params import FlatParams
from m2n2_lightning.strategies.mixture import SeedVectors, combined_digest

#: Where the seeds of a merge live during the search (`M2N2Callback(seeds_in=...)`, `load_seeds`).
SEEDS_IN = ("memory", "files")


class SeedFiles:
    """K seeds as a `[K, D]` matrix read on demand: `segment(k, start, stop)` is seed k's values there.

    Checked (names, shapes, dtypes, finite values) and hashed when built;
    `buffers` are the first seed's (the documented policy). `dtype` is the
    first seed's first tensor's unless given; every read is cast to it.
    """

    def __init__(
        self, module: nn.Module, flat: FlatParams, sources: Iterable[SeedSource], dtype: torch.dtype | None = None
    ) -> None:
        self.readers = [SeedReader(module, source, i, flat.names) for i, source in enumerate(sources)]
        if len(self.readers) < 2:
            raise ValueError(f"init_from must hold two or more seed models to merge, got {len(self.readers)}")
        for reader in self.readers:  # every tensor checked and hashed, nothing kept
            for name in reader.names:
                reader.read_into(name, None)
        self.digests = [reader.digest() for reader in self.readers]
        self.labels = [reader.label for reader in self.readers]
        self.buffers = {name: value.clone() for name, value in self.readers[0].buffers().items()}
        self.names = flat.names
        self.offsets = [spec.offset for spec in flat.specs]
        self.shape = (len(self.readers), flat.num_params)
        self.dtype = dtype or self.readers[0].dtype(flat.names[0])
        self.device = torch.device("cpu")
        self.stacked = None  # no stack is ever made

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, k: int) -> Tensor:
        """Seed k's whole flat vector [D], read now (for storages that keep dense members)."""
        if not 0 <= k < len(self):
            raise IndexError(f"seed {k} of {len(self)}")
        return self.segment(k, 0, self.shape[1])

    def __iter__(self) -> Iterator[Tensor]:
        return (self[k] for k in range(len(self)))

    def segment(self, k: int, start: int, stop: int) -> Tensor:
        """Seed k's values at coordinates [start, stop) of the flat vector, read now, in `dtype`."""
        out = torch.empty(stop - start, dtype=self.dtype)
        index = bisect.bisect_right(self.offsets, start) - 1
        position = start
        while position < stop:
            offset = self.offsets[index]
            end = min(stop, self.offsets[index + 1] if index + 1 < len(self.offsets) else self.shape[1])
            part = self.readers[k].read_range(self.names[index], position - offset, end - offset)
            out[position - start : end - start].copy_(part)
            position, index = end, index + 1
        return out

    def fingerprint(self) -> str:
        """One SHA-256 over the seeds' digests (as `SeedVectors.fingerprint`)."""
        return combined_digest(self.digests)


@torch.no_grad()
def load_seeds(
    target: nn.Module, flat: FlatParams, sources: Iterable[SeedSource], seeds_in: str = "memory"
) -> SeedVectors | SeedFiles:
    """The seeds of a merge onto `target`'s parameters, checked and hashed as they stream (`.digests`): read
    lazily into one [K, D] stack in their own dtype ("memory"), or left in their files and read when a child is
    written ("files"). Their buffers (e.g. BatchNorm statistics) are taken from the first seed, into `target`."""
    if seeds_in not in SEEDS_IN:
        raise ValueError(f"seeds_in must be one of {SEEDS_IN}, got {seeds_in!r}")
    if seeds_in == "files":
        seeds: SeedFiles | SeedVectors = SeedFiles(target, flat, sources)
        buffers_of = seeds.buffers
    else:
        read = read_seeds(target, flat.names, sources)
        seeds, buffers_of = SeedVectors(list(read.vectors), read.vectors, read.digests), read.buffers
    buffers = dict(target.named_buffers())
    for name, value in buffers_of.items():
        buffers[name].copy_(value)
    return seeds
