"""The recipe of a merge (m2n2_lightning.merging.recipe, .rebuild): exact round trip through JSON, clear refusals of malformed
files, and a rebuild from the seeds that is bit-identical to the merge itself, checked against `write_form` over
the whole flat vector and against the module an M2N2 search left; other seeds, layouts or dtypes are refused."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch import nn

pytest.importorskip("transformers")
from test_hf_merge import PROMPTS, LanguageModule, generated_first_token, tiny_gpt2
from test_sources import llama

from m2n2_lightning import LayerwiseSlerpStrategy, M2N2Callback, M2N2Strategy
from m2n2_lightning.merging.output import save_merged
from m2n2_lightning.merging.rebuild import rebuild, rebuild_to
from m2n2_lightning.merging.recipe import RECIPE_FILE, Recipe, recipe_of
from m2n2_lightning.merging.seeds import read_seeds
from m2n2_lightning.params import FlatParams
from m2n2_lightning.strategies.mixture import write_form


def recipe_for(model: nn.Module, seeds: list[Path], cuts: list[int], table: list[list[float]], **fields) -> Recipe:
    """A hand-made recipe over `seeds` for `model`'s layout, with the digests the search's seed reading gives."""
    flat = FlatParams(model)
    digests = read_seeds(model, flat.names, seeds).digests
    return Recipe(
        seeds=tuple(map(str, seeds)), digests=tuple(digests), layout=tuple(flat.layout),
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."), method="M2N2Strategy",
        settings={"pop_size": 4, "chromosomes": None}, forward_passes=12, scores={"resources (12 examples)": 0.5},
        cuts=tuple(cuts), table=tuple(map(tuple, table)), architecture=type(model).__name__,
        library_version="0.1.0", **fields,
    )


@pytest.fixture(scope="module")
def llama_seeds(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two bf16 Llama seeds written by save_pretrained."""
    folders = []
    for seed in (1, 2):
        folders.append(tmp_path_factory.mktemp(f"llama{seed}"))
        llama(seed, layers=2).to(torch.bfloat16).save_pretrained(folders[-1])
    return folders


def test_round_trip_is_exact(tmp_path: Path, llama_seeds: list[Path]) -> None:
    model = llama(0, layers=2).to(torch.bfloat16)
    d = FlatParams(model).num_params
    awkward = [0.1 + 0.2, 1 / 3, 5e-324, -2.5e-17, 1 - 2**-53]  # none of them survives a decimal rounding
    recipe = recipe_for(model, llama_seeds, [7, d // 2, d - 1], [awkward[:2], awkward[2:4], [awkward[4], 0.0], [1.0, 0.0]])
    path = recipe.save(tmp_path / RECIPE_FILE)
    loaded = Recipe.load(path)
    assert loaded == recipe
    cuts, table = loaded.form
    assert cuts.dtype == torch.long and table.dtype == torch.float64 and table[0, 0].item() == 0.1 + 0.2
    assert path.stat().st_size < 8_000  # kilobytes: the layout of 2 layers, the form, the settings
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(format="other/2"), "format 'other/2'"),
        (lambda d: d.pop("layout"), "missing field 'layout'"),
        (lambda d: d["form"].update(cuts=[5, 5]), "strictly increasing"),
        (lambda d: d["form"].update(coefficients=[[1.0]]), "1 breakpoints need 2 rows"),
        (lambda d: d["form"]["coefficients"][0].append(0.0), "not 2 finite floats"),
        (lambda d: d["seeds"][0].update(sha256="abc"), "digest 0 is not a SHA-256"),
        (lambda d: d.update(dtype="float33"), "unknown dtype 'float33'"),
    ],
)
def test_malformed_recipes_are_refused(tmp_path: Path, llama_seeds: list[Path], edit, message: str) -> None:
    data = recipe_for(llama(0, layers=2), llama_seeds, [5], [[1.0, 0.0], [0.5, 0.5]]).to_dict()
    edit(data)
    path = tmp_path / "r.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message):
        Recipe.load(path)
    path.write_text('{"form": ')
    with pytest.raises(ValueError, match=rf"recipe {path} is not usable"):
        Recipe.load(path)
    with pytest.raises(ValueError, match="does not exist"):
        Recipe.load(tmp_path / "absent.json")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rebuild_equals_write_form_over_the_whole_vector(tmp_path: Path, dtype: torch.dtype) -> None:
    seeds, vectors = [], []
    for seed in (1, 2, 3):
        model = llama(seed, layers=2).to(dtype)
        model.save_pretrained(tmp_path / f"seed{seed}")
        seeds.append(tmp_path / f"seed{seed}")
        vectors.append(FlatParams(model).flatten(model))
    target = llama(0, layers=2).to(dtype)
    flat = FlatParams(target)
    d = flat.num_params
    cuts = [1, 100, 101, 2_000, d - 1]  # segments cut inside parameters and across their boundaries
    table = [[0.25, 0.75, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [-0.3, 0.9, 0.4], [0.1 + 0.2, 1 / 3, 0.5], [0.0, 1.0, 0.0]]
    recipe = recipe_for(target, seeds, cuts, table)
    expected = write_form(vectors, recipe.form, 0, d, torch.empty(d, dtype=dtype))
    reference = flat.load_into(llama(0, layers=2).to(dtype), expected)

    rebuilt = rebuild(recipe, target)
    for (name, got), want in zip(rebuilt.named_parameters(), reference.parameters()):
        assert torch.equal(got, want), name
    assert not torch.equal(target.model.embed_tokens.weight, llama(0, layers=2).to(dtype).model.embed_tokens.weight)


def test_rebuild_refuses_other_seeds_layouts_and_dtypes(tmp_path: Path, llama_seeds: list[Path]) -> None:
    model = llama(0, layers=2).to(torch.bfloat16)
    recipe = recipe_for(model, llama_seeds, [10], [[0.5, 0.5], [0.0, 1.0]])
    changed = llama(2, layers=2).to(torch.bfloat16)
    with torch.no_grad():
        changed.model.norm.weight[3] += 1  # one element of one norm weight
    changed.save_pretrained(tmp_path / "changed")
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"init_from\[1\] .*changed.* is not the seed the recipe was made from"):
        rebuild(recipe, model, seeds=[llama_seeds[0], tmp_path / "changed"])
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # nothing was written
    with pytest.raises(ValueError, match="convert it with model.to"):
        rebuild(recipe, llama(0, layers=2))
    with pytest.raises(ValueError, match=r"does not have the recipe's layout: model.layers.1"):
        rebuild(recipe, llama(0, layers=1).to(torch.bfloat16))
    with pytest.raises(ValueError, match="mixes 2 seeds, 1 given"):
        rebuild(recipe, model, seeds=llama_seeds[:1])


