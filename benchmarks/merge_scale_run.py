"""One configuration of benchmarks/merge_scale.py, run in its own process; prints one JSON line of timings.

    python benchmarks/merge_scale_run.py --shape 255m --seeds-k 2 --pop 15 --storage coefficients \\
        --evaluations 12 --threads 2 --seeds /work/scale/seeds --work /work/scale/work

The merge is the documented path: `M2N2Callback(strategy=partial(M2N2Strategy, ...),
init_from=[seed dirs], evaluate=next_token_accuracy, resources=sequences, model=hf_model,
best_in_training_step=False)` in a plain Trainer over a LightningModule whose `training_step`
does nothing, then `save_merged(module, out, evolution=callback)`.
`evaluate` is wrapped by a clock, so the library's own time is the search's wall time minus it.
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from merge_scale_seeds import load_sequences, model_bytes, seed_dirs
from torch import Tensor, nn
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM

from m2n2_lightning import M2N2Callback, M2N2Strategy
from m2n2_lightning.merging.output import save_merged


class HoldingModule(L.LightningModule):
    """A LightningModule holding the model that each candidate is loaded into; `training_step` does nothing."""

    def __init__(self, model: nn.Module, steps: int) -> None:
        super().__init__()
        self.model, self.steps = model, steps

    def training_step(self, batch: Any, batch_idx: int) -> None:
        return None

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)  # replaced by the evolution step

    def train_dataloader(self) -> DataLoader:
        return DataLoader(range(self.steps), batch_size=1)


def next_token_accuracy(module: nn.Module, batch: Tensor) -> Tensor:
    """Per sequence, the fraction of positions whose argmax next token is the sequence's next token."""
    logits = module(input_ids=batch).logits[:, :-1]
    return (logits.argmax(dim=-1) == batch[:, 1:]).float().mean(dim=1)


class EvaluateClock:
    """`evaluate` with a clock: the start, duration and mean score of every call."""

    def __init__(self, evaluate: Any) -> None:
        self.evaluate, self.calls, self.means = evaluate, [], []

    def __call__(self, module: nn.Module, batch: Tensor) -> Tensor:
        start = time.perf_counter()
        scores = self.evaluate(module, batch)
        self.calls.append((start, time.perf_counter() - start))
        self.means.append(round(scores.float().mean().item(), 3))
        return scores

    def seconds_between(self, start: float, stop: float) -> tuple[int, float]:
        """The number of calls that started in [start, stop) and their total duration."""
        inside = [d for s, d in self.calls if start <= s < stop]
        return len(inside), sum(inside)


class SearchClock(Callback):
    """Marks the start and the end of the search steps (after the seeds are read and scored)."""

    def __init__(self) -> None:
        self.start = self.stop = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = time.perf_counter()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.stop = time.perf_counter()


def peak_rss_bytes() -> int:
    """This process's peak resident set so far (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build the holding model, merge the seeds for `args.evaluations` steps, save the merge; the timings."""
    torch.set_num_threads(args.threads)
    seeds = seed_dirs(args.seeds, args.shape, args.seeds_k)
    sequences = list(load_sequences(args.seeds, args.shape))
    # the holding model as a user loads one: from_pretrained of the base, in bf16 (no float32 initialisation)
    model = AutoModelForCausalLM.from_pretrained(args.seeds / args.shape / "base", dtype=torch.bfloat16).eval()
    options: dict[str, Any] = {"pop_size": args.pop, "warmup_steps": 5, "storage": args.storage}
    if args.storage == "mmap":
        options["storage_dir"] = str(args.work)
    evaluate = EvaluateClock(next_token_accuracy)
    evolution = M2N2Callback(strategy=functools.partial(M2N2Strategy, **options), init_from=[str(s) for s in seeds],
                             evaluate=evaluate, resources=sequences, resource_batch_size=len(sequences), model=model,
                             heatmap=False, best_in_training_step=False,  # training_step reads no weights
                             seeds_in=args.seeds_in)
    search = SearchClock()
    trainer = L.Trainer(max_steps=args.evaluations, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[evolution, search])
    module = HoldingModule(model, args.evaluations)
    rss_before_fit = peak_rss_bytes()
    fit_start = time.perf_counter()
    trainer.fit(module)
    rss_after_fit = peak_rss_bytes()
    out = args.work / f"merged-{args.shape}-{args.seeds_k}-{args.pop}-{args.storage}"
    start = time.perf_counter()
    save_merged(module, out, evolution=evolution)  # weights, card and recipe
    save_seconds = time.perf_counter() - start
    shutil.rmtree(out)
    count, inside = evaluate.seconds_between(search.start, search.stop)
    scores, _ = evolution.engine.strategy.population()
    return {
        "model_bytes": model_bytes(model),
        "evaluations": count,
        "forward_passes": evolution.engine.forward_passes,
        "seconds_per_evaluation": (search.stop - search.start) / max(count, 1),
        "evaluate_seconds": inside / max(count, 1),
        "library_share": (search.stop - search.start - inside) / inside if inside else float("nan"),
        "seed_load_seconds": evaluate.calls[0][0] - fit_start if evaluate.calls else float("nan"),
        "save_seconds": save_seconds,
        "seed_scores": evaluate.means[: args.seeds_k],  # the seeds are scored first, one call each
        "best_score": float(scores.float().mean(dim=1).max()),
        "rss_before_fit": rss_before_fit,
        "rss_after_fit": rss_after_fit,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", required=True)
    parser.add_argument("--seeds-k", type=int, required=True)
    parser.add_argument("--pop", type=int, required=True)
    parser.add_argument("--storage", required=True)
    parser.add_argument("--seeds-in", default="memory", choices=["memory", "files"])
    parser.add_argument("--evaluations", type=int, required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--seeds", type=Path, required=True, help="the seed cache (merge_scale_seeds)")
    parser.add_argument("--work", type=Path, required=True, help="where the merge and any mmap file are written")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    print(json.dumps(run(args)), flush=True)


if __name__ == "__main__":
    main()
