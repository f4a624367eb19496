"""`m2n2-merge recipe.yaml --out DIR [overrides]`: a merge recipe run by train.py's Hydra app (`experiment=merge`).

A recipe in the shape of mergekit's:

    models: [org/model-a, org/model-b]      # or [{model: org/model-a}, ...]
    base_model: org/model-a                 # holds the candidates (default: the first model)
    dtype: bfloat16
    merge_method: m2n2_merge                # a strategy config: m2n2_merge, map_elites_merge, cmaes_layerwise_slerp, ...
    ablation: null                          # ga, no_split_point, no_matchmaker, ...
    parameters: {pop_size: 15}              # the strategy's settings
    evaluations: 1000
    seed: 0
    device: auto                            # cpu, gpu, auto (trainer.accelerator)
    tasks:
      math: {type: dataset, path: json, data_files: {train: train.jsonl, test: test.jsonl}, template: "{question}=", answer: answer}

is turned into Hydra overrides, given before the command line's own, so that these win
(`m2n2-merge recipe.yaml --out DIR evaluations=...` is not a Hydra key: use `forward_passes=...`).
The recipe file is copied to DIR/recipe.yaml.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

#: `type:` of a task in a recipe -> its class.
TASK_TYPES = {
    "dataset": "m2n2_lightning.tasks.dataset.DatasetTask",
    "skills": "m2n2_lightning.tasks.skills.SkillTask",
    "lm_eval": "m2n2_lightning.tasks.harness.HarnessTask",
    "function": "m2n2_lightning.tasks.function.FunctionTask",
}
#: Recipe keys -> the app's keys (the others: models, base_model, dtype, tasks, batch_size, test_every under merge.*).
TOP_LEVEL = {"evaluations": "forward_passes", "seed": "seed", "device": "trainer.accelerator"}
MERGE_KEYS = ("models", "base_model", "model_class", "dtype", "batch_size", "test_every")
KNOWN = {*TOP_LEVEL, *MERGE_KEYS, "tasks", "merge_method", "ablation", "parameters"}


def quoted(value: Any) -> str:
    """A value in Hydra's override grammar: strings single-quoted (quotes and the backslashes before them escaped)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(quoted(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{quoted(v)}" for k, v in value.items()) + "}"
    text = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, str(value))
    return "'" + text.replace("'", "\\'") + "'"


def leaves(prefix: str, value: Any) -> list[str]:
    """`++key=value` overrides, one per leaf of a nested mapping (lists are leaves)."""
    if isinstance(value, dict) and value:
        return [o for k, v in value.items() for o in leaves(f"{prefix}.{k}", v)]
    return [f"++{prefix}={quoted(value)}"]


def recipe_overrides(recipe: dict[str, Any]) -> list[str]:
    """The Hydra overrides of `experiment=merge` that a recipe stands for; ValueError on an unknown key."""
    if unknown := sorted(set(recipe) - KNOWN):
        raise ValueError(f"unknown recipe keys {unknown}; a recipe takes {sorted(KNOWN)}")
    overrides = ["experiment=merge"]
    if "merge_method" in recipe:
        overrides.append(f"strategy={recipe['merge_method']}")
    if recipe.get("ablation"):
        overrides.append(f"ablation={recipe['ablation']}")
    for key, target in TOP_LEVEL.items():
        if key in recipe:
            overrides.append(f"{target}={quoted(recipe[key])}")
    for key in MERGE_KEYS:
        if key in recipe:
            value = recipe[key]
            if key == "models" and isinstance(value, list):
                value = [m["model"] if isinstance(m, dict) else m for m in value]
            overrides.append(f"merge.{key}={quoted(value)}")
    for key, value in (recipe.get("parameters") or {}).items():
        overrides.append(f"++strategy.{key}={quoted(value)}")
    for name, task in (recipe.get("tasks") or {}).items():
        task = dict(task)
        kind = task.pop("type", None)
        if kind is not None:
            if kind not in TASK_TYPES:
                raise ValueError(f"task {name}: unknown type {kind!r}; one of {sorted(TASK_TYPES)}, or _target_: module.Class")
            task = {"_target_": TASK_TYPES[kind], **task}
        overrides += leaves(f"merge.tasks.{name}", task)
    return overrides


def main(argv: Sequence[str] | None = None) -> None:
    """Parse `recipe.yaml --out DIR [overrides]` and run train.py's app on the recipe."""
    parser = argparse.ArgumentParser(prog="m2n2-merge", description=__doc__.split("\n")[0])
    parser.add_argument("recipe", type=Path, help="the merge recipe (YAML)")
    parser.add_argument("--out", type=Path, required=True, help="the run directory (best_model/, summary.json, ...)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of train.py's config, applied after the recipe")
    args = parser.parse_intermixed_args(argv)
    if not args.recipe.is_file():
        parser.error(f"no recipe file at {args.recipe}")
    recipe = yaml.safe_load(args.recipe.read_text()) or {}
    if not isinstance(recipe, dict):
        parser.error(f"{args.recipe} must hold a mapping (models, base_model, tasks, ...)")
    try:
        overrides = recipe_overrides(recipe)
    except ValueError as error:
        parser.error(str(error))
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(args.recipe, args.out / "recipe.yaml")
    from m2n2_lightning.train import main as train_main

    sys.argv = [sys.argv[0], *overrides, f"hydra.run.dir={quoted(str(args.out.resolve()))}", *args.overrides]
    train_main()


if __name__ == "__main__":
    main()
