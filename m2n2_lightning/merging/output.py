"""A merge written out as a complete model directory: weights sharded like the seeds, tokenizer, card, recipe.

`save_merged` writes everything into a fresh folder beside the target and
renames it into place only once it is complete, so a kill at any moment
leaves either the earlier save or the new one, never half of one; the next
save removes the folders of writers that were killed (as
`m2n2_lightning.checkpointing` does for checkpoint files).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import uuid
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import nn

from m2n2_lightning.checkpointing import remove_orphans
from m2n2_lightning.merging.card import write_card
from m2n2_lightning.merging.recipe import (
    RECIPE_FILE,
    Recipe,
    checked_scores,
    is_hub_id,
    recipe_of,
)

#: Files that make an existing directory a saved model, which a new save may replace.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "diffusion_pytorch_model.safetensors",
                "diffusion_pytorch_model.safetensors.index.json")
#: Tokenizer files, copied verbatim from the first seed (or `tokenizer_from`) that has them.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
)
#: Copied with them: chat templates and the generation config.
COMPANION_FILES = ("chat_template.jinja", "chat_template.json", "generation_config.json")


def save_merged(
    module: nn.Module,
    directory: str | os.PathLike,
    *,
    evolution: Any = None,
    tokenizer_from: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    max_shard_size: int | str | None = None,
    test_scores: Mapping[str, float] | None = None,
) -> Path:
    """Write `module`'s weights, with the seeds' tokenizer, a model card and the recipe, to `directory`.

    A transformers or diffusers model (or a module holding exactly one as a
    direct child and no parameters outside it, such as a LightningModule's
    ``self.model``) is written with ``save_pretrained``; anything else as
    safetensors. Shards:
    `max_shard_size` ("2GB" or bytes), else the first seed's largest shard
    when it is sharded, else one file. Tokenizer files, chat template and
    generation config are copied from `tokenizer_from` (an error if it holds
    no tokenizer), else from the first seed folder (or hub repository) holding
    them; `tokenizer_from` given as a list (e.g. `[base]`) is tried first, in
    order, before the seeds, and none of them need hold one.

    `evolution` is the `M2N2Callback` of the search (after fit), or a
    `Recipe`: then README.md describes the merge (seeds and digests, method
    and settings, budget, scores on the resources and `test_scores`), and
    `m2n2_recipe.json` lets `merging.rebuild.rebuild` make it again where the
    strategy keeps forms. Refused before anything is written: an existing
    file at `directory`, or a directory that is not empty and not a saved
    model, or one a seed lives in. An earlier save at `directory` is
    replaced only once the new one is complete.
    """
    directory = Path(directory)
    hf = _pretrained_model(module)
    model = module if hf is None else hf
    if evolution is None:
        if test_scores is not None:
            raise ValueError("test_scores go into the model card, which needs evolution=<the M2N2Callback>")
        recipe = None
    elif isinstance(evolution, Recipe):
        recipe = dataclasses.replace(evolution, scores={**evolution.scores, **checked_scores(test_scores)})
    else:
        recipe = recipe_of(evolution, model, test_scores, type(hf).__name__ if _is_transformers(hf) else None)
    required = isinstance(tokenizer_from, str | os.PathLike)
    preferred = [tokenizer_from] if required else list(tokenizer_from or [])
    _check_target(directory, [] if recipe is None else recipe.seeds, preferred)
    seeds = [] if recipe is None else [s for s in recipe.seeds if s is not None]
    extras = _extra_files(preferred if required else [*preferred, *seeds], required)
    shard_size = _shard_size(max_shard_size, seeds)
    with _replacing(directory) as folder:
        if hf is not None:
            hf.save_pretrained(folder, max_shard_size=shard_size or _total_bytes(hf))
        elif shard_size is not None:
            from huggingface_hub import save_torch_model

            save_torch_model(module, folder, max_shard_size=shard_size)
        else:
            from safetensors.torch import save_model

            save_model(module, str(folder / "model.safetensors"))  # drops the duplicates of tied tensors
        for path in extras:
            shutil.copyfile(path, folder / path.name)
        if recipe is not None:
            write_card(recipe, folder, directory.name)
            if recipe.cuts is not None:
                recipe.save(folder / RECIPE_FILE)
    return directory


def _is_transformers(module: nn.Module | None) -> bool:
    """Whether `module` is a transformers PreTrainedModel (transformers is imported only for modules from it)."""
    if module is None or not any(c.__module__.startswith("transformers") for c in type(module).__mro__):
        return False
    from transformers import PreTrainedModel

    return isinstance(module, PreTrainedModel)


def _is_diffusers(module: nn.Module) -> bool:
    """Whether `module` is a diffusers ModelMixin (a U-Net: `save_pretrained` writes diffusion_pytorch_model.*)."""
    if not any(c.__module__.startswith("diffusers") for c in type(module).__mro__):
        return False
    from diffusers import ModelMixin

    return isinstance(module, ModelMixin)


def _pretrained_model(module: nn.Module) -> nn.Module | None:
    """`module` if it is a transformers or diffusers model, or its one such direct child holding all its parameters."""
    def is_hf(m: nn.Module) -> bool:
        return _is_transformers(m) or _is_diffusers(m)

    if is_hf(module):
        return module
    children = [c for c in module.children() if is_hf(c)]
    inside = {id(p) for p in children[0].parameters()} if len(children) == 1 else set()
    return children[0] if inside and all(id(p) in inside for p in module.parameters()) else None


def _check_target(directory: Path, seeds: Sequence[str | None], tokenizer_from: Sequence[str | os.PathLike]) -> None:
    """Refuse a file, a directory that is neither empty nor a saved model, and a seed's own folder."""
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"{directory} is an existing file; save_merged writes a directory: pass another path")
    if directory.is_dir() and any(directory.iterdir()) and not any((directory / f).is_file() for f in WEIGHT_FILES):
        raise FileExistsError(
            f"{directory} exists and is not a saved model (it holds none of {', '.join(WEIGHT_FILES)}); save_merged "
            "replaces only an empty directory or an earlier save: pass another path"
        )
    for what, source in [*((f"seed {i}", s) for i, s in enumerate(seeds)), *(("tokenizer_from", t) for t in tokenizer_from)]:
        path = Path(source).resolve() if source is not None and Path(source).exists() else None
        if path is not None and (path == directory.resolve() or directory.resolve() in path.parents):
            raise ValueError(f"{directory} holds {what} ({source}): saving there would replace it; pass another path")


