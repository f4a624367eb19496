"""Seed models for benchmarks/merge_scale.py: Qwen2-shaped models with random weights, built once and cached.

A shape's folder (`<root>/<shape>/`) holds `base/` (the random model), the
seeds `0/`, `1/`, ... (each the base plus its own Gaussian noise, `sigma`
times the RMS of each tensor) as bf16 sharded safetensors written by
`save_pretrained`, and `sequences.pt`: 32 sequences of 16 tokens, one random
token then 15 greedy tokens of the base, so the base predicts every next
token and each noisy seed only some. The build holds one bf16 model and one
tensor of noise at a time; K seeds are the first K folders.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor
from transformers import AutoModelForCausalLM, PreTrainedModel, Qwen2Config

#: Qwen2-0.5B's architecture (its config.json), without the checkpoint.
QWEN2_05B: dict[str, object] = {
    "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
    "num_key_value_heads": 2, "vocab_size": 151_936, "tie_word_embeddings": True, "rms_norm_eps": 1e-6,
    "rope_theta": 1_000_000.0, "max_position_embeddings": 32_768,
}
SHAPES: dict[str, dict[str, object]] = {
    # at width 64 and the default init (0.02) the tied embedding outweighs the layers and the model only
    # repeats its input token; a larger init gives varied continuations, as the real widths have
    "tiny": {**QWEN2_05B, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "vocab_size": 1000, "initializer_range": 0.2},
    "255m": {**QWEN2_05B, "num_hidden_layers": 8},
    "0.5b": QWEN2_05B,
}
NUM_SEQUENCES, SEQUENCE_LENGTH = 32, 16
DONE = "complete"  # written last into a seed folder, so an interrupted build is redone


def build_model(shape: str) -> PreTrainedModel:
    """A bf16 Qwen2 causal LM of `shape` with random weights, in eval mode."""
    model = AutoModelForCausalLM.from_config(Qwen2Config(**SHAPES[shape]), dtype=torch.bfloat16)
    return model.eval()


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters (a tied tensor once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def seed_dirs(root: Path, shape: str, count: int) -> list[Path]:
    """The folders of the first `count` seeds of `shape`."""
    return [root / shape / str(k) for k in range(count)]


def load_sequences(root: Path, shape: str) -> Tensor:
    """The [32, 16] token ids every candidate is scored on."""
    return torch.load(root / shape / "sequences.pt")


@torch.no_grad()
def greedy_sequences(model: PreTrainedModel, generator: torch.Generator) -> Tensor:
    """NUM_SEQUENCES sequences: one random first token, then the model's greedy continuation."""
    first = torch.randint(model.config.vocab_size, (NUM_SEQUENCES, 1), generator=generator)
    return model.generate(first, max_new_tokens=SEQUENCE_LENGTH - 1, min_new_tokens=SEQUENCE_LENGTH - 1,
                          do_sample=False, pad_token_id=0, eos_token_id=None)


@torch.no_grad()
def reset_to(model: PreTrainedModel, directory: Path) -> None:
    """Copy the tensors saved in `directory` back into `model`, one tensor at a time."""
    params = dict(model.named_parameters())
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as reader:
            for key in reader.keys():  # noqa: SIM118 (safe_open is not iterable)
                params[key].copy_(reader.get_tensor(key))


@torch.no_grad()
def add_noise(model: PreTrainedModel, sigma: float, generator: torch.Generator) -> None:
    """Add Gaussian noise of `sigma` times each tensor's RMS, in place."""
    for param in model.parameters():
        scale = sigma * param.float().pow(2).mean().sqrt().item()
        param.add_(torch.randn(param.shape, generator=generator, dtype=param.dtype), alpha=scale)


def build_seeds(root: Path, shape: str, count: int, sigma: float, shard_size: str) -> list[Path]:
    """Build (or reuse) the base, the sequences and the first `count` seeds of `shape`; returns the seed folders."""
    folder, dirs = root / shape, seed_dirs(root, shape, count)
    missing = [d for d in dirs if not (d / DONE).exists()]
    if not missing:
        return dirs
    base = folder / "base"
    if (base / DONE).exists():
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).eval()
    else:
        torch.manual_seed(0)
        model = build_model(shape)
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(greedy_sequences(model, torch.Generator().manual_seed(0)), folder / "sequences.pt")
        model.save_pretrained(base, max_shard_size=shard_size)
        (base / DONE).touch()
    for directory in missing:
        reset_to(model, base)
        add_noise(model, sigma, torch.Generator().manual_seed(1000 + int(directory.name)))
        model.save_pretrained(directory, max_shard_size=shard_size)
        (directory / DONE).touch()
        print(f"built {directory}", flush=True)
    return dirs
