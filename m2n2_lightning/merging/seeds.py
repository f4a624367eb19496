"""Seed models for merging, read from where real models live.

`seed_parameters` maps one seed (a module, ``.ckpt``, state_dict file, ``.safetensors``,
sharded index, ``save_pretrained`` folder or hub id) onto a module's parameter names,
allowing one prefix of difference and tied weights. Pickles are only read with
``torch.load(weights_only=True)``: a crafted file cannot run code. Every problem is a
ValueError naming ``init_from[i]``. `save_merged` writes a merge that loads again.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

SeedSource = str | os.PathLike | nn.Module

#: Weight files of a ``save_pretrained`` folder, in the order they are looked for.
WEIGHT_FILES = (
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json"
)
#: What a hub download fetches: safetensors weights first, then the pickled ones.
HUB_PATTERNS = (
    ["config.json", "model.safetensors", "model-*.safetensors", "model.safetensors.index.json"],
    ["config.json", "pytorch_model.bin", "pytorch_model-*.bin", "pytorch_model.bin.index.json"],
)
ACCEPTED = (
    "a Lightning .ckpt, a torch.save(module.state_dict()) file (.pt/.pth/.bin), a .safetensors file, "
    "a sharded checkpoint's *.index.json, a save_pretrained directory, a Hugging Face hub id, or an nn.Module"
)
_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".safetensors", ".json")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}(/[\w.-]{1,96})?$")
_LIMIT = 10
#: Non-parameter tensors that checkpoints of older library versions hold; never reported as unexpected.
_BUFFERS = re.compile(r"(^|\.)(masked_bias|position_ids|inv_freq|original_inv_freq|num_batches_tracked)$")


def seed_parameters(
    module: nn.Module, source: SeedSource, index: int = 0, names: Sequence[str] | None = None
) -> dict[str, Tensor]:
    """The tensors of `source` for `names` (default: all of `module`'s parameters), as CPU copies.

    Each tensor is detached, on the CPU, in the parameter's dtype and checked
    against its shape; buffers are not read, nor source keys outside the chosen
    prefix (another part of a larger checkpoint). Raises a ValueError naming
    ``init_from[index]`` and the source for anything that does not fit.
    """
    label, state = _load(source, index)
    params = dict(module.named_parameters(remove_duplicate=False))  # tied names too
    names = [n for n, _ in module.named_parameters()] if names is None else list(names)
    if unknown := [n for n in names if n not in params]:
        raise ValueError(f"{label}: {type(module).__name__} has no parameters named {_listing(unknown)}")
    aliases = _aliases(module)
    assignment, strip, add = _match(label, module, state, names, aliases)
    missing = [n for n in names if n not in assignment]
    unexpected = _unexpected(module, state, set(assignment.values()), strip, add)
    shapes = [
        f"{n}{'' if key == n else f' ({key})'}: {tuple(state[key].shape)} vs {tuple(params[n].shape)} expected"
        for n in names if (key := assignment.get(n)) is not None and state[key].shape != params[n].shape
    ]
    found = (("missing tensors", missing), ("unexpected tensors", unexpected), ("mis-shaped tensors", shapes))
    problems = [f"{what}: {_listing(items)}" for what, items in found if items]
    if problems:
        mapping = f" (source names mapped by stripping {strip!r} and adding {add!r})" if strip or add else ""
        raise ValueError(f"{label} does not match {type(module).__name__}{mapping}; " + "; ".join(problems))
    return {n: state[assignment[n]].detach().to("cpu", dtype=params[n].dtype, copy=True) for n in names}


def _load(source: SeedSource, index: int) -> tuple[str, dict[str, Tensor]]:
    """A label for error messages and the tensors of `source`."""
    if isinstance(source, nn.Module):
        return f"init_from[{index}] (module {type(source).__name__})", dict(source.state_dict())
    path = Path(source)
    if not path.exists() and isinstance(source, str) and _HUB_ID.match(source) and not source.endswith(_SUFFIXES):
        label = f"init_from[{index}] (hub id {source!r})"
        return label, _read_directory(_download(source, label), label)
    kind = "directory" if path.is_dir() else "file"
    label = f"init_from[{index}] ({kind} {path})"
    if not path.exists():
        raise ValueError(f"{label} does not exist; expected {ACCEPTED}")
    return label, _read_directory(path, label) if path.is_dir() else _read_file(path, label)


def _download(repo_id: str, label: str) -> Path:
    """A local snapshot of hub repository `repo_id`: its config and weights, safetensors preferred."""
    try:
        import huggingface_hub
    except ImportError:
        raise ValueError(
            f"{label} is not an existing file or directory; reading it as a Hugging Face hub id needs "
            'huggingface_hub: pip install "m2n2-lightning[hf]"'
        ) from None
    for patterns in HUB_PATTERNS:
        try:
            folder = Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=patterns))
        except Exception as err:  # network, auth and not-found errors all mean the same here
            raise ValueError(
                f"{label} is not an existing file or directory, and downloading {repo_id!r} from the "
                f"Hugging Face hub failed: {type(err).__name__}: {err}"
            ) from err
        if any((folder / name).is_file() for name in WEIGHT_FILES):
            return folder
    raise ValueError(f"{label}: the hub repository {repo_id!r} holds none of {', '.join(WEIGHT_FILES)}")


def _read_directory(path: Path, label: str) -> dict[str, Tensor]:
    """The weights of a ``save_pretrained`` folder (single file or sharded)."""
    for name in WEIGHT_FILES:
        if (path / name).is_file():
            return _read_file(path / name, label)
    raise ValueError(f"{label} holds none of {', '.join(WEIGHT_FILES)}; expected {ACCEPTED}")


def _read_file(path: Path, label: str) -> dict[str, Tensor]:
    """The tensors of one weight file; the format is told by the file's first bytes, not its name."""
    if path.name.endswith(".json"):
        return _read_index(path, label)
    with open(path, "rb") as f:
        head = f.read(9)
    size = path.stat().st_size
    not_weights = f"{label} is not a checkpoint, state_dict, or safetensors file"
    if len(head) == 9 and head[8:] == b"{" and 8 + int.from_bytes(head[:8], "little") <= size:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except SafetensorError as err:
            raise ValueError(f"{not_weights} (safetensors: {err}); expected {ACCEPTED}") from err
    if not head.startswith((b"PK\x03\x04", b"\x80")):  # zip (torch.save) or pickle
        what = "it is empty" if size == 0 else "unknown format"
        raise ValueError(f"{not_weights} ({what}); expected {ACCEPTED}")
    try:
        content: Any = torch.load(path, map_location="cpu", weights_only=True, mmap=head.startswith(b"PK"))
    except pickle.UnpicklingError as err:
        if "Unsupported operand" in str(err):  # random bytes, or a pickle not written by torch.save
            raise ValueError(f"{not_weights} (a pickle torch.load(weights_only=True) cannot read); "
                             f"expected {ACCEPTED}") from err
        raise ValueError(
            f"{label} holds objects other than tensors, which torch.load(weights_only=True) refuses to load "
            "(unpickling them could run code); save the weights alone with "
            "torch.save(module.state_dict(), path) or safetensors.torch.save_model(module, path)"
        ) from err
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        first = str(err).split(". ")[0].splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"{not_weights} (corrupt or truncated: {first}); expected {ACCEPTED}") from err
    if isinstance(content, Mapping) and isinstance(content.get("state_dict"), Mapping):
        content = content["state_dict"]
    if not isinstance(content, Mapping) or not content or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in content.items()
    ):
        raise ValueError(
            f"{label} holds a {type(content).__name__}, not a mapping of parameter names to tensors "
            "(a state_dict, or a Lightning checkpoint with a 'state_dict')"
        )
    return dict(content)


