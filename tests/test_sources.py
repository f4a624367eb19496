"""Seeds for merging read from every place real models live, and bad or foreign ones refused
(m2n2_lightning.merging.seeds.seed_parameters); merges written back: test_save_merged.py."""

from __future__ import annotations

import json
import os
import pickle
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import save_model
from torch import Tensor, nn

from m2n2_lightning.merging.seeds import HUB_PATTERNS, seed_parameters

transformers = pytest.importorskip("transformers")
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPT2Model,
    LlamaConfig,
    LlamaForCausalLM,
)

transformers.logging.set_verbosity_error()


def gpt2(seed: int = 0, **overrides: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = {"n_layer": 2, "n_embd": 16, "n_head": 2, "vocab_size": 40, "n_positions": 16, "bos_token_id": 0,
              "eos_token_id": 0}
    return GPT2LMHeadModel(GPT2Config(**{**config, **overrides}))


def llama(seed: int = 0, layers: int = 1) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=40, max_position_embeddings=16, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    ))


class Wrapper(L.LightningModule):
    """A LightningModule holding a Hugging Face model as ``self.model``: its names carry a ``model.`` prefix."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        return self.model(input_ids=batch[0], labels=batch[0]).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def assert_params_equal(got: dict[str, Tensor], module: nn.Module, prefix: str = "", seeds: bool = True) -> None:
    expected = {n: p for n, p in module.named_parameters()}
    assert list(got) == [prefix + n for n in expected]
    for name, param in expected.items():
        tensor = got[prefix + name]
        assert tensor.device.type == "cpu" and not (seeds and tensor.requires_grad)
        assert torch.equal(tensor, param.detach()), name


@pytest.fixture(scope="module")
def original() -> GPT2LMHeadModel:
    return gpt2(seed=0)


@pytest.fixture(scope="module")
def hf_dir(original: GPT2LMHeadModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("hf")
    original.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sharded_dir(original: GPT2LMHeadModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("sharded")
    original.save_pretrained(folder, max_shard_size="10KB")
    assert len(list(folder.glob("model-*.safetensors"))) > 1
    return folder


def test_save_pretrained_directory_onto_bare_model_and_tied_lm_head(original: GPT2LMHeadModel, hf_dir: Path) -> None:
    from safetensors import safe_open

    with safe_open(hf_dir / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert "lm_head.weight" not in keys  # save_pretrained leaves the tied copy out
    target = gpt2(seed=1)
    assert_params_equal(seed_parameters(target, hf_dir), original)
    tied = seed_parameters(target, hf_dir, names=["lm_head.weight"])
    assert torch.equal(tied["lm_head.weight"], original.transformer.wte.weight.detach())


def test_prefixes_either_side(original: GPT2LMHeadModel, hf_dir: Path, tmp_path: Path) -> None:
    assert_params_equal(seed_parameters(Wrapper(gpt2(seed=1)), hf_dir), original, prefix="model.")
    original.transformer.save_pretrained(tmp_path / "base")  # a GPT2Model: names without "transformer."
    assert_params_equal(seed_parameters(gpt2(seed=1), tmp_path / "base"), original)
    bare = GPT2Model(original.config)
    assert_params_equal(seed_parameters(bare, hf_dir), original.transformer)


def test_lightning_checkpoints(original: GPT2LMHeadModel, tmp_path: Path) -> None:
    torch.save({"state_dict": Wrapper(original).state_dict(), "epoch": 3}, tmp_path / "seed.ckpt")
    assert_params_equal(seed_parameters(gpt2(seed=1), tmp_path / "seed.ckpt"), original)
    assert_params_equal(seed_parameters(Wrapper(gpt2(seed=1)), str(tmp_path / "seed.ckpt")), original, "model.")

    lm = Wrapper(gpt2(seed=2))
    trainer = L.Trainer(max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, default_root_dir=tmp_path)
    trainer.fit(lm, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randint(0, 40, (2, 8)))))
    trainer.save_checkpoint(tmp_path / "trainer.ckpt")  # with optimizer states, loops, callbacks
    assert_params_equal(seed_parameters(gpt2(seed=1), tmp_path / "trainer.ckpt"), lm.model)


def test_state_dict_safetensors_and_module_sources(original: GPT2LMHeadModel, tmp_path: Path) -> None:
    torch.save(original.state_dict(), tmp_path / "seed.pt")
    save_model(original, str(tmp_path / "seed.safetensors"))
    for source in (tmp_path / "seed.pt", tmp_path / "seed.safetensors", original, Wrapper(original),
                   original.state_dict()):  # issue 24: a state_dict in memory is a seed too
        assert_params_equal(seed_parameters(gpt2(seed=1), source, index=2), original)
    got = seed_parameters(gpt2(seed=1), original)
    got["transformer.wte.weight"].add_(1.0)  # a copy: the source module is untouched
    assert not torch.equal(got["transformer.wte.weight"], original.transformer.wte.weight)


def test_dtype_follows_the_module(original: GPT2LMHeadModel, tmp_path: Path) -> None:
    save_model(gpt2(seed=0).to(torch.bfloat16), str(tmp_path / "half.safetensors"))
    got = seed_parameters(gpt2(seed=1), tmp_path / "half.safetensors")
    assert got["transformer.wte.weight"].dtype == torch.float32


def test_sharded_checkpoints(original: GPT2LMHeadModel, sharded_dir: Path, tmp_path: Path) -> None:
    assert_params_equal(seed_parameters(gpt2(seed=1), sharded_dir / "model.safetensors.index.json"), original)
    assert_params_equal(seed_parameters(gpt2(seed=1), sharded_dir), original)
    state, weight_map = original.state_dict(), {}  # a pickled sharded checkpoint, as older save_pretrained wrote
    for i, keys in enumerate((list(state)[:10], list(state)[10:])):
        torch.save({k: state[k] for k in keys}, tmp_path / f"pytorch_model-{i}.bin")
        weight_map |= {k: f"pytorch_model-{i}.bin" for k in keys}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert_params_equal(seed_parameters(gpt2(seed=1), tmp_path), original)


def test_llama_base_model_misses_only_the_untied_head(tmp_path: Path) -> None:
    source = llama(seed=0)
    source.save_pretrained(tmp_path / "full")
    assert_params_equal(seed_parameters(Wrapper(llama(seed=1)), tmp_path / "full"), source, "model.")
    source.model.save_pretrained(tmp_path / "base")
    with pytest.raises(ValueError, match=r"init_from\[0\].*missing tensors: lm_head\.weight$"):
        seed_parameters(llama(seed=1), tmp_path / "base")


def test_hub_id_is_downloaded(original: GPT2LMHeadModel, hf_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    calls = []

    def fake_download(repo_id: str, allow_patterns: list[str]) -> str:
        calls.append((repo_id, allow_patterns))
        return str(hf_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    assert_params_equal(seed_parameters(gpt2(seed=1), "someone/tiny-gpt2"), original)
    assert calls == [("someone/tiny-gpt2", HUB_PATTERNS[0])]

    def failing(repo_id: str, allow_patterns: list[str]) -> str:
        raise OSError("no connection")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", failing)
    with pytest.raises(ValueError, match=r"init_from\[1\] \(hub id 'gpt2'\).*downloading 'gpt2'.*no connection"):
        seed_parameters(gpt2(seed=1), "gpt2", index=1)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(ValueError, match=r'pip install "m2n2-lightning\[hf\]"'):
        seed_parameters(gpt2(seed=1), "someone/tiny-gpt2")


def test_unreadable_files(tmp_path: Path, original: GPT2LMHeadModel) -> None:
    module = gpt2(seed=1)
    with pytest.raises(ValueError, match=r"init_from\[3\] \(file .*nope\.ckpt\) does not exist"):
        seed_parameters(module, tmp_path / "nope.ckpt", index=3)
    with pytest.raises(ValueError, match=r"init_from\[0\] \(file .*nope/model\.ckpt\) does not exist"):
        seed_parameters(module, "nope/model.ckpt")
    torch.save(original.state_dict(), tmp_path / "good.pt")
    save_model(original, str(tmp_path / "good.safetensors"))
    files = {
        "empty.ckpt": b"",
        "random.pt": os.urandom(4096),
        "truncated.ckpt": (tmp_path / "good.pt").read_bytes()[:5000],
        "truncated.safetensors": (tmp_path / "good.safetensors").read_bytes()[:5000],
        "pickle.bin": pickle.dumps(b"\x00" * 64) + b"junk",
    }
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=r"init_from\[0\] .* is not a checkpoint, state_dict, or safetensors file.*"
                                             r"expected a Lightning \.ckpt") as err:
            seed_parameters(module, tmp_path / name)
        assert name in str(err.value)
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    torch.save({"state_dict": {"w": 1.0}}, tmp_path / "floats.ckpt")
    for name in ("list.pt", "floats.ckpt"):
        with pytest.raises(ValueError, match="not a mapping of parameter names to tensors"):
            seed_parameters(module, tmp_path / name)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match=r"\(directory .*empty_dir\) holds none of model\.safetensors"):
        seed_parameters(module, tmp_path / "empty_dir")


class Payload:
    """Unpickling this creates a marker file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("writer", ["torch.save", "pickle protocol 2", "pickle protocol 4"])
