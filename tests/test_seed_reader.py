"""Seeds read lazily (m2n2_lightning.merging.seeds.SeedReader / read_seeds): exactly the tensors of every source kind,
one tensor mapped at a time, the streamed digest, buffers from the first seed; the checks: test_seed_checks.py."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file, save_model
from torch import nn

import m2n2_lightning.merging.seeds as seeds_module
from m2n2_lightning.merging.seeds import SeedReader, read_seeds, seed_parameters

pytest.importorskip("transformers")
from test_seed_checks import SpyOpen, flat, names, spy  # noqa: F401  (spy: a fixture)
from test_sources import Wrapper, gpt2, llama


@pytest.fixture(scope="module")
def two_shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    model, folder = llama(seed=3), tmp_path_factory.mktemp("two_shards")
    model.save_pretrained(folder, max_shard_size="10KB")
    assert len(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]) == len(names(model))
    assert len(list(folder.glob("model-*.safetensors"))) == 2
    return model, folder


def test_every_source_kind_gives_exactly_its_tensors(tmp_path: Path, two_shards: tuple[nn.Module, Path],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    original, sharded = two_shards
    original.save_pretrained(tmp_path / "single")
    save_model(original, str(tmp_path / "seed.safetensors"))
    torch.save(original.state_dict(), tmp_path / "seed.pt")
    torch.save(original.state_dict(), tmp_path / "legacy.bin", _use_new_zipfile_serialization=False)
    torch.save({"state_dict": Wrapper(original).state_dict()}, tmp_path / "seed.ckpt")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, allow_patterns: str(sharded))
    sources = [original, original.state_dict(), tmp_path / "seed.safetensors", tmp_path / "single", sharded,
               sharded / "model.safetensors.index.json", str(tmp_path / "seed.pt"), tmp_path / "legacy.bin",
               tmp_path / "seed.ckpt", "someone/tiny-llama"]
    target = llama(seed=4)
    got = read_seeds(target, names(target), (s for s in sources))  # a generator of sources is read once
    assert got.vectors.shape == (len(sources), flat(original).numel()) and got.vectors.dtype == torch.float32
    for k in range(len(sources)):
        assert torch.equal(got.vectors[k], flat(original)), got.labels[k]
    assert got.labels[4] == f"init_from[4] (directory {sharded})"
    assert got.labels[-1] == "init_from[9] (hub id 'someone/tiny-llama')"
    assert len(set(got.digests)) == 1  # the same tensors, whatever holds them


def test_dtype_follows_the_first_seed_unless_given(tmp_path: Path) -> None:
    first, second = gpt2(seed=0), gpt2(seed=2)
    save_model(gpt2(seed=0).to(torch.bfloat16), str(tmp_path / "half.safetensors"))
    target = gpt2(seed=1)
    got = read_seeds(target, names(target), [tmp_path / "half.safetensors", second])
    assert got.vectors.dtype == torch.bfloat16
    assert torch.equal(got.vectors[0], flat(first, torch.bfloat16))
    assert torch.equal(got.vectors[1], flat(second, torch.bfloat16))
    out = torch.full((2, flat(first).numel()), 7.0, dtype=torch.float64)
    into = read_seeds(target, names(target), [second, tmp_path / "half.safetensors"], out=out)
    assert into.vectors is out and torch.equal(out[0], flat(second, torch.float64))
    assert torch.equal(out[1], flat(first, torch.bfloat16).double())
    with pytest.raises(ValueError, match=r"out is \(1, 3\) torch\.float64; expected \(2, \d+\)"):
        read_seeds(target, names(target), [second, second], out=torch.zeros(1, 3, dtype=torch.float64))
    some = ["transformer.h.1.mlp.c_fc.weight", "transformer.ln_f.bias"]
    part = read_seeds(target, some, [second], dtype=torch.float16).vectors[0]
    params = dict(second.named_parameters())
    assert torch.equal(part, torch.cat([params[n].detach().reshape(-1) for n in some]).half())


def test_two_shards_are_read_one_tensor_at_a_time(two_shards: tuple[nn.Module, Path],
                                                  spy: list[str]) -> None:  # noqa: F811 (the fixture)
    original, folder = two_shards
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    target = llama(seed=4)
    reader = SeedReader(target, folder, index=1)
    assert reader.label == f"init_from[1] (directory {folder})" and reader.names == names(target)
    assert [reader.dtype(n) for n in reader.names] == [torch.float32] * len(reader.names)
    assert not [e for e in spy if e.startswith("get")]  # opening and dtypes read headers only
    spy.clear()
    got = read_seeds(target, names(target), [folder])
    assert torch.equal(got.vectors[0], flat(original))
    expected = []
    for n in names(target):  # each tensor (one block each, here): its own shard opened, sliced, closed
        expected += [f"open {weight_map[n]}", f"slice {n}", f"close {weight_map[n]}"]
    assert spy[-len(expected):] == expected


def test_large_tensors_are_read_block_by_block(two_shards: tuple[nn.Module, Path], spy: list[str],  # noqa: F811
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """With blocks of 100 values, each tensor is read in slices of whole rows (a file opened per slice), into
    the stack, with the digest and the values of a whole read."""
    original, folder = two_shards
    target = llama(seed=4)
    whole = read_seeds(target, names(target), [folder])
    monkeypatch.setattr(seeds_module, "READ_BLOCK", 100)
    spy.clear()
    blocks = read_seeds(target, names(target), [folder])
    assert torch.equal(blocks.vectors, whole.vectors) and blocks.digests == whole.digests
    embedding = dict(target.named_parameters())["model.embed_tokens.weight"]  # [40, 16]: 6 rows a block
    # one slice when the file is opened (its dtype and shape from the header), then one a block of 6 rows
    assert spy.count("slice model.embed_tokens.weight") == 1 + -(-embedding.shape[0] // (100 // embedding.shape[1]))


MEASURE = """
import re, sys, types, torch
from torch import nn
package = types.ModuleType("m2n2_lightning")  # without its __init__, which imports lightning: a faster start
package.__path__ = [sys.argv[2]]
sys.modules["m2n2_lightning"] = package
from m2n2_lightning.merging.seeds import read_seeds

