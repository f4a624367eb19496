"""Merges written back (m2n2_lightning.merging.seeds.save_merged): a Hugging Face folder that from_pretrained loads, a
plain module with tied tensors, and sources.py working without transformers installed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from m2n2_lightning.merging.output import save_merged
from m2n2_lightning.merging.seeds import seed_parameters

pytest.importorskip("transformers")
from test_sources import Wrapper, assert_params_equal, original  # noqa: F401  (original: a module fixture)
from transformers import AutoModelForCausalLM, GPT2LMHeadModel


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


MERGING = Path(__file__).resolve().parents[1] / "m2n2_lightning" / "merging"


def test_importable_without_transformers() -> None:
    """merging.seeds and merging.output, with transformers and huggingface_hub unimportable, save a plain module."""
    code = (
        "import sys, tempfile, torch\n"
        "sys.modules['transformers'] = None; sys.modules['huggingface_hub'] = None\n"
        "import types\n"  # the package without its __init__, which imports lightning (and through it transformers)
        f"p = types.ModuleType('m2n2_lightning'); p.__path__ = [{str(MERGING.parent)!r}]\n"
        "sys.modules['m2n2_lightning'] = p\n"
        "from m2n2_lightning.merging import output as o, seeds as s\n"
        "d = o.save_merged(torch.nn.Linear(2, 2), tempfile.mkdtemp()); print((d / 'model.safetensors').is_file())\n"
        "try: s.seed_parameters(torch.nn.Linear(2, 2), 'someone/model')\n"
        "except ValueError as e: print('pip install' in str(e))"
    )
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "True"]