def first_token_of_lm(lm: nn.Module, batch: dict) -> torch.Tensor:
    """`generated_first_token` for a search whose target is the language model itself."""
    return generated_first_token(SimpleNamespace(model=lm), batch)


def run_search(tmp_path: Path, strategy, target_is_lm: bool) -> tuple[LanguageModule, M2N2Callback, list[Path]]:
    """A small merge of two GPT-2 seeds by generation (the module holds the best member afterwards)."""
    seeds = []
    for i in (1, 2):
        seeds.append(tmp_path / f"seed{i}")
        tiny_gpt2(i).save_pretrained(seeds[-1])
    module = LanguageModule(tiny_gpt2(3))
    evaluate = first_token_of_lm if target_is_lm else generated_first_token
    callback = M2N2Callback(strategy=strategy, init_from=seeds, evaluate=evaluate, resources=PROMPTS,
                            resource_batch_size=6, model=module.model if target_is_lm else None)
    trainer = L.Trainer(max_steps=8, callbacks=[callback], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module)
    return module, callback, seeds


@pytest.mark.parametrize("target_is_lm", [
    True,
    False,  # the search on a LightningModule ("model." names), the rebuild on the bare model
], ids=["model=lm", "lightning-module"])
def test_rebuild_is_bit_identical_to_the_search(tmp_path: Path, target_is_lm: bool) -> None:
    strategy = functools.partial(M2N2Strategy, pop_size=4, warmup_steps=2, storage="coefficients", seed=0)
    module, callback, _ = run_search(tmp_path, strategy, target_is_lm)
    assert len(callback.strategy.best_form()[0]) > 0  # the best member mixes the seeds on several segments
    out = save_merged(module, tmp_path / "merged", evolution=callback)
    recipe = Recipe.load(out / RECIPE_FILE)
    assert recipe.layout == tuple(FlatParams(module.model).layout)  # named as in the saved model, no "model."

    rebuilt = rebuild(recipe, tiny_gpt2(4))
    for (name, got), want in zip(rebuilt.named_parameters(), module.model.parameters(), strict=True):
        assert torch.equal(got, want), name
    again = rebuild_to(out / RECIPE_FILE, tmp_path / "rebuilt")  # from the recipe and the seeds alone
    for name, value in type(module.model).from_pretrained(again).state_dict().items():
        assert torch.equal(value, module.model.state_dict()[name]), name


@pytest.mark.slow  # a whole train.py / m2n2-merge run in a subprocess (CI runs it)
def test_console_rebuild_and_moved_seeds(tmp_path: Path) -> None:
    strategy = functools.partial(LayerwiseSlerpStrategy, popsize=4, seed=0)  # a form with one segment per layer
    module, callback, seeds = run_search(tmp_path, strategy, target_is_lm=True)
    out = save_merged(module, tmp_path / "merged", evolution=callback)
    moved = [seed.rename(tmp_path / f"moved{i}") for i, seed in enumerate(seeds)]
    with pytest.raises(ValueError, match="does not exist"):
        rebuild_to(out / RECIPE_FILE, tmp_path / "nowhere")
    assert not (tmp_path / "nowhere").exists()
    command = [sys.executable, "-m", "m2n2_lightning.merging.rebuild", str(out / RECIPE_FILE), str(tmp_path / "cli"),
               "--seeds", *map(str, moved)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(tmp_path / "cli")
    rebuilt = type(module.model).from_pretrained(tmp_path / "cli")
    for name, value in rebuilt.state_dict().items():
        assert torch.equal(value, module.model.state_dict()[name]), name
    assert str(moved[0]) in (tmp_path / "cli" / "README.md").read_text()


def test_dense_storage_has_no_recipe(tmp_path: Path) -> None:
    strategy = functools.partial(M2N2Strategy, pop_size=4, warmup_steps=2, storage="dense", seed=0)
    module, callback, _ = run_search(tmp_path, strategy, target_is_lm=True)
    out = save_merged(module, tmp_path / "merged", evolution=callback)
    assert not (out / RECIPE_FILE).exists()
    assert "no coefficient recipe" in (out / "README.md").read_text()
    recipe = recipe_of(callback, module.model)
    assert recipe.cuts is None and recipe.method == "M2N2Strategy"
    with pytest.raises(ValueError, match="holds no form"):
        rebuild(recipe, tiny_gpt2(4))
    with pytest.raises(ValueError, match="no recipe to save"):
        recipe.save(tmp_path / RECIPE_FILE)