def peak():  # bytes; the kernel's high-water mark of this process's RSS (getrusage's keeps the parent's over exec)
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

with torch.device("meta"):
    module = nn.ParameterDict({f"w{i}": nn.Parameter(torch.empty(5000, 5000, dtype=torch.bfloat16)) for i in range(4)})
before = peak()
seeds = read_seeds(module, list(module.keys()), [sys.argv[1]])
grown = peak() - before
assert all(bool((seeds.vectors[0, i * 25_000_000:(i + 1) * 25_000_000] == i).all()) for i in range(4))
print(grown)
"""


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the peak RSS from Linux's /proc")
def test_peak_memory_is_the_stack_plus_one_tensor(tmp_path: Path) -> None:
    """A 200 MB bf16 file of four tensors: read_seeds grows the peak RSS by the stack (200 MB) plus about one
    tensor (50 MB), not by the whole file again (whole-file reading with a copy and a concatenation: ~580 MB)."""
    path = tmp_path / "big.safetensors"
    save_file({f"w{i}": torch.full((5000, 5000), float(i), dtype=torch.bfloat16) for i in range(4)}, path)
    size, package = path.stat().st_size, Path(__file__).resolve().parents[1] / "m2n2_lightning"
    result = subprocess.run([sys.executable, "-c", MEASURE, str(path), str(package)], capture_output=True, text=True,
                            timeout=120, check=False, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    grown = int(result.stdout.split()[-1])
    assert size <= grown < 1.75 * size, f"peak RSS grew by {grown / size:.2f} times the file"


def digest_of(module: nn.Module, read: list[str]) -> str:
    """SHA-256 over (dtype, shape, raw bytes) of `read` in order, as SeedReader.digest documents it (no names:
    the same seed read under a wrapper's prefix gives the same digest)."""
    params, h = dict(module.named_parameters()), hashlib.sha256()
    for n in read:
        value = params[n].detach()
        h.update(f"{value.dtype}\0{tuple(value.shape)}\0".encode())
        h.update(value.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def test_digest_covers_every_element(tmp_path: Path) -> None:
    seed, target = llama(seed=0), llama(seed=1)
    first = read_seeds(target, names(target), [seed, seed]).digests
    assert first[0] == first[1] == digest_of(seed, names(target))
    with torch.no_grad():
        seed.model.norm.weight[3] += 1e-3  # one element of the final RMSNorm weight
    changed = read_seeds(target, names(target), [seed]).digests[0]
    assert changed != first[0] and changed == digest_of(seed, names(target))
    reader = SeedReader(target, seed, names=["model.norm.weight", "lm_head.weight"])
    assert reader.digest() == hashlib.sha256().hexdigest()  # nothing read yet
    reader.tensor("lm_head.weight")
    reader.tensor("model.norm.weight")
    assert reader.digest() == digest_of(seed, ["lm_head.weight", "model.norm.weight"])  # in read order


def batchnorm_net(mean: float) -> nn.Sequential:
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    net[1].running_mean.fill_(mean)
    net[1].running_var.fill_(mean + 1.0)
    return net


def test_buffers_come_from_the_first_seed(tmp_path: Path) -> None:
    first, second, target = batchnorm_net(2.0), batchnorm_net(5.0), batchnorm_net(0.0)
    save_model(first, str(tmp_path / "first.safetensors"))
    for source in (first, tmp_path / "first.safetensors"):
        got = read_seeds(target, names(target), [source, second])
        assert list(got.buffers) == ["1.running_mean", "1.running_var"]  # num_batches_tracked is not a float
        assert torch.equal(got.buffers["1.running_mean"], torch.full((4,), 2.0))
        assert torch.equal(got.buffers["1.running_var"], torch.full((4,), 3.0))
        assert torch.equal(got.vectors[1], flat(second))
    got.buffers["1.running_mean"].add_(1.0)
    assert torch.equal(first[1].running_mean, torch.full((4,), 2.0))  # a copy: the seed is untouched
    params_only = {n: p.detach() for n, p in first.named_parameters()}
    assert read_seeds(target, names(target), [params_only]).buffers == {}
    wrapped = read_seeds(Wrapper(target), names(Wrapper(target)), [first]).buffers  # under the prefix rewrite
    assert torch.equal(wrapped["model.1.running_var"], torch.full((4,), 3.0))


def test_module_of_one_tied_weight_from_its_own_state_dict(tmp_path: Path) -> None:
    """Issue 24: both names of the tied weight are in the state_dict; they are one tensor, not two mappings."""
    tied = nn.Module()
    tied.a, tied.b = nn.Linear(2, 3, bias=False), nn.Linear(2, 3, bias=False)
    tied.b.weight = tied.a.weight
    torch.save(tied.state_dict(), tmp_path / "tied.pt")  # loaded memory-mapped, the two names still share a tensor
    for source in (tied.state_dict(), tied, tmp_path / "tied.pt"):
        got = seed_parameters(tied, source)
        assert list(got) == ["a.weight"] and torch.equal(got["a.weight"], tied.a.weight.detach())
