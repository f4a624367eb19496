"""Seed sources opened for lazy reading: the names, dtypes and shapes a seed holds, known before any value is read.

`open_source` turns every kind of seed (a module, an in-memory state_dict, ``.ckpt``/``.pt``/``.bin`` pickles, a
``.safetensors`` file, a sharded ``*.index.json``, a ``save_pretrained`` folder or a hub id) into a `TensorStore`.
Safetensors files are opened per tensor read (``safe_open`` + ``get_tensor``), so only the tensor being read is
mapped in. Zip pickles (``torch.save`` since torch 1.6) are memory-mapped (``torch.load(mmap=True)``) and stay
mapped while the store lives; older non-zip pickles are loaded whole. Pickles are only read with
``weights_only=True``: a crafted file cannot run code. Every problem is a ValueError naming ``init_from[i]``.
"""

from __future__ import annotations

import math

import os
import pickle
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

#: What a seed may be: a path or hub id, a module, or a state_dict (name -> tensor).
SeedSource = str | os.PathLike | nn.Module | Mapping[str, Tensor]

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
    "a sharded checkpoint's *.index.json, a save_pretrained directory, a Hugging Face hub id, an nn.Module, "
    "or a state_dict (a mapping of names to tensors)"
)
_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".safetensors", ".json")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}(/[\w.-]{1,96})?$")
#: safetensors' dtype names (header "dtype") with torch's name for the same type; others are kept as text.
_SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2", "C64": "complex64", "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
}


@dataclass
class TensorStore:
    """The tensors of one seed by source key: dtype, shape and file known up front, each value read on demand."""

    label: str
    dtypes: dict[str, torch.dtype | str] = field(default_factory=dict)  # str: a safetensors type torch lacks
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)  # the file each key is read from; absent: in memory
    tensors: dict[str, Tensor] = field(default_factory=dict)  # in-memory or memory-mapped values
    canonical: dict[str, str] = field(default_factory=dict)  # key -> the first key holding the same tensor

    def add_tensors(self, tensors: Mapping[str, Tensor], file: Path | None = None) -> None:
        """Hold `tensors` (read from `file`, if any); keys sharing one tensor (tied copies) get one canonical key."""
        first: dict[tuple[Any, ...], str] = {}
        for key, value in tensors.items():
            self.dtypes[key], self.shapes[key], self.tensors[key] = value.dtype, tuple(value.shape), value
            if file is not None:
                self.files[key] = file
            same = (value.data_ptr(), value.dtype, tuple(value.shape), value.stride())
            self.canonical[key] = first.setdefault(same, key) if value.data_ptr() else key

    def where(self, key: str) -> str:
        """Where `key` is read from, for messages: its file, or "in memory"."""
        return str(self.files[key]) if key in self.files else "in memory"

    def read(self, key: str) -> Tensor:
        """The value of `key`, read now: a view of the memory-mapped file or the in-memory tensor (do not modify)."""
        if key in self.tensors:
            return self.tensors[key].detach()
        from safetensors import safe_open

        with safe_open(self.files[key], framework="pt") as f:
            return f.get_tensor(key)

    def read_rows(self, key: str, first: int, last: int) -> Tensor:
        """Leading rows [first, last) of `key` (the whole value for a 0-dim one), read now; a safetensors file is
        opened for this read alone, so its mapped pages are released when it returns."""
        if key in self.tensors or not self.shapes[key]:
            value = self.read(key)
            return value[first:last] if value.dim() else value
        from safetensors import safe_open

        with safe_open(self.files[key], framework="pt") as f:
            return f.get_slice(key)[first:last]

    def read_blocks(self, key: str, elements: int) -> Iterator[Tensor]:
        """The value of `key`, flat, in blocks of whole leading rows of about `elements` values, each read when
        it is reached; a safetensors file is opened per block (`get_slice`), so neither a copy of the whole
        tensor nor its memory-mapped pages are held at once."""
        shape = self.shapes[key]
        rows = shape[0] if shape else 1
        step = max(1, elements // max(1, math.prod(shape[1:]))) if shape else 1
        if key in self.tensors or not shape:
            value = self.read(key).reshape(rows, -1)
            yield from (value[i : i + step].reshape(-1) for i in range(0, rows, step))
            return
        from safetensors import safe_open

        for i in range(0, rows, step):
            with safe_open(self.files[key], framework="pt") as f:
                yield f.get_slice(key)[i : i + step].reshape(-1)


def open_source(source: SeedSource, index: int) -> TensorStore:
    """`source` opened as init_from[`index`]: its names, dtypes and shapes, with no weight read yet."""
    if isinstance(source, nn.Module):
        store = TensorStore(f"init_from[{index}] (module {type(source).__name__})")
        store.add_tensors(source.state_dict())
        return store
    if isinstance(source, Mapping):
        store = TensorStore(f"init_from[{index}] (state_dict of {len(source)} entries)")
        store.add_tensors(_checked_state(source, store.label))
        return store
    if not isinstance(source, str | os.PathLike):
        raise TypeError(f"init_from[{index}] is a {type(source).__name__}; expected {ACCEPTED}")
    path = Path(source)
    if not path.exists() and isinstance(source, str) and _HUB_ID.match(source) and not source.endswith(_SUFFIXES):
        label = f"init_from[{index}] (hub id {source!r})"
        return _open_directory(_download(source, label), label)
    kind = "directory" if path.is_dir() else "file"
    label = f"init_from[{index}] ({kind} {path})"
    if not path.exists():
        raise ValueError(f"{label} does not exist; expected {ACCEPTED}")
    return _open_directory(path, label) if path.is_dir() else _open_file(path, label)


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


def _open_directory(path: Path, label: str) -> TensorStore:
    """The weights of a ``save_pretrained`` folder (single file or sharded)."""
    for name in WEIGHT_FILES:
        if (path / name).is_file():
            return _open_file(path / name, label)
    raise ValueError(f"{label} holds none of {', '.join(WEIGHT_FILES)}; expected {ACCEPTED}")


def _open_file(path: Path, label: str) -> TensorStore:
    """One weight file opened; the format is told by the file's first bytes, not its name."""
    if path.name.endswith(".json"):
        from m2n2_lightning.merging.seed_index import open_index

        return open_index(path, label, _open_file)
    with open(path, "rb") as f:
        head = f.read(9)
    size = path.stat().st_size
    not_weights = f"{label} is not a checkpoint, state_dict, or safetensors file"
    store = TensorStore(label)
    if len(head) == 9 and head[8:] == b"{" and 8 + int.from_bytes(head[:8], "little") <= size:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(path, framework="pt") as f:
                keys = f.keys()  # a safe_open is not iterable
                for key in keys:
                    part = f.get_slice(key)
                    name = part.get_dtype()
                    store.dtypes[key] = getattr(torch, _SAFETENSORS_DTYPES.get(name, ""), name)
                    store.shapes[key], store.files[key], store.canonical[key] = tuple(part.get_shape()), path, key
        except SafetensorError as err:
            raise ValueError(f"{not_weights} (safetensors: {err}); expected {ACCEPTED}") from err
        return store
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
    store.add_tensors(_checked_state(content, label), path)
    return store


def _checked_state(content: Any, label: str) -> Mapping[str, Tensor]:
    """`content` if it is a non-empty mapping of names to tensors; a ValueError naming `label` otherwise."""
    if not isinstance(content, Mapping) or not content or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in content.items()
    ):
        raise ValueError(
            f"{label} holds a {type(content).__name__}, not a mapping of parameter names to tensors "
            "(a state_dict, or a Lightning checkpoint with a 'state_dict')"
        )
    return content
