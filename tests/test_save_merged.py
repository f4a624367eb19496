"""Merges written out (m2n2_lightning.merging.output.save_merged): a complete model directory (weights sharded like
the seeds, their tokenizer, chat template and generation config, a model card), refusals that leave what exists
untouched, an earlier save replaced only by a complete one, and the leftovers of a killed writer removed."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from m2n2_lightning import __version__
from m2n2_lightning.merging.output import save_merged
from m2n2_lightning.merging.seeds import seed_parameters

pytest.importorskip("transformers")
from test_recipe import recipe_for
from test_sources import Wrapper, assert_params_equal, llama, original  # noqa: F401  (original: a module fixture)
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
)

from m2n2_lightning.merging.card import model_card

CHAT_TEMPLATE = "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}"
TOKENIZER_FILES = ["chat_template.jinja", "generation_config.json", "tokenizer.json", "tokenizer_config.json"]


def test_save_merged_round_trip(original: GPT2LMHeadModel, tmp_path: Path) -> None:  # noqa: F811 (the fixture)
    for module in (original, Wrapper(original)):
        folder = save_merged(module, tmp_path / type(module).__name__)
        assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
        loaded = AutoModelForCausalLM.from_pretrained(folder)
        assert_params_equal(dict(loaded.named_parameters()), original, seeds=False)
        assert loaded.lm_head.weight is loaded.transformer.wte.weight

    tied = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 5))
    tied[1].weight = tied[0].weight  # shared tensors would make safetensors.save_file fail
    folder = save_merged(tied, tmp_path / "plain" / "nested")
    saved = load_file(folder / "model.safetensors")
    assert torch.equal(saved["0.weight"], tied[0].weight.detach())
    assert torch.equal(saved["1.bias"], tied[1].bias.detach())
    assert_params_equal(seed_parameters(nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 5)), folder,
                                        names=["0.weight", "1.bias"]), tied)


def shard_groups(folder: Path) -> list[list[str]]:
    """The tensor names of each shard of a sharded save, in shard order."""
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    return [sorted(k for k, v in weight_map.items() if v == shard) for shard in sorted(set(weight_map.values()))]


def tokenizer_folder(folder: Path) -> Path:
    """Write a tiny word-level tokenizer with a chat template, and a generation config, into `folder`."""
    words = ["<s>", "</s>", "<unk>", "hello", "world", "merge"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    GenerationConfig(max_new_tokens=7, eos_token_id=1, do_sample=False).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sharded_seeds(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two Llama seeds in two shards each; the second also holds a tokenizer, a chat template and generation config."""
    folders = []
    for seed in (1, 2):
        folders.append(tmp_path_factory.mktemp(f"seed{seed}"))
        llama(seed, layers=2).save_pretrained(folders[-1], max_shard_size=20_000)
    tokenizer_folder(folders[1])
    return folders


def test_sharded_like_the_seeds_and_loadable(sharded_seeds: list[Path], tmp_path: Path) -> None:
    merged = llama(0, layers=2)
    recipe = recipe_for(merged, sharded_seeds, [100], [[0.5, 0.5], [1.0, 0.0]])
    out = save_merged(merged, tmp_path / "merged", evolution=recipe)
    assert len(shard_groups(sharded_seeds[0])) == 2
    assert shard_groups(out) == shard_groups(sharded_seeds[0])
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert_params_equal(dict(loaded.named_parameters()), merged, seeds=False)

    finer = save_merged(merged, tmp_path / "finer", evolution=recipe, max_shard_size=5_000)  # asked for: wins
    assert len(shard_groups(finer)) > 2
    single = save_merged(merged, tmp_path / "single")  # no seeds known: one file
    assert sorted(p.name for p in single.glob("*.safetensors")) == ["model.safetensors"]

    plain = nn.Sequential(nn.Linear(40, 40), nn.Linear(40, 40))
    folder = save_merged(plain, tmp_path / "plain", max_shard_size=7_000)
    assert len(shard_groups(folder)) == 2
    for name, value in plain.state_dict().items():
        shard = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"][name]
        assert torch.equal(load_file(folder / shard)[name], value), name
    with pytest.raises(ValueError, match="max_shard_size must be a positive"):
        save_merged(plain, tmp_path / "bad", max_shard_size=0)
    assert not (tmp_path / "bad").exists()


