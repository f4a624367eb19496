"""Seeds checked before the search (m2n2_lightning.merging.seeds): non-finite values, integer and quantised tensors,
and sharded indexes (weight_map followed exactly; duplicates, paths outside the folder, missing shards), each a
ValueError naming the seed, the file and the tensor; lazy reading itself: test_seed_reader.py."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar, Self

import pytest
import safetensors
import safetensors.torch
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from m2n2_lightning.merging.seeds import SeedReader, read_seeds, seed_parameters


def flat(module: nn.Module, dtype: torch.dtype | None = None) -> Tensor:
    """`module`'s parameters flattened and concatenated in named_parameters() order, computed here."""
    vector = torch.cat([p.detach().reshape(-1) for p in module.parameters()])
    return vector if dtype is None else vector.to(dtype)


def names(module: nn.Module) -> list[str]:
    return [n for n, _ in module.named_parameters()]


class SpyOpen:
    """safetensors.safe_open, recording each open, get_tensor and close."""

    events: ClassVar[list[str]] = []
    real: ClassVar[type]

    def __init__(self, path: str | Path, framework: str) -> None:
        self.inner = SpyOpen.real(path, framework=framework)
        self.path = Path(path).name

    def __enter__(self) -> Self:
        SpyOpen.events.append(f"open {self.path}")
        self.inner.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        SpyOpen.events.append(f"close {self.path}")
        self.inner.__exit__(*exc)

    def get_tensor(self, key: str) -> Tensor:
        SpyOpen.events.append(f"get {key}")
        return self.inner.get_tensor(key)

    def get_slice(self, key: str) -> object:
        SpyOpen.events.append(f"slice {key}")
        return self.inner.get_slice(key)

    def keys(self) -> list[str]:
        return self.inner.keys()


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    SpyOpen.real, SpyOpen.events = safetensors.safe_open, []

    def no_load_file(*args: object, **kwargs: object) -> None:
        raise AssertionError("load_file reads a whole file")

    monkeypatch.setattr(safetensors, "safe_open", SpyOpen)
    monkeypatch.setattr(safetensors.torch, "load_file", no_load_file)
    yield SpyOpen.events


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))


def state(module: nn.Module) -> dict[str, Tensor]:
    return {n: t.detach().clone() for n, t in module.state_dict().items()}


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_are_refused(tmp_path: Path, bad: float) -> None:
    values = state(net())
    values["1.weight"][2] = bad
    save_file(values, tmp_path / "bad.safetensors")
    target = net()
    file = re.escape(str(tmp_path / "bad.safetensors"))
    message = (rf"init_from\[1\] \(file {file}\): tensor '1\.weight' \({file}\) for 1\.weight holds 1 non-finite "
               r"values \(NaN or Inf\) of 3; expected finite weights .*repair or replace this seed")
    with pytest.raises(ValueError, match=message):
        read_seeds(target, names(target), [net(), tmp_path / "bad.safetensors"])
    with pytest.raises(ValueError, match=r"init_from\[0\] \(state_dict of 4 entries\): tensor '1\.weight' "
                                         r"\(in memory\) .* holds 1 non-finite"):
        seed_parameters(target, values)


def test_non_finite_buffer_is_refused() -> None:
    seed = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    seed[1].running_var[0] = float("inf")
    with pytest.raises(ValueError, match=r"tensor '1\.running_var' \(in memory\) for 1\.running_var holds 1 non-"):
        read_seeds(seed, names(seed), [seed])


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int32, torch.float8_e4m3fn])
def test_integer_and_quantised_tensors_are_refused_before_reading(tmp_path: Path, dtype: torch.dtype,
                                                                  spy: list[str]) -> None:
    values = state(net())
    values["0.weight"] = values["0.weight"].mul(100).to(dtype)  # stored quantised,
    values["0.weight_scale"] = torch.tensor(0.01)  # with its scale beside it
    save_file(values, tmp_path / "quantised.safetensors")
    with pytest.raises(ValueError, match=rf"init_from\[0\] \(file .*quantised\.safetensors\): tensor '0\.weight' "
                                         rf"\(.*quantised\.safetensors\) for 0\.weight holds {dtype} values, not "
                                         r"16-bit or wider floats; expected torch\.float32 weights.*dequantise"):
        SeedReader(net(), tmp_path / "quantised.safetensors")
    assert not [e for e in spy if e.startswith("get")]  # refused from the header
    values["0.weight"] = values["0.weight"].to(torch.bfloat16)  # half floats are read, and cast where asked
    del values["0.weight_scale"]
    save_file(values, tmp_path / "half.safetensors")
    assert seed_parameters(net(), tmp_path / "half.safetensors")["0.weight"].dtype == torch.float32