def test_crafted_pickle_is_not_run(tmp_path: Path, writer: str) -> None:
    marker, path = tmp_path / "marker", tmp_path / "evil.ckpt"
    content = {"state_dict": {"transformer.wte.weight": torch.zeros(40, 16)}, "x": Payload(marker)}
    if writer == "torch.save":
        torch.save(content, path)
    else:
        path.write_bytes(pickle.dumps(content, protocol=int(writer[-1])))
    message = (r"init_from\[0\] .*holds objects other than tensors.*torch\.save\(module\.state_dict\(\)"
               if writer != "pickle protocol 4" else r"init_from\[0\] .* is not a checkpoint")  # FRAME opcode refused
    with pytest.raises(ValueError, match=message):
        seed_parameters(gpt2(seed=1), path)
    assert not marker.exists()


def test_other_architectures_are_named(tmp_path: Path) -> None:
    gpt2(seed=0, n_embd=32).save_pretrained(tmp_path / "wide")
    with pytest.raises(ValueError, match=r"mis-shaped tensors: transformer\.wte\.weight: "
                                         r"\(40, 32\) vs \(40, 16\) expected, .* and \d+ more$"):
        seed_parameters(gpt2(seed=1), tmp_path / "wide")
    gpt2(seed=0, n_layer=3).save_pretrained(tmp_path / "deep")
    with pytest.raises(ValueError, match=r"unexpected tensors: transformer\.h\.2\.attn\.c_attn\.bias, .* and 2 more$"):
        seed_parameters(gpt2(seed=1), tmp_path / "deep")
    with pytest.raises(ValueError, match=r"missing tensors: transformer\.h\.1\.ln_1\.weight, .* and 2 more"):
        seed_parameters(gpt2(seed=1, n_layer=2), gpt2(seed=0, n_layer=1))
    with pytest.raises(ValueError, match=r"none of its tensor names match"):
        seed_parameters(gpt2(seed=1), nn.GRU(3, 4))


def test_ambiguous_prefix(original: GPT2LMHeadModel) -> None:
    both = nn.ModuleDict({"student": original, "teacher": gpt2(seed=5)})
    with pytest.raises(ValueError, match=r"ambiguous prefix mapping .*strip 'student\.'.*strip 'teacher\.'"):
        seed_parameters(gpt2(seed=1), both)


def test_buffers_and_legacy_masks_are_ignored(original: GPT2LMHeadModel, tmp_path: Path) -> None:
    state = dict(original.state_dict())
    state["transformer.h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 16, 16))  # older GPT-2 checkpoints
    state["transformer.h.0.attn.masked_bias"] = torch.tensor(-1e4)
    state["transformer.position_ids"] = torch.arange(16)
    torch.save(state, tmp_path / "legacy.bin")
    assert_params_equal(seed_parameters(gpt2(seed=1), tmp_path / "legacy.bin"), original)