def test_tokenizer_chat_template_and_generation_config(sharded_seeds: list[Path], tmp_path: Path) -> None:
    merged = llama(0, layers=2)
    recipe = recipe_for(merged, sharded_seeds, [100], [[0.5, 0.5], [1.0, 0.0]])
    out = save_merged(merged, tmp_path / "merged", evolution=recipe)  # seed 0 has none: seed 1's are copied
    for name in TOKENIZER_FILES:
        assert (out / name).read_bytes() == (sharded_seeds[1] / name).read_bytes(), name
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer("hello merge world")["input_ids"] == [3, 5, 4]
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False)
    assert chat == "<s>hello</s>"
    assert GenerationConfig.from_pretrained(out).max_new_tokens == 7

    other = tokenizer_folder(tmp_path / "other")
    (other / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    named = save_merged(merged, tmp_path / "named", evolution=recipe, tokenizer_from=other)
    assert (named / "chat_template.jinja").read_text() == "{{ messages[0]['content'] }}"
    with pytest.raises(ValueError, match="tokenizer_from=.* holds no tokenizer file"):
        save_merged(merged, tmp_path / "none", tokenizer_from=sharded_seeds[0])
    assert not (tmp_path / "none").exists()
    bare = save_merged(merged, tmp_path / "bare")  # no seeds, nothing named: weights alone
    assert not (bare / "tokenizer.json").exists() and not (bare / "README.md").exists()


def test_hub_seeds(sharded_seeds: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A seed given as a hub id: its tokenizer files are fetched (only those), and the card names it as base_model;
    a failed fetch saves the merge without them and says so."""
    import huggingface_hub
    from huggingface_hub import ModelCard

    merged = llama(0, layers=2)
    recipe = recipe_for(merged, sharded_seeds, [100], [[0.5, 0.5], [1.0, 0.0]])
    recipe = dataclasses.replace(recipe, seeds=("someone/seed-a", str(sharded_seeds[0])))
    calls = []

    def fake_download(repo_id: str, allow_patterns: list[str]) -> str:
        calls.append((repo_id, allow_patterns))
        return str(sharded_seeds[1])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    out = save_merged(merged, tmp_path / "merged", evolution=recipe)
    assert [repo for repo, _ in calls] == ["someone/seed-a"] and "model.safetensors" not in calls[0][1]
    assert (out / "tokenizer.json").read_bytes() == (sharded_seeds[1] / "tokenizer.json").read_bytes()
    assert ModelCard.load(out / "README.md").data.base_model == ["someone/seed-a"]

    def failing(repo_id: str, allow_patterns: list[str]) -> str:
        raise OSError("no connection")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", failing)
    with pytest.warns(UserWarning, match="'someone/seed-a' from the hub failed .*no connection.*saved without them"):
        out = save_merged(merged, tmp_path / "offline", evolution=recipe)
    assert (out / "README.md").is_file() and not (out / "tokenizer.json").exists()
    with pytest.raises(ValueError, match="tokenizer_from: fetching .* failed"):
        save_merged(merged, tmp_path / "named", tokenizer_from="someone/tokenizer")
    assert not (tmp_path / "named").exists()


def test_model_card(sharded_seeds: list[Path], tmp_path: Path) -> None:
    from huggingface_hub import ModelCard

    merged = llama(0, layers=2)
    recipe = recipe_for(merged, sharded_seeds, [100, 2_000], [[0.5, 0.5], [1.0, 0.0], [0.25, 0.75]])
    out = save_merged(merged, tmp_path / "merged", evolution=recipe, test_scores={"gsm8k test": 0.625})
    text = (out / "README.md").read_text()
    for expected in (*map(str, sharded_seeds), *recipe.digests, "M2N2Strategy", "`pop_size` | `4`", "12 evaluations",
                     "resources (12 examples) | 0.5000", "gsm8k test | 0.6250", "[m2n2-lightning](",
                     __version__, "3 segments", "`model.embed_tokens.weight`[100] | 1 | 0 |",
                     "m2n2_lightning.merging.rebuild m2n2_recipe.json"):
        assert expected in text, expected
    card = ModelCard.load(out / "README.md")
    assert card.data.tags == ["merge", "m2n2"] and card.data.library_name == "transformers"
    assert card.data.base_model is None  # local seeds: the hub's metadata cannot name them

    hub = recipe_for(merged, sharded_seeds, [100], [[0.5, 0.5], [1.0, 0.0]])
    hub = dataclasses.replace(hub, seeds=("org/model-a", str(sharded_seeds[1])))
    front = model_card(hub, "t").split("---")[1]
    assert "base_model:\n- org/model-a\n" in front and str(sharded_seeds[1]) not in front
    many = recipe_for(merged, sharded_seeds, list(range(1, 45)), [[1.0, float(i)] for i in range(45)])
    rows = [line for line in model_card(many, "t").splitlines() if line.startswith("| `model.")]
    assert len(rows) == 40 and "| ... 5 more in `m2n2_recipe.json` | | |" in model_card(many, "t")
    with pytest.raises(ValueError, match=r"test_scores\['x'\] is nan"):
        save_merged(merged, tmp_path / "nan", evolution=recipe, test_scores={"x": float("nan")})
    with pytest.raises(ValueError, match="needs evolution"):
        save_merged(merged, tmp_path / "nan", test_scores={"x": 0.5})
    assert not (tmp_path / "nan").exists()


def test_refusals_leave_everything_untouched(original: GPT2LMHeadModel, sharded_seeds: list[Path],  # noqa: F811
                                            tmp_path: Path) -> None:
    target = tmp_path / "a_file"
    target.write_bytes(b"keep me")
    for module in (original, nn.Linear(2, 2)):
        with pytest.raises(FileExistsError, match="is an existing file"):
            save_merged(module, target)
        assert target.read_bytes() == b"keep me"
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="is not a saved model"):
        save_merged(original, notes)
    assert [p.name for p in notes.iterdir()] == ["todo.txt"]
    merged = llama(0, layers=2)
    recipe = recipe_for(merged, sharded_seeds, [100], [[0.5, 0.5], [1.0, 0.0]])
    before = sorted(p.name for p in sharded_seeds[0].iterdir())
    with pytest.raises(ValueError, match="holds seed 0"):
        save_merged(merged, sharded_seeds[0], evolution=recipe)
    assert sorted(p.name for p in sharded_seeds[0].iterdir()) == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_an_earlier_save_is_replaced_whole(sharded_seeds: list[Path], tmp_path: Path) -> None:
    merged = llama(0, layers=2)
    recipe = recipe_for(merged, sharded_seeds, [100], [[0.5, 0.5], [1.0, 0.0]])
    out = save_merged(merged, tmp_path / "merged", evolution=recipe)
    assert len(list(out.glob("model-*.safetensors"))) == 2
    again = llama(5, layers=2)
    save_merged(again, out)  # one file now: the earlier shards, card and tokenizer go with the earlier save
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    assert_params_equal(dict(AutoModelForCausalLM.from_pretrained(out).named_parameters()), again, seeds=False)
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]


def test_killed_writer_leaves_the_earlier_save_and_is_cleaned_up(tmp_path: Path) -> None:
    target = tmp_path / "merged"
    first = nn.Linear(3, 3)
    save_merged(first, target)
    code = (  # a save that stops inside the write (state_dict is what safetensors reads), then is killed
        "import sys, time, torch\n"
        "from m2n2_lightning.merging.output import save_merged\n"
        "class Slow(torch.nn.Linear):\n"
        "    def state_dict(self, *args, **kwargs):\n"
        "        print('writing', flush=True); time.sleep(600)\n"
        "save_merged(Slow(3, 3), sys.argv[1])\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code, str(target)], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        assert child.stdout.readline().strip() == "writing"
        leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".merged.") and p.name.endswith(".tmp")]
        assert len(leftovers) == 1 and leftovers[0].is_dir()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL
    assert torch.equal(load_file(target / "model.safetensors")["weight"], first.weight.detach())  # intact
    second = nn.Linear(3, 3)
    save_merged(second, target)
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]  # the dead writer's folder is gone
    assert torch.equal(load_file(target / "model.safetensors")["weight"], second.weight.detach())


def test_importable_without_transformers(tmp_path: Path) -> None:
    """Without transformers and huggingface_hub installed (imports and package metadata hidden), a plain module is
    saved, and a hub id for a seed asks for the extra."""
    code = (
        "import importlib.metadata as md, sys\n"
        "real = md.distribution\n"
        "def distribution(name):\n"
        "    if name.lower().replace('_', '-') in ('transformers', 'huggingface-hub'):\n"
        "        raise md.PackageNotFoundError(name)\n"
        "    return real(name)\n"
        "md.distribution = distribution\n"
        "sys.modules['transformers'] = None; sys.modules['huggingface_hub'] = None\n"
        "import torch\n"
        "from m2n2_lightning.merging.output import save_merged\n"
        "from m2n2_lightning.merging.seeds import seed_parameters\n"
        "print((save_merged(torch.nn.Linear(2, 2), sys.argv[1]) / 'model.safetensors').is_file())\n"
        "try: seed_parameters(torch.nn.Linear(2, 2), 'someone/model')\n"
        "except ValueError as e: print('pip install' in str(e))"
    )
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "out")], check=False, capture_output=True,
                            text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "True"]