def _extra_files(sources: Sequence[str | os.PathLike], required: bool) -> list[Path]:
    """The tokenizer and companion files of the first source folder holding a tokenizer file."""
    names = TOKENIZER_FILES + COMPANION_FILES
    for source in sources:
        folder = _local_folder(source, names, required)
        files = [folder / name for name in names if (folder / name).is_file()] if folder is not None else []
        if any(path.name in TOKENIZER_FILES for path in files):
            return files
        if required:
            raise ValueError(f"tokenizer_from={source!r} holds no tokenizer file ({', '.join(TOKENIZER_FILES)})")
    return []


def _local_folder(source: str | os.PathLike, files: Sequence[str], required: bool) -> Path | None:
    """The folder of a directory or sharded-index source, or a hub repository's snapshot of `files` (downloaded;
    a failed download is an error when `required`, else a warning)."""
    path = Path(source)
    if path.is_dir():
        return path
    if path.is_file():
        return path.parent if path.name.endswith(".index.json") else None
    if not is_hub_id(str(source)):
        return None
    import huggingface_hub

    try:
        return Path(huggingface_hub.snapshot_download(str(source), allow_patterns=list(files)))
    except Exception as err:  # network, auth and not-found errors all mean the same here
        problem = f"fetching the tokenizer files of {source!r} from the hub failed ({type(err).__name__}: {err})"
        if required:
            raise ValueError(f"tokenizer_from: {problem}") from err
        warnings.warn(f"{problem}: the merge is saved without them; pass tokenizer_from=<a folder>", stacklevel=4)
        return None


def _shard_size(max_shard_size: int | str | None, seeds: Sequence[str]) -> int | str | None:
    """The shard size asked for, else the first seed's largest shard (tensor bytes), else None (one file)."""
    if max_shard_size is not None:
        if isinstance(max_shard_size, bool) or not isinstance(max_shard_size, (int, str)) or (
            isinstance(max_shard_size, int) and max_shard_size <= 0
        ):
            raise ValueError(f"max_shard_size must be a positive number of bytes or a size like '2GB', "
                             f"got {max_shard_size!r}")
        return max_shard_size
    index = _seed_index(seeds[0]) if seeds else None
    if index is None:
        return None
    shards = set(json.loads(index.read_text())["weight_map"].values())
    return max(_data_bytes(index.parent / shard) for shard in shards)


def _seed_index(source: str) -> Path | None:
    """The sharded-checkpoint index of a seed folder, index file or cached hub repository, if it has one."""
    path = Path(source)
    if path.is_file():
        return path if path.name.endswith(".index.json") else None
    if path.is_dir():
        return next(iter(sorted(path.glob("*.index.json"))), None)
    if not is_hub_id(source):
        return None
    from huggingface_hub import try_to_load_from_cache

    cached = [try_to_load_from_cache(source, f"{stem}.index.json") for stem in ("model.safetensors", "pytorch_model.bin")]
    return next((Path(c) for c in cached if isinstance(c, str)), None)


def _data_bytes(shard: Path) -> int:
    """A shard's tensor bytes: a safetensors file without its header (8-byte length, then JSON), else its size.

    Saving with the largest seed shard's tensor bytes as the limit gives the
    seeds' split again (the same tensors, each shard under the limit).
    """
    size = shard.stat().st_size
    if shard.suffix != ".safetensors":
        return size
    with open(shard, "rb") as file:
        return size - 8 - int.from_bytes(file.read(8), "little")


def _total_bytes(module: nn.Module) -> int:
    """Bytes of `module`'s state: a shard size under which it is written as one file."""
    return max(1, sum(t.numel() * t.element_size() for t in module.state_dict().values()))


@contextmanager
def _replacing(target: Path) -> Iterator[Path]:
    """A new folder beside `target` that replaces it once the block has written it in full.

    Named ``.<name>.<host>-<pid>-<random>.tmp``; folders of this host whose
    writer is gone are removed first (`checkpointing.remove_orphans`). An
    earlier save at `target` is moved aside under such a name, the new one
    renamed into place, and the old one deleted.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{target.name}.{socket.gethostname()}-"
    remove_orphans(target.parent, prefix)
    folder = target.parent / f"{prefix}{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    folder.mkdir()
    try:
        yield folder
        _sync(folder)
        if target.exists():
            old = folder.with_name(folder.name.removesuffix(".tmp") + "-old.tmp")
            os.replace(target, old)
            os.replace(folder, target)
            shutil.rmtree(old)
        else:
            os.replace(folder, target)
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # gone after the rename; removes a failed save's files


def _sync(folder: Path) -> None:
    """fsync every file in `folder`, then the folder, so that the rename publishes written bytes."""
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as file:
                os.fsync(file.fileno())
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)
