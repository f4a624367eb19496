"""The children one `ask()` makes: a handle that `tell()` takes back with their scores.

A strategy hands out `Children` and stores what it made from them, by handle:
no guessing which told row was which child. The values of a child exist in
one of two ways:

- dense: a `[k, D]` tensor (random members, CMA-ES samples, dense archives);
- as forms over the seeds (`mixture.py`): a merge of pre-trained models stores
  kilobytes per child, and each child is written only where it is needed,
  straight into a module's parameters (`load_into`) or as dense rows for a
  vectorised forward (`dense`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from m2n2_lightning.params import FlatParams
from m2n2_lightning.strategies.mixture import Form, write_form


#: Children of at most this many parameters are written whole into one vector, then copied into a module in
#: one fused copy (per-parameter writes cost more in calls than the vector's memory there).
SMALL_MODEL = 1 << 22


class Children:
    """k candidates of D parameters: `values` [k, D], or `forms` over `seeds` made by `owner` (a [K, D] tensor,
    or seeds read on demand: `mixture.seed_segment`)."""

    def __init__(
        self,
        values: Tensor | None = None,
        forms: Sequence[Form] | None = None,
        seeds: Tensor | Any | None = None,
        owner: object | None = None,
    ) -> None:
        if (values is None) == (forms is None):
            raise ValueError("Children hold either dense values [k, D] or forms over seeds, not both")
        if values is not None and values.dim() != 2:
            raise ValueError(f"children values must have shape [k, D], got {tuple(values.shape)}")
        if forms is not None and (seeds is None or len(seeds.shape) != 2):
            raise ValueError("children given as forms need the seeds [K, D] they mix")
        self.values = values
        self.forms = None if forms is None else list(forms)
        self.seeds = seeds
        self.owner = owner

    @classmethod
    def of(cls, candidates: Children | Tensor) -> Children:
        """`candidates` as children: a `Children` itself, or a dense [k, D] tensor wrapped."""
        if isinstance(candidates, Children):
            return candidates
        if not isinstance(candidates, Tensor):
            raise TypeError(f"candidates must be the Children of ask() or a [k, D] tensor, got {type(candidates).__name__}")
        return cls(values=candidates)

    def __len__(self) -> int:
        return len(self.values) if self.values is not None else len(self.forms)

    @property
    def num_params(self) -> int:
        return (self.values if self.values is not None else self.seeds).shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return (self.values if self.values is not None else self.seeds).dtype

    @property
    def device(self) -> torch.device:
        return (self.values if self.values is not None else self.seeds).device

    def write(self, index: int, start: int, stop: int, out: Tensor) -> Tensor:
        """Coordinates [start, stop) of child `index` into `out` (stop - start elements, any dtype)."""
        if self.values is not None:
            return out.view(-1).copy_(self.values[index, start:stop])
        return write_form(self.seeds, self.forms[index], start, stop, out)

    def dense(self) -> Tensor:
        """The children as one [k, D] tensor in their dtype and device (made once, for vectorised scoring)."""
        if self.values is None:
            out = torch.empty(len(self.forms), self.seeds.shape[1], dtype=self.seeds.dtype, device=self.seeds.device)
            for i, row in enumerate(out):
                self.write(i, 0, self.seeds.shape[1], row)
            self.values = out
        return self.values

    @torch.no_grad()
    def load_into(self, index: int, module: nn.Module, flat: FlatParams) -> nn.Module:
        """Write child `index` straight into `module`'s parameters, tensor by tensor (no [D] copy beside them)."""
        if flat.num_params != self.num_params:
            raise ValueError(f"children of D = {self.num_params} parameters cannot be loaded into a module of {flat.num_params}")
        if self.num_params <= SMALL_MODEL:  # the whole child in one write, then one fused copy: fewer calls
            row = self.values[index] if self.values is not None else self.write(
                index, 0, self.num_params, torch.empty(self.num_params, dtype=self.dtype, device=self.device))
            return flat.load_into(module, row.to(next(module.parameters()).device))
        return flat.write_into(module, lambda start, stop, out: self.write(index, start, stop, out))
