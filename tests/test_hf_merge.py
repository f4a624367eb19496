"""Merging Hugging Face models end to end: seeds from save_pretrained directories, scoring by generation
through the evaluate hook, the coefficient archive, and the best merge written back with save_pretrained."""

from __future__ import annotations

import functools

import lightning as L
import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from m2n2_lightning import M2N2Callback, M2N2Strategy
from m2n2_lightning.merging.output import save_merged

VOCAB = 12


def tiny_gpt2(seed: int) -> transformers.GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=16, bos_token_id=0, eos_token_id=1)
    return transformers.GPT2LMHeadModel(config).eval()


class LanguageModule(L.LightningModule):
    """A LightningModule holding a causal LM, as users have them (automatic optimization)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch, labels=batch).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.randint(2, VOCAB, (8, 6)), batch_size=4)


PROMPTS = [{"prompt": [2 + i % 5, 3 + i % 7, 4], "answer": (5 + i) % VOCAB} for i in range(12)]


def generated_first_token(module: nn.Module, batch: dict) -> torch.Tensor:
    """Exact match of the first greedily generated token (a `generate` call per batch)."""
    prompts = torch.stack([torch.as_tensor(p) for p in batch["prompt"]], dim=1)  # collate gives a list of columns
    lm = module.model
    out = lm.generate(prompts, max_new_tokens=1, do_sample=False, pad_token_id=1, attention_mask=torch.ones_like(prompts))
    return (out[:, -1] == torch.as_tensor(batch["answer"])).float()


@pytest.mark.parametrize("storage", ["dense", "coefficients"])
def test_merge_two_save_pretrained_models_by_generation(tmp_path, storage) -> None:
    seeds = []
    for i in (1, 2):
        seeds.append(tmp_path / f"seed_{i}")
        tiny_gpt2(i).save_pretrained(seeds[-1])
    module = LanguageModule(tiny_gpt2(3))
    callback = M2N2Callback(
        strategy=functools.partial(M2N2Strategy, pop_size=4, warmup_steps=3, storage=storage, seed=0),
        init_from=seeds,
        evaluate=generated_first_token,
        resources=PROMPTS,
        resource_batch_size=5,
    )
    trainer = L.Trainer(max_steps=6, callbacks=[callback], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module)
    strategy = callback.strategy
    assert strategy.forward_passes == 6 and strategy.num_resources == len(PROMPTS)
    # The scores the archive holds are those the evaluate hook gives its members, recomputed here.
    best = strategy.best_index()
    callback.engine.flat.load_into(module, strategy.best_params())
    module.eval()
    collate = torch.utils.data.default_collate
    recomputed = torch.cat([generated_first_token(module, collate(PROMPTS[s : s + 5])) for s in range(0, 12, 5)])
    assert torch.equal(recomputed, strategy.scores[best[0]])
    # The best merge goes back out as a Hugging Face directory.
    out = save_merged(module, tmp_path / "merged")
    merged = transformers.AutoModelForCausalLM.from_pretrained(out)
    for name, value in merged.state_dict().items():
        assert torch.equal(value, module.model.state_dict()[name]), name


def test_evaluate_scores_each_ranks_contiguous_shard(monkeypatch) -> None:
    """Under DDP each rank scores its contiguous block of a fixed-order dataset (the engine gathers them)."""
    from m2n2_lightning import distributed
    from m2n2_lightning.engine import EvolutionEngine

    model = nn.Linear(2, 1)
    strategy = M2N2Strategy(num_params=3)
    seen: dict[int, list[int]] = {}

    def evaluate(module: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        seen.setdefault(rank, []).extend(batch.tolist())
        return torch.zeros(len(batch))

    for rank in (0, 1):
        monkeypatch.setattr(distributed, "world", lambda rank=rank: (rank, 2))
        engine = EvolutionEngine(model, strategy)
        engine.attach_evaluate(list(range(11)), evaluate, batch_size=4)
        assert engine.shard_sizes == [6, 5]
        for evaluator in engine.evaluators:
            evaluator(torch.zeros(1, 3))
    assert seen == {0: [0, 1, 2, 3, 4, 5], 1: [6, 7, 8, 9, 10]}
