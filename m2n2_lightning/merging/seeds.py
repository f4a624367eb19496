"""Seed models for merging, read lazily, tensor by tensor, from where real models live.

A `SeedReader` maps one seed (a module, a state_dict, ``.ckpt``, state_dict file, ``.safetensors``, sharded
index, ``save_pretrained`` folder or hub id: `seed_files`) onto a module's parameter names, allowing one prefix
of difference and tied weights (`seed_names`). Names, shapes and dtypes are checked from the headers before any
value is read; each value is checked (finite) as it is read and folded into the seed's SHA-256 digest.
`read_seeds` streams K seeds into one ``[K, D]`` stack, so reading costs the stack plus one tensor.
Buffers (BatchNorm statistics) are taken from the first seed. Every problem is a ValueError naming
``init_from[i]``, the file and the tensor.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from m2n2_lightning.merging.seed_files import (
    ACCEPTED,
    HUB_PATTERNS,
    WEIGHT_FILES,
    SeedSource,
    open_source,
)
from m2n2_lightning.merging.seed_names import (
    is_float,
    listing,
    match_names,
    parameter_aliases,
    unexpected_keys,
)

#: Elements counted for non-finite values at a time (isfinite's temporaries stay small).
_CHUNK = 1 << 22
#: Values read at a time into a seed stack (16 MiB of bf16): the largest transient of `read_seeds`.
READ_BLOCK = 1 << 23

__all__ = [
    "ACCEPTED", "HUB_PATTERNS", "WEIGHT_FILES", "SeedReader", "SeedSet", "SeedSource", "read_seeds",
    "seed_parameters",
]


class SeedReader:
    """One seed source opened for lazy, tensor-by-tensor reading, mapped onto a module's parameter names."""

    def __init__(
        self, module: nn.Module, source: SeedSource, index: int = 0, names: Sequence[str] | None = None
    ) -> None:
        """Open `source` as init_from[`index`] and check it against `module` (names, shapes, dtypes; no read)."""
        self._store = store = open_source(source, index)
        self.label: str = store.label
        params = dict(module.named_parameters(remove_duplicate=False))  # tied names too
        self.names: list[str] = [n for n, _ in module.named_parameters()] if names is None else list(names)
        if unknown := [n for n in self.names if n not in params]:
            raise ValueError(f"{self.label}: {type(module).__name__} has no parameters named {listing(unknown)}")
        assignment, strip, add = match_names(store, module, self.names, parameter_aliases(module))
        state = module.state_dict(keep_vars=True)
        buffers = {  # the module's persistent floating buffers the source holds, under the same prefix rewrite
            b: strip + b[len(add):] for b, value in module.named_buffers(remove_duplicate=False)
            if b in state and value.is_floating_point() and b.startswith(add) and strip + b[len(add):] in store.shapes
        }
        expected = {**{n: params[n] for n in self.names}, **{b: state[b] for b in buffers}}
        self._keys = {**assignment, **buffers}
        self._buffers = list(buffers)
        for n, key in self._keys.items():  # first: a quantised seed also holds scales that match nothing
            _check_float(self.label, store.where(key), key, n, store.dtypes[key], expected[n].dtype)
        missing = [n for n in self.names if n not in assignment]
        unexpected = unexpected_keys(module, store, set(self._keys.values()), strip, add)
        shapes = [
            f"{n}{'' if key == n else f' ({key})'}: {store.shapes[key]} vs {tuple(expected[n].shape)} expected"
            for n, key in self._keys.items() if store.shapes[key] != tuple(expected[n].shape)
        ]
        found = (("missing tensors", missing), ("unexpected tensors", unexpected), ("mis-shaped tensors", shapes))
        problems = [f"{what}: {listing(items)}" for what, items in found if items]
        if problems:
            mapping = f" (source names mapped by stripping {strip!r} and adding {add!r})" if strip or add else ""
            raise ValueError(f"{self.label} does not match {type(module).__name__}{mapping}; " + "; ".join(problems))
        self._digest = hashlib.sha256()

    def dtype(self, name: str) -> torch.dtype:
        """The source tensor's dtype for parameter `name` (from the header; nothing is read)."""
        return self._store.dtypes[self._key(name)]  # a float dtype: checked in __init__

    def tensor(self, name: str) -> Tensor:
        """Parameter `name`'s tensor read now: CPU, source dtype, the module's shape; checked finite and digested.

        It may share memory with an in-memory source or a memory-mapped file: copy it before changing it.
        """
        key = self._key(name)
        value = self._store.read(key).to("cpu")
        if not _all_finite(value):
            bad = sum(int((~torch.isfinite(_wide(chunk))).sum()) for chunk in value.reshape(-1).split(_CHUNK))
            raise ValueError(
                f"{self.label}: tensor {key!r} ({self._store.where(key)}) for {name} holds {bad} non-finite "
                f"values (NaN or Inf) of {value.numel()}; expected finite weights (one NaN or Inf turns every "
                "merge with this seed into NaN): repair or replace this seed"
            )
        # dtype, shape and bytes in the module's order, not the names: the same seed read into a wrapper
        # (a LightningModule's "model." prefix) or into the bare model gives the same digest
        self._digest.update(f"{value.dtype}\0{tuple(value.shape)}\0".encode())
        self._digest.update(value.contiguous().reshape(-1).view(torch.uint8).numpy())
        return value

    def read_into(self, name: str, out: Tensor | None) -> Tensor | None:
        """Parameter `name` read into `out` (as many values, any float dtype: cast there), block by block, checked
        finite and digested as it streams (the same digest as `tensor`): the whole tensor is never held twice.
        With `out=None` the tensor is only checked and digested (seeds that stay in their files)."""
        key = self._key(name)
        offset = 0
        self._digest.update(f"{self._store.dtypes[key]}\0{self._store.shapes[key]}\0".encode())
        for block in self._store.read_blocks(key, READ_BLOCK):
            if not _all_finite(block):
                self.tensor(name)  # raises, counting every non-finite value of the tensor
            self._digest.update(block.contiguous().view(torch.uint8).numpy())
            if out is not None:
                out.view(-1)[offset : offset + block.numel()].copy_(block)
            offset += block.numel()
        return out

    def read_range(self, name: str, start: int, stop: int) -> Tensor:
        """Elements [start, stop) of parameter `name`, flat, read now (the rows holding them; not checked again)."""
        key = self._key(name)
        shape = self._store.shapes[key]
        row = math.prod(shape[1:]) if len(shape) > 1 else 1
        first, last = start // row, -(-stop // row)
        rows = self._store.read_rows(key, first, last)
        return rows.reshape(-1)[start - first * row : stop - first * row]

    def buffers(self) -> dict[str, Tensor]:
        """The module's floating buffers (e.g. BatchNorm running_mean/var) that the source holds, read now."""
        return {b: self.tensor(b) for b in self._buffers}

    def digest(self) -> str:
        """SHA-256 over every tensor read so far (dtype, shape, raw bytes, in read order; no names), as hex."""
        return self._digest.hexdigest()

    def _key(self, name: str) -> str:
        if name not in self._keys:
            raise KeyError(f"{self.label}: {name!r} is not among the names this reader reads ({listing(self.names)})")
        return self._keys[name]