def _read_index(path: Path, label: str) -> dict[str, Tensor]:
    """The tensors of a sharded checkpoint: every shard its "weight_map" names, read from beside the index."""
    try:
        shards = json.loads(path.read_text())["weight_map"]
        files = sorted(set(shards.values()))
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as err:
        raise ValueError(f"{label} is not a sharded checkpoint index (JSON with a 'weight_map'): {err!r}") from err
    if absent := [f for f in files if not (path.parent / f).is_file()]:
        raise ValueError(f"{label}: shard files named by its weight_map do not exist: {_listing(absent)}")
    state: dict[str, Tensor] = {}
    for name in files:
        state.update(_read_file(path.parent / name, f"{label}, shard {name},"))
    return state


def _unexpected(module: nn.Module, state: Mapping[str, Tensor], used: set[str], strip: str, add: str) -> list[str]:
    """Source keys under `strip` that land on no tensor of `module`, leaving out buffers and known masks."""
    known = set(module.state_dict(keep_vars=True)) | {k for k, _ in module.named_buffers()}
    ignore = [_BUFFERS] + [  # transformers' own lists, on whole name components ("attn.bias", not "c_attn.bias")
        re.compile(rf"(?:^|\.)(?:{p})(?:$|\.)")
        for m in module.modules() for p in getattr(m, "_keys_to_ignore_on_load_unexpected", None) or ()
    ]
    return [
        key for key, value in state.items()
        if key.startswith(strip) and key not in used and (mapped := add + key[len(strip):]) not in known
        and (value.is_floating_point() or value.is_complex()) and not any(p.search(mapped) for p in ignore)
    ]


