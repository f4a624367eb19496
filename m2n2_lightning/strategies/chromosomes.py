"""Chromosomes: parameter groups that each get their own split point and mixing ratio.

The paper merges the attention layers of its U-Nets separately from the other
parameters (section 4.3): every group ("chromosome") of the flat vector has
its own split point k_g ~ U{0..D_g-1} and ratio w_g ~ U(0, 1), counted along
the group's own coordinates (its parameters in vector order). One group
holding every parameter is the default, exact crossover of docs/ALGORITHM.md.

A child is then described by *pieces*: contiguous ranges [start, stop) of the
flat vector, each labelled 2g (group g before its split point, ratio w_g) or
2g + 1 (from the split point on, ratio 1 - w_g). Both archive storages make a
child from its pieces (`Archive.crossover_by_pieces`).

The SLERP angle: "whole" takes one angle between the whole parent vectors (the
reference code); "per_part" takes one angle per label, between the parents'
sub-vectors of that label (the paper's equation 2, a SLERP per sub-array).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

#: A contiguous range of the flat vector with its label: (start, stop, label).
Piece = tuple[int, int, int]

SLERP_ANGLES = ("whole", "per_part")


@dataclass(frozen=True)
class Chromosomes:
    """Groups of the flat vector, each a tuple of contiguous (start, stop) ranges in vector order."""

    groups: tuple[tuple[tuple[int, int], ...], ...]

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(sum(stop - start for start, stop in group) for group in self.groups)

    @property
    def num_labels(self) -> int:
        return 2 * len(self.groups)

    @classmethod
    def whole(cls, num_params: int) -> Chromosomes:
        """One group: every parameter."""
        return cls((((0, num_params),),))

    @classmethod
    def from_patterns(cls, layout: Sequence[tuple[str, int]], patterns: Sequence[str]) -> Chromosomes:
        """Group g holds the parameters whose name matches `patterns[g]` (fnmatch, e.g. "*attn*");
        a last group holds the rest, if any. `layout` is (name, numel) in vector order.

        ValueError when a pattern matches no parameter, or a parameter matches two patterns.
        """
        if isinstance(patterns, str) or not patterns:
            raise ValueError(f"chromosomes must be a list of one or more name patterns, got {patterns!r}")
        owner: list[int | None] = []
        for name, _ in layout:
            matches = [g for g, pattern in enumerate(patterns) if fnmatch.fnmatchcase(name, pattern)]
            if len(matches) > 1:
                raise ValueError(
                    f"parameter {name!r} matches chromosome patterns {[patterns[g] for g in matches]}: "
                    "each parameter may belong to one chromosome only"
                )
            owner.append(matches[0] if matches else None)
        unused = [pattern for g, pattern in enumerate(patterns) if g not in owner]
        if unused:
            names = [name for name, _ in layout]
            shown = names[:8] + ([f"... {len(names) - 8} more"] if len(names) > 8 else [])
            raise ValueError(f"chromosome patterns {unused} match no parameter; the parameters are {shown}")
        rest = len(patterns)
        groups: list[list[tuple[int, int]]] = [[] for _ in range(len(patterns) + 1)]
        offset = 0
        for (_, numel), group in zip(layout, owner):
            ranges = groups[rest if group is None else group]
            if ranges and ranges[-1][1] == offset:
                ranges[-1] = (ranges[-1][0], offset + numel)  # neighbours in the vector: one range
            else:
                ranges.append((offset, offset + numel))
            offset += numel
        return cls(tuple(tuple(ranges) for ranges in groups if ranges))

    def draw(
        self, num_children: int, generator: torch.Generator, use_split_point: bool, like: Tensor
    ) -> tuple[Tensor | None, Tensor]:
        """Split points [m, G] (None without split points) and then ratios w [m, G] in the dtype of `like`.

        With one group this draws exactly what `operators.crossover_draws` draws.
        """
        split = None
        if use_split_point:
            split = torch.stack(
                [torch.randint(0, size, (num_children,), generator=generator, device=like.device) for size in self.sizes],
                dim=-1,
            )
        weight = torch.rand(num_children, len(self.groups), generator=generator, device=like.device, dtype=like.dtype)
        return split, weight

    def pieces(self, split: Sequence[int] | None) -> list[Piece]:
        """The pieces of one child with split points `split` [G] (None: every range before the split)."""
        pieces: list[Piece] = []
        for g, ranges in enumerate(self.groups):
            cut = None if split is None else split[g]
            seen = 0
            for start, stop in ranges:
                local = None if cut is None else cut - seen  # where the split falls in this range
                seen += stop - start
                if local is None or local >= stop - start:
                    pieces.append((start, stop, 2 * g))
                elif local <= 0:
                    pieces.append((start, stop, 2 * g + 1))
                else:
                    pieces += [(start, start + local, 2 * g), (start + local, stop, 2 * g + 1)]
        return sorted(pieces)

    @staticmethod
    def ratios(weight: Tensor) -> Tensor:
        """The SLERP ratio t [m, 2G] of each label: w_g before the split, 1 - w_g from it on."""
        return torch.stack([weight, 1 - weight], dim=-1).flatten(1)


def check_slerp_angle(slerp_angle: str) -> str:
    if slerp_angle not in SLERP_ANGLES:
        raise ValueError(f"slerp_angle must be one of {SLERP_ANGLES}, got {slerp_angle!r}")
    return slerp_angle
