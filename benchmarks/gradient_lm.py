"""The gradient baselines of the lm_merge setting: fine-tune the base, or the first fine-tune, on the training prompts.

`gradient_base` and `gradient_skill_a` take `(cfg, experiment)` like compare_lm.py's BASELINES
(`experiment` a compare_lm.LMExperiment) and spend the config's budget, `forward_passes`
evaluations x N training prompts, as example passes of `m2n2_lightning.lm.gradient`.
Run alone, it measures both on one seed and writes one row per test point of every
learning rate of the grid:

    OMP_NUM_THREADS=1 python benchmarks/gradient_lm.py [--seed 0] [--out benchmarks/results/lm_merge/gradient_seed0.csv]
"""

from __future__ import annotations

import argparse
import csv
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from m2n2_lightning.lm.gradient import LR_GRID, gradient_fine_tune
from m2n2_lightning.lm.merge import MergeResult
from m2n2_lightning.merge_run import seed_sources


def training_pairs(resources: Any) -> list[tuple[str, str]]:
    """The (prompt, answer) pairs of a TaskSet loader's resources (`(task name, example)` items), in order."""
    pairs = [example for _, example in resources.dataset]
    for pair in pairs:
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise ValueError(f"the gradient baseline trains on (prompt, answer) text pairs (the skill task): {pair!r}")
    return [tuple(pair) for pair in pairs]


def fine_tune_from(start: Callable[[Any, Any], str]) -> Callable[[Any, Any], MergeResult]:
    """The baseline `(cfg, experiment) -> MergeResult` that fine-tunes the model at `start(cfg, experiment)`, once per
    learning rate of `cfg.gradient_lrs` (compare.py's `--override +gradient_lrs=[...]`; default the module's grid)."""

    def baseline(cfg: Any, experiment: Any) -> MergeResult:
        pairs = training_pairs(experiment.resources)
        return gradient_fine_tune(
            start(cfg, experiment), pairs, experiment.tests, cfg.forward_passes * len(pairs), experiment.test_fn,
            train_data=experiment.resources, seed=cfg.seed, test_every=cfg.merge.test_every,
            lrs=tuple(getattr(cfg, "gradient_lrs", None) or LR_GRID),
        )

    return baseline


#: Fine-tune the base (the model the seeds were fine-tuned from), and fine-tune seed A (the first fine-tune).
gradient_base = fine_tune_from(lambda cfg, experiment: seed_sources(cfg)[1])
gradient_skill_a = fine_tune_from(lambda cfg, experiment: experiment.seeds[0])
GRADIENT_BASELINES = {"gradient_base": gradient_base, "gradient_skill_a": gradient_skill_a}


def main() -> None:
    from compare_lm import load_experiment
    from compare_runs import compose_train_config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=100, help="test every N evaluation-equivalents")
    parser.add_argument("--override", nargs="*", default=[], help="more train.py overrides")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/lm_merge/gradient_seed0.csv"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    overrides = ["experiment=lm_merge", f"seed={args.seed}", f"merge.test_every={args.eval_every}", *args.override]
    rows = []
    for method, baseline in GRADIENT_BASELINES.items():
        cfg = compose_train_config(overrides)
        experiment = load_experiment(cfg)
        experiment.tests["train"] = experiment.resources  # the training accuracy at each test point, as run_lm
        start = time.perf_counter()
        result = baseline(cfg, experiment)
        total = time.perf_counter() - start
        s = result.settings
        for lr, run in s["grid"].items():
            for point in run["test_points"]:
                test = dict(point["test"])
                rows.append({"method": method, "seed": args.seed, "lr": lr, "chosen": lr == s["lr"],
                             "forward_passes": point["forward_passes"],
                             "example_passes": point["example_passes"],
                             "train_acc": test.pop("train"), "wall_seconds": point["wall_seconds"],
                             **{f"{name}_test": acc for name, acc in test.items()}})
            print(f"{method} lr {lr:g}: train {run['train']:.3f}, " +
                  ", ".join(f"{k} {v:.3f}" for k, v in run["test"].items() if k != "train") +
                  f" ({run['wall_seconds']:.0f} s training)", flush=True)
        print(f"{method}: chose lr {s['lr']:g}; {s['steps']} steps of {s['batch_size']}, {s['example_passes']} example "
              f"passes (~{s['forward_pass_equivalents']} forward-pass equivalents with the backward) per learning "
              f"rate; {total:.0f} s in all ({len(s['grid'])} learning rates, tests included)", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
