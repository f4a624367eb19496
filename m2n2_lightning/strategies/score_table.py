"""What every archive storage shares: the score table [P, N], the occupancy [P] and the writing of a slot.

A storage (dense members, host or memory-mapped members, forms over the seeds)
adds only how a member is kept: `_store(slot, children, row)` keeps row `row`
of the `Children` an `ask()` made, and `member_children(index)` hands members
out again as children (to load the best one into a module, or to read rows).
Empty slots hold all-zero scores (docs/ALGORITHM.md, "Objects").

`versions[slot]` counts the writes of each slot in this process, so that a
caller can tell whether the best member changed without reading it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from m2n2_lightning.strategies.children import Children


class ScoreTable(nn.Module):
    """Scores [P, N] and occupancy [P] of `capacity` slots; N is fixed by `allocate` when the strategy starts."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self.register_buffer("scores", torch.zeros(capacity, 0))
        self.register_buffer("occupied", torch.zeros(capacity, dtype=torch.bool))
        self.versions = [0] * capacity

    @property
    def num_resources(self) -> int:
        return self.scores.shape[1]

    @property
    def host_side(self) -> bool:
        """Whether members are written by slot on the host (reading the slot back costs nothing)."""
        return True

    def allocate(self, num_resources: int) -> None:
        """Fix N: all-zero scores [P, N] for the (still empty) slots."""
        self.scores = self.scores.new_zeros(self.capacity, num_resources)

    def member_children(self, index: Tensor) -> Children:
        """The members at the slots `index` [m], as children (dense rows or forms)."""
        raise NotImplementedError

    def rows(self, index: Tensor) -> Tensor:
        """Members [m, D] at the slots `index` [m], as dense rows."""
        return self.member_children(index).dense()

    def _store(self, slot: int, children: Children, row: int) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def write(
        self, slot: Tensor, children: Children, row: int, member_scores: Tensor, accept: Tensor | None = None
    ) -> None:
        """Put child `row` of `children` and its scores [N] into `slot` (a 0-dim or one-element index).

        Nothing changes when `slot` is P or more (the newcomer lost) or `accept` is False.
        """
        index = int(slot)
        if index < self.capacity and (accept is None or bool(accept)):
            self._store(index, children, row)
            self.scores[index] = member_scores
            self.occupied[index] = True
            self.versions[index] += 1

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # N is fixed when a run starts: an archive that has not started takes the saved one.
        saved = state_dict.get(prefix + "scores")
        if saved is not None and self.num_resources == 0 and saved.dim() == 2 and saved.shape[0] == self.capacity:
            self.allocate(saved.shape[1])
        self.versions = [version + 1 for version in self.versions]  # every slot may hold another member now
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

