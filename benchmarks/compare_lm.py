"""The LM settings of benchmarks/compare.py: the paper's LLM comparison (section 4.2) at laptop scale.

`lm_merge` merges the two fine-tunes of m2n2_lightning/lm (addition, reversal), `lm_merge4`
the four fine-tunes of its 4-skill preset (the setting where standard merges lose skills).
Every method runs at the same budget of evaluations, through `train.py`'s config (the
setting's experiment plus the method's overrides below) and the package's runner
(`m2n2_lightning.lm.merge.merge_models`: the callback and a Trainer); the baselines that are
not strategies (each seed alone, the SLERP sweep, mergekit's grid, the gradient fine-tunes)
count their own evaluations. A run's rows hold the best member's accuracies at the start,
every `--eval-every` evaluations and at the end: `best_train_acc` (exact match on the
training prompts), `test_acc` (the mean of the trained skills' test accuracies) and one
`<skill>_test` column per test set; its curve rows hold the population's coverage and
fitness entropy after every step (the paper's figure 5).
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
from gradient_lm import GRADIENT_BASELINES
from hydra.utils import instantiate
from mergekit_grid import LABELS as MERGEKIT_LABELS
from mergekit_grid import mergekit_baselines

from m2n2_lightning.lm.baselines import seed_alone, slerp_sweep
from m2n2_lightning.lm.merge import MergeResult, merge_models, quiet_trainer
from m2n2_lightning.merge_run import (
    check_merge,
    load_base,
    seed_sources,
    strategy_seeds,
)
from m2n2_lightning.tasks import TaskSet

#: The searches of both settings: each method's Hydra overrides of the setting's experiment
#: (strategy m2n2_merge, the ablation group).
SEARCHES: dict[str, tuple[str, ...]] = {
    "m2n2": (),
    "m2n2_max_char_fraction": ("strategy.capacity=max", "merge.tasks.skills.score=char_fraction"),
    "ga": ("ablation=ga",),
    "m2n2_no_split_point": ("ablation=no_split_point",),
    "m2n2_no_matchmaker": ("ablation=no_matchmaker",),
    # M2N2's options from the paper's general form, and crossover in task-vector space (issue #22's point 4)
    "m2n2_task_vectors": ("strategy.task_vectors=true",),
    "m2n2_chromosomes": ("strategy.chromosomes=[*self_attn*,*mlp*]",),
    "m2n2_per_part": ("strategy.slerp_angle=per_part",),
    "m2n2_archive_30": ("strategy.pop_size=30",),
    "m2n2_warmup_200": ("strategy.warmup_steps=200",),
}
#: The seeds alone, by position in the setting's seed list.
ALONE = ("skill_a", "skill_b", "skill_c", "skill_d")
#: The baselines of both settings that are not strategies (run by BASELINES below, no overrides).
COMMON_BASELINES = ("mergekit", "gradient_base", "gradient_skill_a")
#: Each setting's methods: setting (= train.py experiment) -> method -> overrides.
LM_METHODS: dict[str, dict[str, tuple[str, ...]]] = {
    "lm_merge": {
        **SEARCHES,
        "map_elites": ("strategy=map_elites_merge",),
        "cmaes_layerwise_slerp": ("strategy=cmaes_layerwise_slerp",),
        BRUTE_FORCE: (),
        **dict.fromkeys(COMMON_BASELINES, ()),
        **dict.fromkeys(ALONE[:2], ()),
    },
    "lm_merge4": {
        **SEARCHES,
        # MAP-Elites' grid generalised to the four skills: one axis each, 4 bins (256 cells).
        "map_elites": ("strategy=map_elites_merge", "strategy.descriptor_classes=[[0],[1],[2],[3]]"),
        "cmaes_layerwise_simplex": ("strategy=cmaes_layerwise_simplex",),
        **dict.fromkeys(COMMON_BASELINES, ()),
        **dict.fromkeys(ALONE, ()),
    },
}


@dataclass
class LMExperiment:
    """One run's pieces, read from the config as train.py reads them (m2n2_lightning/merge_run.py)."""

    seeds: list[str]
    base: str
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
    return LMExperiment(seeds, base, model, tasks, tasks.loader(), tasks.test_sets())


