"""The language-model merge through train.py on 2 gloo ranks ends where 1 rank does (issue 25, point 6).

Each rank scores its contiguous shard of the training prompts; with a fixed `module.block_size`
the batches are the same on 1 and 2 ranks, so the scores, the archive, the curves and the best
member must be identical, bit for bit. (Before the pacing dataloader was bounded, DDP's sampler
built `randperm(10**9)` and no step was ever made.)
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_lm_entry import tiny_seeds, train_lm
from test_lm_merge import tiny  # noqa: F401  (the tiny seed models, a module fixture)

#: Prompts per evaluator block: the 200 training prompts make 2 blocks, one per rank.
BLOCK = ("module.block_size=100",)
DDP = ("trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2")
#: What differs between two identical runs: the clock and the folder.
VOLATILE = ("wall_seconds", "forward_passes_per_second", "output_dir")


def result(run_dir: Path) -> tuple[dict, list[dict[str, str]], dict[str, torch.Tensor]]:
    """summary.json without its clock, curves.csv without its clock, and the saved merge's tensors."""
    summary = {k: v for k, v in json.loads((run_dir / "summary.json").read_text()).items() if k not in VOLATILE}
    with (run_dir / "curves.csv").open() as f:
        curve = [{k: v for k, v in row.items() if k != "wall_seconds"} for row in csv.DictReader(f)]
    weights = {}
    for path in sorted((run_dir / "best_model").glob("*.safetensors")):
        weights.update(load_file(path))
    return summary, curve, weights


def assert_same_run(two: Path, one: Path) -> None:
    (summary2, curve2, weights2), (summary1, curve1, weights1) = result(two), result(one)
    assert summary2 == summary1
    assert curve2 == curve1
    assert weights2.keys() == weights1.keys() and weights1
    for name, tensor in weights1.items():
        assert torch.equal(weights2[name], tensor), name


def test_two_gloo_ranks_merge_as_one(tiny: Path, tmp_path: Path) -> None:  # noqa: F811
    # char_fraction: continuous scores, so that the archive and the curve carry information
    args = (*tiny_seeds(tiny), "merge.tasks.skills.score=char_fraction", "forward_passes=10", *BLOCK)
    one = train_lm(tmp_path / "one", *args)
    two = train_lm(tmp_path / "two", *args, *DDP)
    assert_same_run(tmp_path / "two", tmp_path / "one")
    assert one["forward_passes"] == two["forward_passes"] == 10
    _, curve, _ = result(tmp_path / "one")
    assert float(curve[-1]["best_score"]) > 0 and len({row["fitness_entropy"] for row in curve}) == len(curve)


@pytest.mark.slow
def test_two_gloo_ranks_merge_the_reduced_seeds_as_one(tmp_path: Path) -> None:
    env = {"M2N2_LM_CACHE": str(tmp_path / "cache")}
    args = ("lm.reduced=true", "forward_passes=30", *BLOCK)
    train_lm(tmp_path / "one", *args, env=env)
    train_lm(tmp_path / "two", *args, *DDP, env=env)
    assert_same_run(tmp_path / "two", tmp_path / "one")
