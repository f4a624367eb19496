"""Merge two fine-tuned Hugging Face language models with M2N2, scoring each candidate by generation.

The paper's LLM experiment (section 4.2) at laptop scale: two fine-tunes of one small Llama base
(m2n2_lightning/lm: one adds, one reverses strings), merged from their save_pretrained directories
with an archive of 15, no mutation, a warm-up of 50 random merges and 1,000 evaluations, each
candidate scored per training prompt by exact match of greedy generation.

    OMP_NUM_THREADS=1 python examples/merge_language_models.py --seeds 0 1 2     # about a minute a run here

For your own models: replace `seed_dirs` by your two (or more) save_pretrained directories or hub ids
of one architecture, `TRAIN` by your training prompts (a fixed-order dataset; e.g. the first 1,319 GSM8K
training problems), and `exact_match` by your scoring (`fn(module, batch) -> [B]` in [0, 1]; it receives
the LightningModule holding the candidate). With `storage="coefficients"` the archive holds the seeds
once and one working copy, so two 7B models in bf16 need about 3 x 14 GB of memory, not 15 copies.
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

import lightning as L
import torch
from torch import nn

from m2n2_lightning import M2N2Callback, M2N2Strategy, MAPElitesStrategy
from m2n2_lightning.lm.seeds import default_cache, seed_models
from m2n2_lightning.lm.tasks import accuracy, exact_match, skill_dataset

TRAIN = skill_dataset(("add", "rev"), "train")
TEST = {name: skill_dataset((name,), "test").pairs for name in ("add", "rev", "copy")}


class LanguageModel(L.LightningModule):
    """The LightningModule a user has: a causal LM; training_step is only a monitor here."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch, batch_idx):
        return None

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(range(10**6), batch_size=1)


def score(module: nn.Module, batch) -> torch.Tensor:
    return exact_match(module.model, batch)


METHODS = {
    "m2n2": functools.partial(M2N2Strategy, pop_size=15, warmup_steps=50, storage="coefficients"),
    "m2n2_no_split_point": functools.partial(M2N2Strategy, pop_size=15, warmup_steps=50, use_split_point=False),
    "m2n2_no_matchmaker": functools.partial(M2N2Strategy, pop_size=15, warmup_steps=50, use_matchmaker=False),
    "ga": functools.partial(M2N2Strategy, pop_size=15, warmup_steps=50, alpha=0.0, use_matchmaker=False),
    "map_elites": functools.partial(
        MAPElitesStrategy, bins=4, descriptor_classes=[[0], [1]],
        descriptor_labels=[0 if skill == "add" else 1 for skill in TRAIN.skills],
    ),
}


def merge(method: str, seed: int, evaluations: int) -> dict[str, float]:
    models = seed_models(seed=seed)
    cache = default_cache(seed=seed)
    module = LanguageModel(models["base"])
    callback = M2N2Callback(
        strategy=functools.partial(METHODS[method], seed=seed),
        init_from=[cache / "skill_a", cache / "skill_b"],
        evaluate=score, resources=TRAIN, resource_batch_size=100, max_forward_passes=evaluations,
    )
    trainer = L.Trainer(max_steps=evaluations, callbacks=[callback], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module)
    module.model.eval()
    return {name: accuracy(module.model, pairs) for name, pairs in TEST.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--evaluations", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=None, help="write the rows as CSV here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for seed in args.seeds:
        models = seed_models(seed=seed)
        for name in ("skill_a", "skill_b"):
            rows.append((name, seed, {k: accuracy(models[name].eval(), p) for k, p in TEST.items()}))
        for method in args.methods:
            rows.append((method, seed, merge(method, seed, args.evaluations)))
            print(rows[-1], flush=True)
    lines = ["method,seed,add_test,rev_test,mean_add_rev,copy_test"]
    for method, seed, acc in rows:
        lines.append(f"{method},{seed},{acc['add']:.4f},{acc['rev']:.4f},{(acc['add'] + acc['rev']) / 2:.4f},{acc['copy']:.4f}")
    print("\n".join(lines))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