@dataclass
class SeedSet:
    """K seeds read into one stack: row k is seed k's parameters, flattened in the order of the names read."""

    vectors: Tensor  # [K, D]
    digests: list[str]  # one SHA-256 per seed (SeedReader.digest)
    labels: list[str]
    buffers: dict[str, Tensor]  # the first seed's buffers: buffers are taken from the first seed


def read_seeds(
    module: nn.Module, names: Sequence[str], sources: Iterable[SeedSource], dtype: torch.dtype | None = None,
    out: Tensor | None = None,
) -> SeedSet:
    """`sources` read into a ``[K, D]`` stack of `dtype` (default: the first seed's first tensor's), or into `out`.

    Every seed is opened and checked before any value is read. The stack is allocated once (or `out` used) and
    each tensor is written into its slice as it is read, block by block, cast there: peak memory is the stack
    plus one block (`READ_BLOCK` values).
    """
    readers = [SeedReader(module, source, i, names) for i, source in enumerate(sources)]
    if not readers or not names:
        raise ValueError(f"read_seeds needs at least one seed and one name; got {len(readers)} seeds and "
                         f"{len(names)} names; expected a list of {ACCEPTED}")
    params = dict(module.named_parameters(remove_duplicate=False))
    sizes = [params[n].numel() for n in readers[0].names]
    shape = (len(readers), sum(sizes))
    if out is None:
        out = torch.empty(shape, dtype=dtype or readers[0].dtype(readers[0].names[0]))
    elif tuple(out.shape) != shape or (dtype is not None and out.dtype != dtype):
        raise ValueError(f"read_seeds: out is {tuple(out.shape)} {out.dtype}; expected {shape} "
                         f"{dtype or out.dtype} (K seeds x D parameters)")
    digests, labels, buffers = [], [], {}
    readers.reverse()
    while readers:  # each reader is dropped once read, releasing its memory-mapped files
        reader = readers.pop()
        start = 0
        for name, size in zip(reader.names, sizes, strict=True):
            reader.read_into(name, out[len(labels), start:start + size])
            start += size
        if not labels:
            buffers = {b: value.clone() for b, value in reader.buffers().items()}
        digests.append(reader.digest())
        labels.append(reader.label)
    return SeedSet(out, digests, labels, buffers)


