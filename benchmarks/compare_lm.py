"""The lm_merge setting of benchmarks/compare.py: the paper's LLM comparison (section 4.2) at laptop scale.

Every method merges the two fine-tunes of m2n2_lightning/lm (addition, reversal) at the same
budget of evaluations, through `train.py`'s config (`experiment=lm_merge` plus the method's
overrides below) and the package's runner (`m2n2_lightning.lm.merge.merge_models`: the
callback and a Trainer). A run's rows hold the best member's accuracies at the start, every
`--eval-every` evaluations and at the end: `best_train_acc` (exact match on the training
prompts), `test_acc` (the mean of the two skills' test accuracies) and one `<skill>_test`
column per test set; its curve rows hold the population's coverage and fitness entropy after
every step (the paper's figure 5).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Any

import torch
from compare_outputs import BRUTE_FORCE
from compare_runs import compose_train_config

from m2n2_lightning.lm.experiment import (
    alone,
    brute_force,
    check_lm_config,
    load_experiment,
    search,
)
from m2n2_lightning.lm.merge import quiet_trainer
from m2n2_lightning.lm.train_lm import skill_mean

#: Each method's Hydra overrides of `experiment=lm_merge` (m2n2_lightning/conf/strategy/lm_*.yaml).
LM_METHODS: dict[str, tuple[str, ...]] = {
    "m2n2": ("strategy=lm_m2n2",),
    "m2n2_max_char_fraction": ("strategy=lm_m2n2_max", "lm.score=char_fraction"),
    "ga": ("strategy=lm_ga",),
    "m2n2_no_split_point": ("strategy=lm_m2n2_no_split_point",),
    "m2n2_no_matchmaker": ("strategy=lm_m2n2_no_matchmaker",),
    "map_elites": ("strategy=lm_map_elites",),
    "cmaes_layerwise_slerp": ("strategy=cmaes_layerwise_slerp",),
    BRUTE_FORCE: (),
    "skill_a": (),
    "skill_b": (),
}
#: The methods that are not searches: what they run instead of the strategy.
BASELINES = {BRUTE_FORCE: brute_force, "skill_a": alone(0), "skill_b": alone(1)}
LM_LABELS = {
    "m2n2": "M2N2 (exact match)",
    "m2n2_max_char_fraction": 'M2N2, capacity "max", character score',
    "ga": "GA",
    "m2n2_no_split_point": "M2N2 without split point",
    "m2n2_no_matchmaker": "M2N2 without attraction",
    "map_elites": "MAP-Elites (4 x 4 grid of the skills' training accuracies)",
    "cmaes_layerwise_slerp": "CMA-ES over one SLERP coefficient per layer (population 25)",
    BRUTE_FORCE: "SLERP, best single weight (brute force)",
    "skill_a": "seed: skill A fine-tune",
    "skill_b": "seed: skill B fine-tune",
}


@dataclass
class LMSpec:
    """One (method, seed) run of the LM setting: train.py's overrides; picklable for worker processes."""

    method: str
    seed: int
    overrides: list[str]
    device: str
    threads: int


@dataclass
class LMRun:
    """A finished run: its result rows and its curve rows (both with method and seed)."""

    rows: list[dict[str, Any]]
    curve: list[dict[str, Any]]


def build_lm_specs(args: Any) -> list[LMSpec]:
    """Compose and check every run's config now, so that a bad override fails before the first run."""
    specs = []
    for seed in args.seeds:
        for method in args.methods:
            overrides = ["experiment=lm_merge", f"seed={seed}", *LM_METHODS[method], f"lm.test_every={args.eval_every}",
                         *([f"forward_passes={args.forward_passes}"] if args.forward_passes else []), *args.override]
            lm = compose_train_config(overrides).lm
            check_lm_config(lm)
            if missing := [name for name in lm.skills if name not in lm.test_skills]:
                raise ValueError(f"test_acc is the mean test accuracy of lm.skills: add {missing} to lm.test_skills")
            specs.append(LMSpec(method, seed, overrides, args.device, args.threads))
    return specs


def run_lm(spec: LMSpec) -> LMRun:
    """One method, one seed: the package's seeds (built on first use), the merge or baseline, its rows."""
    torch.set_num_threads(spec.threads)
    cfg = compose_train_config(spec.overrides)
    experiment = load_experiment(cfg.lm)
    experiment.tests["train"] = experiment.resources  # the best member's training accuracy at each test point
    start = time.perf_counter()
    if spec.method in BASELINES:
        result = BASELINES[spec.method](cfg, experiment)
    else:
        accelerator = "cpu" if spec.device == "cpu" else "gpu"
        result = search(cfg, experiment, functools.partial(quiet_trainer, accelerator=accelerator, devices=1))
    key = {"method": spec.method, "seed": spec.seed}
    rows = []
    for point in result.test_points:
        test = dict(point.test)
        train = test.pop("train")
        rows.append({**key, "forward_passes": point.forward_passes, "best_train_acc": train,
                     "test_acc": skill_mean(test, list(cfg.lm.skills)), "wall_seconds": point.wall_seconds,
                     **{f"{name}_test": acc for name, acc in test.items()}})
    print(f"{spec.method} seed {spec.seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in rows[-1].items()
          if k.endswith("_test") or k == "test_acc") + f" ({time.perf_counter() - start:.0f} s)", flush=True)
    return LMRun(rows, [{**key, **point} for point in result.curve])