def search(cfg: Any, experiment: LMExperiment, trainer: Callable[..., Any]) -> MergeResult:
    """The config's strategy for `cfg.forward_passes` evaluations, through the callback and a quiet Trainer."""
    return merge_models(
        instantiate(cfg.strategy), strategy_seeds(cfg, experiment.seeds, experiment.base), experiment.model, experiment.resources, experiment.tests,
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


#: The methods that are not searches: what they run instead of the strategy (one result, or one per method
#: name for a baseline that reports several, like mergekit's grid).
BASELINES: dict[str, Callable[[Any, LMExperiment], MergeResult | dict[str, MergeResult]]] = {
    BRUTE_FORCE: brute_force,
    "mergekit": mergekit_baselines,  # one result per mergekit method and mergekit_best
    **GRADIENT_BASELINES,
    **{name: alone(index) for index, name in enumerate(ALONE)},
}
LM_LABELS = {
    "m2n2": "M2N2 (exact match)",
    "m2n2_max_char_fraction": 'M2N2, capacity "max", character score',
    "ga": "GA",
    "m2n2_no_split_point": "M2N2 without split point",
    "m2n2_no_matchmaker": "M2N2 without attraction",
    "m2n2_task_vectors": "M2N2, crossover of task vectors over the base",
    "m2n2_chromosomes": "M2N2, chromosomes: attention, MLP, the rest",
    "m2n2_per_part": "M2N2, one SLERP angle per part (eq. 2)",
    "m2n2_archive_30": "M2N2, archive 30",
    "m2n2_warmup_200": "M2N2, warm-up 200",
    "map_elites": "MAP-Elites (4 bins per skill's training accuracy)",
    "cmaes_layerwise_slerp": "CMA-ES over one SLERP coefficient per layer (population 25)",
    "cmaes_layerwise_simplex": "CMA-ES over K - 1 mixing weights per layer (population 25)",
    BRUTE_FORCE: "SLERP, best single weight (brute force)",
    "gradient_base": "gradient fine-tune of the base on the training prompts",
    "gradient_skill_a": "gradient fine-tune of seed A on the training prompts",
    **{name: f"seed: fine-tune {name[-1].upper()} alone" for name in ALONE},
    **MERGEKIT_LABELS,
}


@dataclass
class LMSpec:
    """One (method, seed) run of an LM setting: train.py's overrides; picklable for worker processes."""

    setting: str
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
            overrides = [f"experiment={args.setting}", f"seed={seed}", *LM_METHODS[args.setting][method],
                         f"merge.test_every={args.eval_every}",
                         *([f"forward_passes={args.forward_passes}"] if args.forward_passes else []), *args.override]
            cfg = compose_train_config(overrides)
            check_merge(cfg)
            instantiate(cfg.merge.tasks)  # a bad task setting fails here
            specs.append(LMSpec(args.setting, method, seed, overrides, args.device, args.threads))
    return specs


def run_lm(spec: LMSpec) -> LMRun:
    """One method, one seed: the package's seeds (built on first use), the merge or baseline, its rows."""
    torch.set_num_threads(spec.threads)
    cfg = compose_train_config(spec.overrides)
    experiment = load_experiment(cfg)
    experiment.tests["train"] = experiment.resources  # the best member's training accuracy at each test point
    start = time.perf_counter()
    if spec.method in BASELINES:
        done = BASELINES[spec.method](cfg, experiment)
    else:
        accelerator = "cpu" if spec.device == "cpu" else "gpu"
        done = search(cfg, experiment, functools.partial(quiet_trainer, accelerator=accelerator, devices=1))
    results = done if isinstance(done, dict) else {spec.method: done}
    rows, curve = [], []
    for method, result in results.items():
        key = {"method": method, "seed": spec.seed}
        for point in result.test_points:
            test = dict(point.test)
            train = test.pop("train")
            rows.append({**key, "forward_passes": point.forward_passes, "best_train_acc": train,
                         "test_acc": experiment.tasks.headline(test), "wall_seconds": point.wall_seconds,
                         **{f"{name}_test": acc for name, acc in test.items()}})
        curve += [{**key, **point} for point in result.curve]
        print(f"{method} seed {spec.seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in rows[-1].items()
              if k.endswith("_test") or k == "test_acc") + f" ({time.perf_counter() - start:.0f} s)", flush=True)
    return LMRun(rows, curve)
