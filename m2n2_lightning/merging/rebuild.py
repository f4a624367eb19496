"""A merge made again from its recipe and its seeds, without any search: bit-identical to the one the search left.

`rebuild` writes the recipe's form into a model parameter by parameter with
`write_form`, the function the search itself writes its members with, from
each seed's tensors for that parameter alone (read lazily by
`merging.seeds.SeedReader`): the same arithmetic on the same values, so the
same bits. `rebuild_to` (also ``python -m m2n2_lightning.merging.rebuild``)
writes a complete model directory from a recipe file.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from m2n2_lightning.merging.output import save_merged
from m2n2_lightning.merging.recipe import RECIPE_FILE, Recipe, is_hub_id
from m2n2_lightning.merging.seeds import SeedReader, SeedSource
from m2n2_lightning.strategies.mixture import write_form


def _readers(model: nn.Module, sources: Sequence[SeedSource], names: Sequence[str]) -> list[SeedReader]:
    """The seeds opened on `model`'s parameters `names`, checked against them before any value is read."""
    return [SeedReader(model, source, i, names) for i, source in enumerate(sources)]


def _read_in_full(reader: SeedReader, first: bool) -> str:
    """`reader`'s digest after reading what the search read: every name in order, then the first seed's buffers."""
    for name in reader.names:
        reader.tensor(name)
    if first:
        reader.buffers()
    return reader.digest()


@torch.no_grad()
def rebuild(recipe: Recipe, model: nn.Module, seeds: Sequence[SeedSource] | None = None) -> nn.Module:
    """Write the recipe's merge into `model`'s parameters, parameter by parameter; returns `model`.

    `seeds` (default: the recipe's sources) must be the seeds the search
    used: the model's parameter names, sizes and dtype, then the seeds'
    digests (one streaming read of each) are checked before anything is
    written. Each parameter is then written by `write_form` from the seeds'
    tensors for it alone, in the dtype the search stacked them in (the first
    seed's). Buffers come from the first seed, as in the search; parameters
    outside the layout keep the model's values.
    """
    form = recipe.form
    if form is None:
        raise ValueError(f"the recipe of this {recipe.method} merge holds no form: it cannot be rebuilt")
    sources = list(recipe.seeds if seeds is None else seeds)
    if len(sources) != len(recipe.seeds):
        raise ValueError(f"the recipe mixes {len(recipe.seeds)} seeds, {len(sources)} given")
    if unknown := [i for i, s in enumerate(sources) if s is None]:
        raise ValueError(f"seeds {unknown} of the recipe were in-memory modules: pass them as seeds=[...]")
    params = dict(model.named_parameters())
    wrong = [f"{name} ({'absent' if name not in params else f'{params[name].numel()} values'}, recipe: {numel})"
             for name, numel in recipe.layout if name not in params or params[name].numel() != numel]
    if wrong:
        raise ValueError(f"{type(model).__name__} does not have the recipe's layout: {', '.join(wrong[:10])}")
    names = [name for name, _ in recipe.layout]
    if recipe.dtype is not None and (other := {str(params[n].dtype) for n in names} - {f"torch.{recipe.dtype}"}):
        raise ValueError(f"the recipe's merge is in {recipe.dtype}, {type(model).__name__} has {sorted(other)}: "
                         f"convert it with model.to(torch.{recipe.dtype}) first")
    for i, (reader, expected) in enumerate(zip(_readers(model, sources, names), recipe.digests)):
        if expected is not None and (found := _read_in_full(reader, i == 0)) != expected:
            raise ValueError(f"{reader.label} is not the seed the recipe was made from: its SHA-256 "
                             f"is {found}, the recipe's seed {i} ({recipe.seeds[i]}) has {expected}")
    readers = _readers(model, sources, names)
    dtype = readers[0].dtype(names[0])  # read_seeds stacks every seed in this dtype
    offset = 0
    for name, numel in recipe.layout:
        parts = [reader.tensor(name).to(dtype) for reader in readers]
        write_form(parts, form, offset, offset + numel, params[name].data, offset)
        offset += numel
    buffers = dict(model.named_buffers())
    for name, value in readers[0].buffers().items():
        buffers[name].copy_(value)
    changed = [r.label for r, expected in zip(readers, recipe.digests) if expected not in (None, r.digest())]
    if changed:
        raise ValueError(f"{', '.join(changed)} changed while the merge was being rebuilt: rebuild again")
    return model


def rebuild_to(recipe_path: str | os.PathLike, out_dir: str | os.PathLike,
               seeds: Sequence[str | os.PathLike] | None = None) -> Path:
    """Write a complete model directory (weights, tokenizer, card, recipe) from a recipe and its seeds alone.

    The model is the recipe's transformers class loaded from the first seed
    (its buffers and any parameter outside the layout come from there), the
    merge is `rebuild` into it, and `save_merged` writes it out.
    """
    recipe = Recipe.load(recipe_path)
    if seeds is not None:
        recipe = dataclasses.replace(recipe, seeds=tuple(map(str, seeds)))
    if recipe.architecture is None or recipe.form is None:
        raise ValueError(f"recipe {recipe_path} holds no transformers architecture or no form: build the model "
                         "yourself and call rebuild(recipe, model, seeds)")
    if missing := [f"seed {i} ({s})" for i, s in enumerate(recipe.seeds) if not (Path(s).exists() or is_hub_id(s))]:
        raise ValueError(f"{', '.join(missing)} of recipe {recipe_path} does not exist: pass where the seeds are now "
                         "as seeds=[...] (--seeds on the command line)")
    import transformers

    model_class = getattr(transformers, recipe.architecture)
    dtype = getattr(torch, recipe.dtype) if recipe.dtype else None
    model = model_class.from_pretrained(recipe.seeds[0], torch_dtype=dtype)
    rebuild(recipe, model)
    return save_merged(model, out_dir, evolution=recipe)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m m2n2_lightning.merging.rebuild RECIPE OUT [--seeds A B ...]``: `rebuild_to` from a console."""
    import argparse

    parser = argparse.ArgumentParser(description="Rebuild a merge from its m2n2_recipe.json and its seeds.")
    parser.add_argument("recipe", help=f"the recipe file ({RECIPE_FILE} in a merge directory)")
    parser.add_argument("out", help="the directory to write the model to")
    parser.add_argument("--seeds", nargs="+", help="where the seeds are now (default: the recipe's sources)")
    args = parser.parse_args(argv)
    print(rebuild_to(args.recipe, args.out, args.seeds))


if __name__ == "__main__":
    main()
