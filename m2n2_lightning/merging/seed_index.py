"""Sharded checkpoints (``*.index.json``): the ``weight_map`` followed exactly, and checked before a weight is read.

Each key is read from the shard the ``weight_map`` names for it, and only from there. Refused, each with a
ValueError naming the index and the shard: a key listed twice in the ``weight_map``, a key held by two shards,
a key its named shard does not hold, a shard path outside the index's folder (``..``, absolute paths, symlinks
that lead out) and a missing shard. Shards are opened for their headers only; no weight is read here.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from m2n2_lightning.merging.seed_files import TensorStore


def open_index(path: Path, label: str, open_file: Callable[[Path, str], TensorStore]) -> TensorStore:
    """The sharded checkpoint indexed by `path`; `open_file` opens one shard (header only) as a store."""
    weight_map = _weight_map(path, label)
    folder = path.parent.resolve()
    outside = sorted({f for f in weight_map.values() if not _inside(folder, f)})
    if outside:
        raise ValueError(
            f"{label}: its weight_map names shard files outside the index's folder {folder}: "
            f"{', '.join(outside)}; expected file names beside the index (a checkpoint may only read its own files)"
        )
    files = sorted(set(weight_map.values()))
    if absent := [f for f in files if not (folder / f).is_file()]:
        raise ValueError(f"{label}: shard files named by its weight_map do not exist: {', '.join(absent)}; "
                         f"expected them beside the index in {folder}")
    shards = {name: open_file(folder / name, f"{label}, shard {name},") for name in files}
    held: dict[str, list[str]] = {}
    for name, shard in shards.items():
        for key in shard.shapes:
            held.setdefault(key, []).append(name)
    if twice := sorted(f"{key} (in {' and '.join(names)})" for key, names in held.items() if len(names) > 1):
        raise ValueError(f"{label}: tensors held by more than one shard: {', '.join(twice[:10])}"
                         f"{f' and {len(twice) - 10} more' if len(twice) > 10 else ''}; expected each tensor in "
                         "exactly one shard: re-save the checkpoint (save_pretrained) or remove the stale shard")
    if lost := sorted(f"{key} (weight_map names {name})" for key, name in weight_map.items()
                      if key not in shards[name].shapes):
        raise ValueError(f"{label}: tensors its weight_map names are not in their shard: {', '.join(lost[:10])}"
                         f"{f' and {len(lost) - 10} more' if len(lost) > 10 else ''}; expected the index written "
                         "with these shards")
    store = TensorStore(label)
    for key, name in weight_map.items():
        shard = shards[name]
        store.dtypes[key], store.shapes[key] = shard.dtypes[key], shard.shapes[key]
        if key in shard.files:
            store.files[key] = shard.files[key]
        if key in shard.tensors:
            store.tensors[key] = shard.tensors[key]
        store.canonical[key] = shard.canonical[key] if shard.canonical[key] in weight_map else key
    return store


def _weight_map(path: Path, label: str) -> dict[str, str]:
    """The index's ``weight_map`` (tensor name -> shard file), refusing a name listed twice."""
    def no_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        if repeated := sorted(k for k, n in Counter(k for k, _ in pairs).items() if n > 1):
            raise ValueError(f"{label}: its weight_map lists {', '.join(repeated)} more than once; "
                             "expected each tensor name once")
        return dict(pairs)

    try:
        weight_map = json.loads(path.read_text(), object_pairs_hook=no_repeats)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise ValueError(f"{label} is not a sharded checkpoint index (JSON with a 'weight_map'): {err!r}") from err
    if not isinstance(weight_map, dict) or not weight_map or not all(
        isinstance(k, str) and isinstance(v, str) and v for k, v in weight_map.items()
    ):
        raise ValueError(f"{label}: its weight_map is not a non-empty mapping of tensor names to shard file names")
    return weight_map


def _inside(folder: Path, name: str) -> bool:
    """Whether shard file `name` (relative to `folder`) stays inside `folder` once links are followed."""
    return not Path(name).is_absolute() and (folder / name).resolve().is_relative_to(folder)
