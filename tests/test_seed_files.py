"""Seeds that stay in their files (`M2N2Callback(seeds_in="files")`, `merging.seed_store.SeedFiles`): the same merge
as with the seeds in memory, bit for bit, and a process that never holds them."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from m2n2_lightning import FlatParams
from m2n2_lightning.merging.seed_store import SeedFiles
from m2n2_lightning.strategies.mixture import write_form

from test_merge_seeds_path import merge
from test_sources import llama


def save_sharded(tmp_path: Path, dtype: torch.dtype, layers: int) -> list[Path]:
    dirs = []
    for seed in (1, 2):
        dirs.append(tmp_path / f"seed{seed}")
        llama(seed, layers=layers).to(dtype).save_pretrained(dirs[-1], max_shard_size="4KB")
    assert len(list(dirs[0].glob("model-*.safetensors"))) > 1
    return dirs


def test_segments_read_from_the_files_equal_the_seeds(tmp_path: Path) -> None:
    sharded_seeds = save_sharded(tmp_path, torch.bfloat16, layers=2)
    target = llama(0, layers=2).to(torch.bfloat16)
    flat = FlatParams(target)
    files = SeedFiles(target, flat, sharded_seeds)
    models = [llama(seed, layers=2).to(torch.bfloat16) for seed in (1, 2)]
    vectors = torch.stack([flat.flatten(model) for model in models])
    assert files.shape == tuple(vectors.shape) and files.dtype == torch.bfloat16
    d = files.shape[1]
    for start, stop in ((0, d), (5, 17), (d - 700, d - 3), (640, 641)):  # across tensors and inside one
        for k in range(2):
            assert torch.equal(files.segment(k, start, stop), vectors[k, start:stop]), (k, start, stop)
    form = (torch.tensor([7, d // 2]), torch.tensor([[0.3, 0.8], [1.0, 0.0], [0.25, 0.75]], dtype=torch.float64))
    from_files, from_memory = torch.empty(d, dtype=torch.bfloat16), torch.empty(d, dtype=torch.bfloat16)
    write_form(files, form, 0, d, from_files)
    write_form(vectors, form, 0, d, from_memory)
    assert torch.equal(from_files, from_memory)


@pytest.mark.parametrize("storage", ["coefficients", "dense"])
def test_the_merge_equals_the_one_with_seeds_in_memory(storage: str, tmp_path: Path) -> None:
    sharded_seeds = save_sharded(tmp_path, torch.float32, layers=1)
    results = []
    for seeds_in in ("memory", "files"):
        module, callback = merge(sharded_seeds, 6, storage, tmp_path / seeds_in, checkpoints=False, seeds_in=seeds_in)
        strategy = callback.engine.strategy
        if storage == "coefficients":
            assert isinstance(strategy.archive.seeds, SeedFiles) == (seeds_in == "files")
        results.append((FlatParams(module.model).flatten(module.model), strategy.archive.scores.clone(),
                        callback.seed_digests))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    assert results[0][2] == results[1][2]


MEASURE = """
import functools, re, sys, torch
from torch import nn
sys.path.insert(0, sys.argv[3])
import lightning as L
from test_merge_seeds_path import Holder
from m2n2_lightning import M2N2Callback, M2N2Strategy

def peak():
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

class Wide(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(4096, 32768, dtype=torch.bfloat16))  # 256 MiB

    def forward(self, input_ids):
        return self.weight[:4, :8].float().sum() * torch.ones(len(input_ids))

model = Wide()
model.weight.data.fill_(1.0)  # its pages resident before the baseline is taken
before = peak()
callback = M2N2Callback(strategy=functools.partial(M2N2Strategy, pop_size=4, storage="coefficients"),
                        init_from=sys.argv[1:3], evaluate=lambda m, batch: torch.sigmoid(m(batch[0])),
                        resources=[(torch.zeros(1),)] * 4, model=model, seeds_in=sys.argv[4],
                        best_in_training_step=False)
L.Trainer(max_steps=3, callbacks=[callback], logger=False, enable_checkpointing=False, enable_progress_bar=False,
          enable_model_summary=False).fit(Holder(model))
print(peak() - before)
"""


@pytest.mark.slow
def test_seeds_in_files_are_never_held_in_memory(tmp_path: Path) -> None:
    """Two 256 MiB bf16 seeds: with the seeds in memory the merge's peak grows by their stack (512 MiB); in files it
    grows by a small part of one (reads of 4 MiB a seed, the mixing's temporaries, Lightning's own)."""
    from safetensors.torch import save_file

    paths = []
    for seed in (1, 2):
        paths.append(tmp_path / f"seed{seed}.safetensors")
        values = torch.randn(4096, 32768, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
        save_file({"weight": values}, paths[-1])
    growth = {}
    for seeds_in in ("memory", "files"):
        run = subprocess.run([sys.executable, "-c", MEASURE, *map(str, paths), str(Path(__file__).parent), seeds_in],
                             capture_output=True, text=True, timeout=300, env={"OMP_NUM_THREADS": "1", "PATH": ""})
        assert run.returncode == 0, run.stderr[-3000:]
        growth[seeds_in] = int(re.findall(r"^(\d+)$", run.stdout, re.M)[-1])
    model = 4096 * 32768 * 2
    assert growth["memory"] >= 1.9 * model
    assert growth["files"] <= 0.5 * model, growth