def _aliases(module: nn.Module) -> dict[str, list[str]]:
    """For each parameter name, every name under which the same Parameter is registered (tied weights)."""
    by_id: dict[int, list[str]] = {}
    for name, value in module.state_dict(keep_vars=True).items():
        by_id.setdefault(id(value), []).append(name)
    params = module.named_parameters(remove_duplicate=False)
    return {name: [name] + [a for a in by_id.get(id(p), []) if a != name] for name, p in params}


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


def _match(
    label: str, module: nn.Module, state: Mapping[str, Tensor], names: Sequence[str], aliases: Mapping[str, list[str]]
) -> tuple[dict[str, str], str, str]:
    """The one prefix rewrite (strip from source keys, then add) matching the most names: name -> key, strip, add."""
    keys = [k for k, v in state.items() if v.is_floating_point() or v.is_complex()] or list(state)
    targets = list(module.state_dict(keep_vars=True))
    strips = {""} | _prefixes(keys, common=True) | _prefixes(keys, common=False, depth=1)
    adds = {""} | _prefixes(targets, common=True) | _prefixes(targets, common=False)
    best: dict[tuple[tuple[str, str], ...], tuple[str, str]] = {}
    top = 0
    for strip in sorted(strips, key=len):
        rename = {k[len(strip):]: k for k in state if k.startswith(strip)}
        for add in sorted(adds, key=len):
            assignment = {}
            for n in names:
                for alias in aliases.get(n, [n]):
                    if alias.startswith(add) and (key := rename.get(alias[len(add):])) is not None:
                        assignment[n] = key
                        break
            if len(assignment) > top:
                top, best = len(assignment), {}
            if assignment and len(assignment) == top:
                best.setdefault(tuple(sorted(assignment.items())), (strip, add))
    if not best:
        raise ValueError(
            f"{label}: none of its tensor names match {type(module).__name__}'s parameters, with or without "
            f"a prefix; source has {_listing(keys)}; the module has {_listing(list(names))}"
        )
    if len(best) > 1:
        ways = sorted(f"strip {s!r} add {a!r}" for s, a in best.values())
        raise ValueError(
            f"{label}: ambiguous prefix mapping onto {type(module).__name__}: {top} parameters match in "
            f"{len(best)} different ways ({_listing(ways)}); pass a source holding one model"
        )
    (assignment, (strip, add)), = best.items()
    return dict(assignment), strip, add


def _listing(items: Sequence[str], limit: int = _LIMIT) -> str:
    """At most `limit` items, comma separated, then how many more."""
    items = list(items)
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")