def write_shards(folder: Path, shards: dict[str, dict[str, Tensor]], weight_map: dict[str, str] | str) -> Path:
    """Shard files and an index (`weight_map`, or the index's JSON text) in `folder`; returns the index."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, tensors in shards.items():
        save_file(tensors, folder / name)
    text = weight_map if isinstance(weight_map, str) else json.dumps({"metadata": {}, "weight_map": weight_map})
    (folder / "model.safetensors.index.json").write_text(text)
    return folder / "model.safetensors.index.json"


def halves(values: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    keys = list(values)
    return {k: values[k] for k in keys[:2]}, {k: values[k] for k in keys[2:]}


def test_weight_map_is_followed_exactly(tmp_path: Path, spy: list[str]) -> None:
    seed = net()
    a, b = halves(state(seed))
    stale = {k: v + 1.0 for k, v in a.items()}  # an older shard left in the folder, named by no weight_map
    weight_map = {**dict.fromkeys(a, "a.safetensors"), **dict.fromkeys(b, "b.safetensors")}
    index = write_shards(tmp_path, {"a.safetensors": a, "b.safetensors": b, "stale.safetensors": stale}, weight_map)
    assert torch.equal(read_seeds(net(), names(seed), [index]).vectors[0], flat(seed))
    assert not [e for e in spy if "stale" in e]


def test_duplicated_and_misplaced_tensors_are_refused(tmp_path: Path) -> None:
    a, b = halves(state(net()))
    weight_map = {**dict.fromkeys(a, "a.safetensors"), **dict.fromkeys(b, "b.safetensors")}
    index = write_shards(tmp_path / "dup", {"a.safetensors": a, "b.safetensors": {**b, "0.bias": a["0.bias"]}},
                         weight_map)
    with pytest.raises(ValueError, match=r"init_from\[0\] \(file .*dup/model\.safetensors\.index\.json\): tensors "
                                         r"held by more than one shard: 0\.bias \(in a\.safetensors and "
                                         r"b\.safetensors\); expected each tensor in exactly one shard"):
        read_seeds(net(), names(net()), [index])
    text = json.dumps({"weight_map": weight_map})[:-2] + ', "0.bias": "b.safetensors"}}'  # a name listed twice
    index = write_shards(tmp_path / "twice", {"a.safetensors": a, "b.safetensors": b}, text)
    with pytest.raises(ValueError, match=r"index\.json\): its weight_map lists 0\.bias more than once"):
        SeedReader(net(), index)
    moved = {**weight_map, "0.bias": "b.safetensors"}  # names the wrong shard
    index = write_shards(tmp_path / "moved", {"a.safetensors": a, "b.safetensors": b}, moved)
    with pytest.raises(ValueError, match=r"tensors its weight_map names are not in their shard: 0\.bias "
                                         r"\(weight_map names b\.safetensors\)"):
        SeedReader(net(), index)


def test_shards_outside_the_folder_are_refused_before_reading(tmp_path: Path, spy: list[str]) -> None:
    a, b = halves(state(net()))
    save_file(b, tmp_path / "outside.safetensors")
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    os.symlink(tmp_path / "outside.safetensors", folder / "link.safetensors")
    for name in ("../outside.safetensors", str(tmp_path / "outside.safetensors"), "link.safetensors"):
        weight_map = {**dict.fromkeys(a, "a.safetensors"), **dict.fromkeys(b, name)}
        index = write_shards(folder, {"a.safetensors": a}, weight_map)
        with pytest.raises(ValueError, match=rf"init_from\[0\] \(file .*index\.json\): its weight_map names shard "
                                             rf"files outside the index's folder .*checkpoint: {re.escape(name)}; "
                                             r"expected file names beside the index"):
            SeedReader(net(), index)
    assert spy == []  # not even a header was read
    weight_map = {**dict.fromkeys(a, "a.safetensors"), **dict.fromkeys(b, "gone.safetensors")}
    index = write_shards(folder, {"a.safetensors": a}, weight_map)
    with pytest.raises(ValueError, match=r"shard files named by its weight_map do not exist: gone\.safetensors; "
                                         r"expected them beside the index in .*checkpoint"):
        SeedReader(net(), index)