def seed_parameters(
    module: nn.Module, source: SeedSource, index: int = 0, names: Sequence[str] | None = None
) -> dict[str, Tensor]:
    """The tensors of `source` for `names` (default: all of `module`'s parameters), as CPU copies.

    Each tensor is detached, on the CPU, in the parameter's dtype and checked as `SeedReader` checks it.
    Raises a ValueError naming ``init_from[index]`` and the source for anything that does not fit.
    """
    reader = SeedReader(module, source, index, names)
    params = dict(module.named_parameters(remove_duplicate=False))
    return {n: reader.tensor(n).to("cpu", dtype=params[n].dtype, copy=True) for n in reader.names}


def _check_float(label: str, where: str, key: str, name: str, dtype: torch.dtype | str, wanted: torch.dtype) -> None:
    """Refuse integer, quantised (8-bit float) or unknown source values for a float tensor, before any read."""
    if dtype == wanted or not is_float(wanted) or (is_float(dtype) and dtype.itemsize >= 2):
        return
    raise ValueError(
        f"{label}: tensor {key!r} ({where}) for {name} holds {dtype} values, not 16-bit or wider floats; "
        f"expected {wanted} weights: integer and quantised tensors cannot be merged as they are (their scales "
        "live elsewhere): dequantise the seed first (load it in transformers and save_pretrained it in bfloat16)"
    )


def _all_finite(value: Tensor) -> bool:
    """Whether every element of `value` is finite, in one pass: NaN and +-Inf all show in its minimum or maximum."""
    if value.numel() == 0:
        return True
    if value.is_floating_point() and value.itemsize >= 2:
        low, high = torch.aminmax(value)  # 10 times faster than isfinite(...).all() on bf16, no [numel] temporary
        return bool(torch.isfinite(low) & torch.isfinite(high))
    return all(bool(torch.isfinite(_wide(chunk)).all()) for chunk in value.reshape(-1).split(_CHUNK))


def _wide(chunk: Tensor) -> Tensor:
    """`chunk` in a dtype isfinite handles (8-bit floats are widened)."""
    return chunk.float() if chunk.is_floating_point() and chunk.itemsize < 2 else chunk
