"""The `lm` block of the Hydra config (conf/experiment/lm_merge.yaml) turned into the pieces of a merge run.

Shared by `train.py experiment=lm_merge` (m2n2_lightning/lm/train_lm.py) and
`benchmarks/compare.py --setting lm_merge`: the seed models (given directories or hub
ids, else the package's seeds, built on first use), the model that holds the candidates,
the training prompts (the resources), the test sets and the per-prompt score. Every
setting is checked before any model is built or read.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from hydra.utils import instantiate
from torch import nn
from transformers import AutoModelForCausalLM

from m2n2_lightning.evaluator import EvaluateFn
from m2n2_lightning.lm.baselines import seed_alone, slerp_sweep
from m2n2_lightning.lm.merge import MergeResult, merge_models, quiet_trainer
from m2n2_lightning.lm.seeds import build_seeds, default_cache, preset
from m2n2_lightning.lm.tasks import (
    SKILLS,
    PromptDataset,
    char_fraction,
    exact_match,
    skill_dataset,
)

#: `lm.score`: the per-prompt score of a candidate (exact match, or the fraction of answer characters right).
SCORES: dict[str, EvaluateFn] = {"exact_match": exact_match, "char_fraction": char_fraction}
#: The package's seed models after the base: the fine-tunes on skill A and on skill B.
FINE_TUNES = ("skill_a", "skill_b")


@dataclass
class LMExperiment:
    """Everything one merge run of the config needs."""

    seeds: list[str]
    model: nn.Module
    resources: PromptDataset
    tests: dict[str, PromptDataset]
    score: EvaluateFn
    resource_batch_size: int
    test_every: int


def check_lm_config(lm: Any) -> None:
    """Refuse a bad `lm` block before anything is built, saying which key is wrong and what it takes."""
    if lm.score not in SCORES:
        raise ValueError(f"lm.score must be one of {sorted(SCORES)}, got {lm.score!r}")
    for key in ("skills", "test_skills"):
        names = list(lm[key])
        if not names or any(name not in SKILLS for name in names):
            raise ValueError(f"lm.{key} must be a non-empty list of skills from {sorted(SKILLS)}, got {names}")
    if lm.seed_dirs is not None and (isinstance(lm.seed_dirs, str) or len(lm.seed_dirs) < 2):
        raise ValueError(f"lm.seed_dirs must list two or more save_pretrained directories or hub ids, got {lm.seed_dirs!r}")
    for key, low in (("resource_batch_size", 1), ("test_every", 0)):
        if not isinstance(lm[key], int) or lm[key] < low:
            raise ValueError(f"lm.{key} must be an integer >= {low}, got {lm[key]!r}")


def seed_sources(lm: Any) -> tuple[list[str], str]:
    """The seed models to merge and the model that holds the candidates (`lm.base`, else the first seed).

    Without `lm.seed_dirs`, the package's preset (`lm.reduced`, seed `lm.seed_models_seed`) is built
    on first use into its cache, and its base holds the candidates.
    """
    if lm.seed_dirs is not None:
        seeds = [str(s) for s in lm.seed_dirs]
        return seeds, str(lm.base) if lm.base is not None else seeds[0]
    cache = default_cache(lm.reduced, lm.seed_models_seed)
    build_seeds(cache, preset(lm.reduced, lm.seed_models_seed))
    base = str(lm.base) if lm.base is not None else str(cache / "base")
    return [str(cache / name) for name in FINE_TUNES], base


def load_experiment(lm: Any) -> LMExperiment:
    """Check the `lm` block, then build (or read) the seeds and the prompt sets."""
    check_lm_config(lm)
    seeds, base = seed_sources(lm)
    return LMExperiment(
        seeds=seeds,
        model=AutoModelForCausalLM.from_pretrained(base).eval(),
        resources=skill_dataset(tuple(lm.skills), "train"),
        tests={name: skill_dataset((name,), "test") for name in lm.test_skills},
        score=SCORES[lm.score],
        resource_batch_size=lm.resource_batch_size,
        test_every=lm.test_every,
    )


def skill_labels(skills: Sequence[str]) -> list[int]:
    """The index of each training prompt's skill in `skills`: MAP-Elites' descriptor labels (one grid axis per skill)."""
    return [list(skills).index(name) for name in skill_dataset(tuple(skills), "train").skills]


def search(
    cfg: Any,
    experiment: LMExperiment,
    trainer: Callable[..., Any] = quiet_trainer,
    callbacks: Sequence[Any] = (),
    ckpt_path: str | None = None,
) -> MergeResult:
    """Run the config's strategy (a factory, `_partial_: true`) for `cfg.forward_passes` evaluations."""
    return merge_models(
        instantiate(cfg.strategy), experiment.seeds, experiment.model, experiment.resources, experiment.tests,
        cfg.forward_passes, score=experiment.score, resource_batch_size=experiment.resource_batch_size,
        block_size=cfg.module.get("block_size"), test_every=experiment.test_every, trainer=trainer, callbacks=callbacks, ckpt_path=ckpt_path,
    )


def brute_force(cfg: Any, experiment: LMExperiment) -> MergeResult:
    """The best of `cfg.forward_passes` SLERP weights between the first two seeds, chosen by training score."""
    return slerp_sweep(
        experiment.seeds[:2], experiment.model, experiment.resources, experiment.tests, cfg.forward_passes,
        score=experiment.score, resource_batch_size=experiment.resource_batch_size,
    )


def alone(index: int) -> Callable[[Any, LMExperiment], MergeResult]:
    """The baseline 'seed number `index` alone' (its test accuracies, no evaluation spent)."""
    return functools.partial(_alone, index)


def _alone(index: int, cfg: Any, experiment: LMExperiment) -> MergeResult:
    return seed_alone(experiment.seeds[index], experiment.model, experiment.resources, experiment.tests)

