"""Parameter groups for per-group merges: one per transformer layer, or one per regex pattern.

`LayerwiseSlerpStrategy` gives each group one SLERP coefficient, `LayerwiseSimplexStrategy`
mixing weights over K seeds. A group is a set of whole parameters, found from
their names in `FlatParams.layout` order; `segments_of` turns the groups into
contiguous ranges of the flat vector, and `group_gram` reduces the seeds over
each group (norms and inner products: the SLERP angle of the group, and a
fingerprint of the seeds).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import Tensor

#: A transformer layer in a parameter name: `.layers.<i>.` (Llama, Mistral, ...) or `.h.<i>.` (GPT-2).
LAYER_PATTERN = re.compile(r"(?:^|\.)(?:layers|h)\.\d+\.")
#: The name of the group of the parameters outside every layer (embeddings, final norm, head).
REST = "rest"

#: Contiguous ranges of the flat vector with their group: (start, stop, group).
Segment = tuple[int, int, int]


def group_parameters(layout: Sequence[tuple[str, int]], groups: str | Sequence[str]) -> tuple[list[str], list[int]]:
    """(group names, the group of each parameter of `layout`) for `groups` = "layers" or regex patterns.

    "layers": one group per transformer layer (the name up to its layer index,
    in vector order), then "rest" for every other parameter. Patterns: group g
    holds the parameters whose name `re.search`es `groups[g]`; every parameter
    must match exactly one pattern, and every pattern some parameter.
    """
    names = [name for name, _ in layout]
    if groups == "layers":
        return _layer_groups(names)
    if isinstance(groups, str) or not isinstance(groups, Sequence):
        raise ValueError(f"groups must be 'layers' or a list of regex patterns, got {groups!r}")
    return _pattern_groups(names, list(groups))


def _layer_groups(names: list[str]) -> tuple[list[str], list[int]]:
    keys = [_layer_key(name) for name in names]
    index = {key: g for g, key in enumerate(dict.fromkeys(key for key in keys if key is not None))}
    if not index:
        raise ValueError(
            f"groups='layers' found no parameter name with '.layers.<i>.' or '.h.<i>.' in {_shown(names)}; "
            "pass groups=[regex, ...], one pattern per group"
        )
    rest = [REST] if None in keys else []
    return list(index) + rest, [len(index) if key is None else index[key] for key in keys]


def _pattern_groups(names: list[str], groups: list[str]) -> tuple[list[str], list[int]]:
    patterns = _compiled(groups)
    owner = []
    for name in names:
        matches = [g for g, pattern in enumerate(patterns) if pattern.search(name)]
        if len(matches) > 1:
            raise ValueError(
                f"parameter {name!r} matches the group patterns {[groups[g] for g in matches]}: "
                "each parameter must belong to exactly one group; make the patterns exclusive"
            )
        owner.append(matches[0] if matches else -1)
    unmatched = [name for name, g in zip(names, owner) if g < 0]
    if unmatched:
        raise ValueError(
            f"the parameters {_shown(unmatched)} match no group pattern; every parameter must belong to exactly "
            "one group: add a pattern for them"
        )
    unused = [groups[g] for g in range(len(groups)) if g not in owner]
    if unused:
        raise ValueError(f"the group patterns {unused} match no parameter; the parameters are {_shown(names)}")
    return groups, owner


def _layer_key(name: str) -> str | None:
    """`name` up to its first layer index (e.g. 'model.layers.3'), or None outside every layer."""
    match = LAYER_PATTERN.search(name)
    return None if match is None else name[: match.end() - 1]


def _compiled(groups: Sequence[str]) -> list[re.Pattern[str]]:
    if not groups or not all(isinstance(pattern, str) for pattern in groups):
        raise ValueError(f"groups must be 'layers' or a non-empty list of regex patterns (strings), got {groups!r}")
    compiled = []
    for pattern in groups:
        try:
            compiled.append(re.compile(pattern))
        except re.error as err:
            raise ValueError(f"group pattern {pattern!r} is not a valid regular expression: {err}") from err
    return compiled


def _shown(names: Sequence[str], most: int = 8) -> list[str]:
    return list(names[:most]) + ([f"... {len(names) - most} more"] if len(names) > most else [])


def segments_of(layout: Sequence[tuple[str, int]], owner: Sequence[int]) -> list[Segment]:
    """The flat vector as contiguous (start, stop, group) ranges, neighbours of one group joined."""
    segments: list[Segment] = []
    offset = 0
    for (_, numel), group in zip(layout, owner):
        if segments and segments[-1][2] == group and segments[-1][1] == offset:
            segments[-1] = (segments[-1][0], offset + numel, group)
        elif numel:
            segments.append((offset, offset + numel, group))
        offset += numel
    return segments


def group_gram(seeds: Sequence[Tensor], segments: Sequence[Segment], num_groups: int, chunk: int = 1 << 24) -> Tensor:
    """[G, K(K+1)/2] float64 inner products <x_i, x_j> of the K seeds over each group: first the squared norms
    |x_k|^2 (k = 0..K-1), then i < j in row order; for two seeds (|a_g|^2, |b_g|^2, <a_g, b_g>), the SLERP angle of
    the group. Float64 chunks of `chunk` coordinates (bounded memory), each entry one dot product."""
    pairs = [(k, k) for k in range(len(seeds))] + [(i, j) for i in range(len(seeds)) for j in range(i + 1, len(seeds))]
    gram = torch.zeros(num_groups, len(pairs), dtype=torch.float64, device=seeds[0].device)
    for start, stop, group in segments:
        for lo in range(start, stop, chunk):
            parts = [seed[lo : min(stop, lo + chunk)].double() for seed in seeds]
            gram[group] += torch.stack([parts[i] @ parts[j] for i, j in pairs])
    return gram
