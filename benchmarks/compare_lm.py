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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from compare_outputs import BRUTE_FORCE
from compare_runs import compose_train_config
from hydra.utils import instantiate

from m2n2_lightning.lm.baselines import seed_alone, slerp_sweep
from m2n2_lightning.lm.merge import MergeResult, merge_models, quiet_trainer
from m2n2_lightning.merge_run import check_merge, load_base, seed_sources
from m2n2_lightning.tasks import TaskSet

#: Each method's Hydra overrides of `experiment=lm_merge` (strategy m2n2_merge, the ablation group).
LM_METHODS: dict[str, tuple[str, ...]] = {
    "m2n2": (),
    "m2n2_max_char_fraction": ("strategy.capacity=max", "merge.tasks.skills.score=char_fraction"),
    "ga": ("ablation=ga",),
    "m2n2_no_split_point": ("ablation=no_split_point",),
    "m2n2_no_matchmaker": ("ablation=no_matchmaker",),
    "map_elites": ("strategy=map_elites_merge",),
    "cmaes_layerwise_slerp": ("strategy=cmaes_layerwise_slerp",),
    BRUTE_FORCE: (),
    "skill_a": (),
    "skill_b": (),
}


@dataclass
class LMExperiment:
    """One run's pieces, read from the config as train.py reads them (m2n2_lightning/merge_run.py)."""

    seeds: list[str]
    model: torch.nn.Module
    tasks: TaskSet
    resources: Any
    tests: dict[str, Any]

    def test_fn(self, model: torch.nn.Module, data: Any) -> float:
        """A test set's mean score; the training resources' (`resources`) mean over every task."""
        return self.tasks.train_score(model) if data is self.resources else self.tasks.test_accuracy(model, data)


def load_experiment(cfg: Any) -> LMExperiment:
    """The tasks (read and checked first), the seeds (the package's, built on first use) and the base model."""
    tasks = TaskSet(instantiate(cfg.merge.tasks, _convert_="all"), cfg.merge.batch_size).load()
    seeds, base = seed_sources(cfg)
    model, tokenizer = load_base(base, cfg.merge.dtype)
    tasks.bind(tokenizer)
    return LMExperiment(seeds, model, tasks, tasks.loader(), tasks.test_sets())


def search(cfg: Any, experiment: LMExperiment, trainer: Callable[..., Any]) -> MergeResult:
    """The config's strategy for `cfg.forward_passes` evaluations, through the callback and a quiet Trainer."""
    return merge_models(
        instantiate(cfg.strategy), experiment.seeds, experiment.model, experiment.resources, experiment.tests,
        cfg.forward_passes, score=experiment.tasks.evaluate, test_fn=experiment.test_fn,
        resource_batch_size=cfg.merge.batch_size, block_size=cfg.module.block_size, test_every=cfg.merge.test_every,
        trainer=trainer,
    )


def brute_force(cfg: Any, experiment: LMExperiment) -> MergeResult:
    """The best of `cfg.forward_passes` SLERP weights between the first two seeds, chosen by training score."""
    return slerp_sweep(
        experiment.seeds[:2], experiment.model, experiment.resources, experiment.tests, cfg.forward_passes,
        score=experiment.tasks.evaluate, test_fn=experiment.test_fn, resource_batch_size=cfg.merge.batch_size,
    )


def alone(index: int) -> Callable[[Any, LMExperiment], MergeResult]:
    """The baseline 'seed number `index` alone' (its test accuracies, no evaluation spent)."""
    return functools.partial(_alone, index)


def _alone(index: int, cfg: Any, experiment: LMExperiment) -> MergeResult:
    return seed_alone(experiment.seeds[index], experiment.model, experiment.resources, experiment.tests,
                      test_fn=experiment.test_fn)


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
            overrides = ["experiment=lm_merge", f"seed={seed}", *LM_METHODS[method], f"merge.test_every={args.eval_every}",
                         *([f"forward_passes={args.forward_passes}"] if args.forward_passes else []), *args.override]
            cfg = compose_train_config(overrides)
            check_merge(cfg)
            instantiate(cfg.merge.tasks)  # a bad task setting fails here
            specs.append(LMSpec(method, seed, overrides, args.device, args.threads))
    return specs


def run_lm(spec: LMSpec) -> LMRun:
    """One method, one seed: the package's seeds (built on first use), the merge or baseline, its rows."""
    torch.set_num_threads(spec.threads)
    cfg = compose_train_config(spec.overrides)
    experiment = load_experiment(cfg)
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
                     "test_acc": experiment.tasks.headline(test), "wall_seconds": point.wall_seconds,
                     **{f"{name}_test": acc for name, acc in test.items()}})
    print(f"{spec.method} seed {spec.seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in rows[-1].items()
          if k.endswith("_test") or k == "test_acc") + f" ({time.perf_counter() - start:.0f} s)", flush=True)
    return LMRun(rows, [{**key, **point} for point in result.curve])

