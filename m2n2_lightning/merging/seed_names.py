"""A seed's tensor names mapped onto a module's: one prefix of difference either side, and tied weights.

`match_names` finds the one prefix rewrite (strip a prefix from the source keys, then add one) under which the
most parameters find a tensor. Two rewrites that differ only in which copy of a tied tensor they take are the
same mapping, so a module whose parameters are tied copies is not called ambiguous.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from m2n2_lightning.merging.seed_files import TensorStore

_LIMIT = 10
#: Non-parameter tensors that checkpoints of older library versions hold; never reported as unexpected.
_BUFFERS = re.compile(r"(^|\.)(masked_bias|position_ids|inv_freq|original_inv_freq|num_batches_tracked)$")


def is_float(dtype: torch.dtype | str) -> bool:
    """Whether values of `dtype` are real or complex floating-point numbers (a dtype torch lacks is not)."""
    return isinstance(dtype, torch.dtype) and (dtype.is_floating_point or dtype.is_complex)


def listing(items: Sequence[str], limit: int = _LIMIT) -> str:
    """At most `limit` items, comma separated, then how many more."""
    items = list(items)
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def parameter_aliases(module: nn.Module) -> dict[str, list[str]]:
    """For each parameter name, every name under which the same Parameter is registered (tied weights)."""
    by_id: dict[int, list[str]] = {}
    for name, value in module.state_dict(keep_vars=True).items():
        by_id.setdefault(id(value), []).append(name)
    params = module.named_parameters(remove_duplicate=False)
    return {name: [name] + [a for a in by_id.get(id(p), []) if a != name] for name, p in params}


def unexpected_keys(module: nn.Module, store: TensorStore, used: set[str], strip: str, add: str) -> list[str]:
    """Source keys under `strip` that land on no tensor of `module`, leaving out buffers and known masks."""
    known = set(module.state_dict(keep_vars=True)) | {k for k, _ in module.named_buffers()}
    ignore = [_BUFFERS] + [  # transformers' own lists, on whole name components ("attn.bias", not "c_attn.bias")
        re.compile(rf"(?:^|\.)(?:{p})(?:$|\.)")
        for m in module.modules() for p in getattr(m, "_keys_to_ignore_on_load_unexpected", None) or ()
    ]
    return [
        key for key, dtype in store.dtypes.items()
        if key.startswith(strip) and key not in used and (mapped := add + key[len(strip):]) not in known
        and is_float(dtype) and not any(p.search(mapped) for p in ignore)
    ]


def match_names(
    store: TensorStore, module: nn.Module, names: Sequence[str], aliases: Mapping[str, list[str]]
) -> tuple[dict[str, str], str, str]:
    """The one prefix rewrite (strip from source keys, then add) matching the most names: name -> key, strip, add."""
    keys = [k for k, dtype in store.dtypes.items() if is_float(dtype)] or list(store.dtypes)
    targets = list(module.state_dict(keep_vars=True))
    strips = {""} | _prefixes(keys, common=True) | _prefixes(keys, common=False, depth=1)
    adds = {""} | _prefixes(targets, common=True) | _prefixes(targets, common=False)
    best: dict[tuple[tuple[str, str], ...], tuple[dict[str, str], str, str]] = {}
    top = 0
    for strip in sorted(strips, key=len):
        rename = {k[len(strip):]: k for k in store.dtypes if k.startswith(strip)}
        for add in sorted(adds, key=len):
            assignment = {}
            for n in names:
                for alias in aliases.get(n, [n]):
                    if alias.startswith(add) and (key := rename.get(alias[len(add):])) is not None:
                        assignment[n] = key
                        break
            if len(assignment) > top:
                top, best = len(assignment), {}
            if assignment and len(assignment) == top:  # the same tensors, whichever tied copy: one mapping
                same = tuple(sorted((n, store.canonical.get(k, k)) for n, k in assignment.items()))
                best.setdefault(same, (assignment, strip, add))
    if not best:
        raise ValueError(
            f"{store.label}: none of its tensor names match {type(module).__name__}'s parameters, with or without "
            f"a prefix; source has {listing(keys)}; the module has {listing(list(names))}"
        )
    if len(best) > 1:
        ways = sorted(f"strip {s!r} add {a!r}" for _, s, a in best.values())
        raise ValueError(
            f"{store.label}: ambiguous prefix mapping onto {type(module).__name__}: {top} parameters match in "
            f"{len(best)} different ways ({listing(ways)}); pass a source holding one model"
        )
    (assignment, strip, add), = best.values()
    return assignment, strip, add


def _prefixes(keys: Sequence[str], common: bool, depth: int = 3, cap: int = 64) -> set[str]:
    """Leading dotted prefixes (with their dot) shared by all `keys`, or else those of each key up to `depth`."""
    split = [key.split(".")[:-1] for key in keys]
    if common:
        shared = os.path.commonprefix(split) if split else []  # element-wise on the lists of components
        return {".".join(shared[:i]) + "." for i in range(1, len(shared) + 1)}
    found: set[str] = set()
    for d in range(1, depth + 1):
        level = {".".join(parts[:d]) + "." for parts in split if len(parts) >= d}
        if len(level) <= cap:
            found |= level
    return found
