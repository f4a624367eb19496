"""mergekit's own merges as baselines of the lm_merge setting (issue #22): a small grid of each method's settings.

Users compare M2N2 with the merges they would make anyway with mergekit. For each method
(linear, SLERP for two seeds, task arithmetic, TIES, DARE-TIES, DELLA, breadcrumbs) every
grid point is merged by mergekit itself (`mergekit.merge.run_merge` on the seed directories
and the base), loaded with `AutoModelForCausalLM` and scored on the training prompts (the
resources M2N2 sees); the best point of each method, and the best of the whole grid, are
chosen by that training score (the first on ties), never by a test prompt. Each point scored
counts one evaluation, M2N2's budget unit (one candidate scored on all training prompts).

    python benchmarks/mergekit_grid.py --seed 0 [--experiment lm_merge] [--out results.csv]

In compare_lm.py: `BASELINES["mergekit"] = mergekit_baselines` (one grid run, one result per
`mergekit_<method>` and `mergekit_best`), or one grid per method with `mergekit_baseline(name)`;
`LABELS` names them for the tables.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
from torch import nn

from m2n2_lightning.lm.merge import AccuracyPoint, MergeResult

#: mergekit's `random_seed` for every merge (DARE's and DELLA's random drops are then reproducible).
MERGEKIT_SEED = 0
#: The merge methods, in grid order (mergekit's names); the baselines are called `mergekit_<method>`.
METHODS = ("linear", "slerp", "task_arithmetic", "ties", "dare_ties", "della", "breadcrumbs")
#: Methods whose `lambda` scales the mean of the (kept) task vectors (mergekit's default normalize=True).
NORMALISED = ("ties", "della")
BEST = "mergekit_best"
LABELS = {
    "mergekit_linear": "mergekit linear (weights grid)",
    "mergekit_slerp": "mergekit SLERP (t grid)",
    "mergekit_task_arithmetic": "mergekit task arithmetic (lambda grid)",
    "mergekit_ties": "mergekit TIES (density x lambda)",
    "mergekit_dare_ties": "mergekit DARE-TIES (density x lambda, seeded)",
    "mergekit_della": "mergekit DELLA (density x lambda)",
    "mergekit_breadcrumbs": "mergekit breadcrumbs (lambda grid)",
    BEST: "mergekit, best of the whole grid by training accuracy",
}


@dataclass(frozen=True)
class GridPoint:
    """One mergekit merge: its method and the settings the grid varies (None where the method has no such knob)."""

    method: str
    weights: tuple[float, ...] | None = None  # linear: one weight per seed (mergekit normalises them by their sum)
    t: float | None = None  # slerp: 0 is the first seed
    lam: float | None = None  # task-vector methods: `lambda`, the scale of the merged task vector
    density: float | None = None  # sparsified task-vector methods: the fraction of each task vector kept

    def settings(self) -> dict[str, Any]:
        """The settings that are set (for the result rows)."""
        names = {"weights": self.weights, "t": self.t, "lambda": self.lam, "density": self.density}
        return {name: list(v) if isinstance(v, tuple) else v for name, v in names.items() if v is not None}

    def config(self, seeds: Sequence[str], base: str, dtype: str) -> dict[str, Any]:
        """mergekit's YAML configuration of this merge, as a dict (MergeConfiguration's fields)."""
        if self.method == "linear":
            models = [{"model": s, "parameters": {"weight": w}} for s, w in zip(seeds, self.weights, strict=True)]
            return {"merge_method": "linear", "models": models, "dtype": dtype}
        if self.method == "slerp":  # mergekit's SLERP goes from its base model (t = 0) to the other one, per tensor
            return {"merge_method": "slerp", "base_model": seeds[0], "models": [{"model": s} for s in seeds],
                    "parameters": {"t": self.t}, "dtype": dtype}
        per_model = {"weight": 1.0, **({} if self.density is None else {"density": self.density})}
        return {"merge_method": self.method, "base_model": base, "dtype": dtype, "parameters": {"lambda": self.lam},
                "models": [{"model": s, "parameters": dict(per_model)} for s in seeds]}


def grid(k: int) -> list[GridPoint]:
    """The grid for `k` seeds (in `METHODS` order): 39 merges for k = 2, 26 for k = 4.

    Linear: weights 0.1..0.9 for the first of two seeds; for k > 2 uniform weights and each seed
    weighted twice. SLERP (k = 2 only): t = 0.1..0.9. Task arithmetic (base + lambda * sum of task
    vectors): lambda in {1.5/k, 2/k, 3/k}. TIES and DELLA (lambda times the mean of the kept
    vectors) lambda in {1, 1.5}; DARE-TIES and breadcrumbs (lambda times their sum) lambda in {1/k, 2/k};
    densities {0.3, 0.6, 0.9} (DELLA {0.3, 0.6}: its epsilon 0.15 needs density + 0.15 < 1; breadcrumbs 0.9).
    """
    if k < 2:
        raise ValueError(f"a merge takes at least two seed models, got {k}")
    tenths = [round(0.1 * i, 1) for i in range(1, 10)]
    if k == 2:
        weightings = [(w, round(1 - w, 1)) for w in tenths]
    else:
        weightings = [(1.0,) * k] + [tuple(2.0 if j == i else 1.0 for j in range(k)) for i in range(k)]
    points = [GridPoint("linear", weights=w) for w in weightings]
    points += [GridPoint("slerp", t=t) for t in tenths] if k == 2 else []
    # task arithmetic's lambda = 1/k is the uniform linear merge: its grid scales the mean task vector by 1.5, 2, 3
    points += [GridPoint("task_arithmetic", lam=round(c / k, 4)) for c in (1.5, 2.0, 3.0)]
    summed = (round(1 / k, 4), round(2 / k, 4))
    for method, densities, lams in (("ties", (0.3, 0.6, 0.9), (1.0, 1.5)), ("dare_ties", (0.3, 0.6, 0.9), summed),
                                    ("della", (0.3, 0.6), (1.0, 1.5)), ("breadcrumbs", (0.9,), summed)):
        points += [GridPoint(method, lam=lam, density=d) for d in densities for lam in lams]
    return points


def merge(point: GridPoint, seeds: Sequence[str], base: str, out: Path, dtype: str = "float32") -> Path:
    """Runs mergekit's merge of `point` into `out` (no tokenizer, CPU, seeded); the caller's RNG states are kept."""
    options = MergeOptions(copy_tokenizer=False, device="cpu", lazy_unpickle=False, random_seed=MERGEKIT_SEED,
                           write_model_card=False, quiet=True)
    states = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng():  # run_merge seeds the global generators (transformers.set_seed)
            run_merge(MergeConfiguration.model_validate(point.config(seeds, base, dtype)), str(out), options)
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
    return out


@dataclass
class GridRow:
    """One scored merge: its evaluation number (from 1, in grid order), training score, test accuracies, seconds."""

    point: GridPoint
    evaluation: int
    train: float
    test: dict[str, float]
    seconds: float  # merge, load and training score (not the test sets)

    def record(self) -> dict[str, Any]:
        """A flat row for the grid CSV."""
        return {"method": f"mergekit_{self.point.method}", "evaluation": self.evaluation,
                "settings": json.dumps(self.point.settings()), "train_acc": self.train,
                **{f"{name}_test": acc for name, acc in self.test.items()}, "seconds": self.seconds}


def run_grid(points: Sequence[GridPoint], seeds: Sequence[str], base: str, load: Callable[[Path], nn.Module],
             train_score: Callable[[nn.Module], float], test: Callable[[nn.Module, float], dict[str, float]],
             dtype: str = "float32") -> list[GridRow]:
    """Merges, loads (`load(dir)`) and scores every point: `train_score` (what the choice sees), then
    `test(model, training score)` (the test accuracies; a test set that is the training prompts reuses the score)."""
    if len(seeds) < 2 or (any(p.method not in ("linear", "slerp") for p in points) and base in seeds):
        raise ValueError(f"the grid needs two or more seeds and a base model that is none of them: {seeds}, {base}")
    if any(p.method == "slerp" for p in points) and len(seeds) != 2:
        raise ValueError(f"mergekit's SLERP merges exactly two models, got {len(seeds)}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="mergekit_grid_") as work:
        for i, point in enumerate(points, start=1):
            start = time.perf_counter()
            out = merge(point, seeds, base, Path(work) / str(i), dtype)
            model = load(out)
            shutil.rmtree(out)
            score = float(train_score(model))
            seconds = time.perf_counter() - start
            rows.append(GridRow(point, i, score, test(model, score), seconds))
    return rows


def best(rows: Sequence[GridRow]) -> GridRow:
    """The row with the best training score, the first on ties."""
    if not rows:
        raise ValueError("no grid point was scored")
    return max(rows, key=lambda r: (r.train, -r.evaluation))


def method_result(rows: Sequence[GridRow]) -> MergeResult:
    """One method's (or the whole grid's) result: the best row by training score, `forward_passes` = rows scored.

    Its test points are the best-so-far row's test accuracies after each evaluation (the curve of a search).
    """
    points, wall = [], 0.0
    for n in range(1, len(rows) + 1):
        wall += rows[n - 1].seconds
        points.append(AccuracyPoint(n, wall, dict(best(rows[:n]).test)))
    top = best(rows)
    settings = {"method": top.point.method, **top.point.settings(), "best_train_score": top.train,
                "grid": [row.record() for row in rows]}
    return MergeResult(test=dict(top.test), train=top.train, forward_passes=len(rows), wall_seconds=wall,
                       test_points=points, settings=settings)


def results(rows: Sequence[GridRow]) -> dict[str, MergeResult]:
    """`mergekit_<method>` for each method in the rows, and `mergekit_best` over all of them."""
    out = {f"mergekit_{m}": method_result([r for r in rows if r.point.method == m])
           for m in dict.fromkeys(r.point.method for r in rows)}
    out[BEST] = method_result(rows)
    return out


def experiment_grid(cfg: Any, experiment: Any, methods: Sequence[str] = METHODS) -> list[GridRow]:
    """The grid of `methods` over the experiment's seeds and base (`seed_sources(cfg)`), scored as M2N2's candidates:
    `experiment.test_fn(model, experiment.resources)` and every test set of `experiment.tests`."""
    from m2n2_lightning.merge_run import seed_sources

    seeds, base = seed_sources(cfg)
    dtype = str(experiment.model.dtype).removeprefix("torch.")
    device = next(experiment.model.parameters()).device

    def load(path: Path) -> nn.Module:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(path, dtype=experiment.model.dtype).to(device).eval()

    def train_score(model: nn.Module) -> float:
        return float(experiment.test_fn(model, experiment.resources))

    def test(model: nn.Module, train: float) -> dict[str, float]:  # compare_lm's "train" test set is the resources
        return {name: train if data is experiment.resources else float(experiment.test_fn(model, data))
                for name, data in experiment.tests.items()}

    points = [p for p in grid(len(seeds)) if p.method in methods]
    return run_grid(points, seeds, base, load, train_score, test, dtype)


def mergekit_baselines(cfg: Any, experiment: Any) -> dict[str, MergeResult]:
    """Every method's best merge and the best overall (`results`), from one run of the whole grid."""
    return results(experiment_grid(cfg, experiment))


def mergekit_baseline(name: str) -> Callable[[Any, Any], MergeResult]:
    """compare_lm's baseline `name` (`mergekit_<method>` or `mergekit_best`): that method's grid (all for best)."""
    method = name.removeprefix("mergekit_")
    if name != BEST and (not name.startswith("mergekit_") or method not in METHODS):
        raise ValueError(f"unknown mergekit baseline {name!r}; one of mergekit_{{{', '.join(METHODS)}}} or {BEST}")

    def run(cfg: Any, experiment: Any) -> MergeResult:
        rows = experiment_grid(cfg, experiment, METHODS if name == BEST else (method,))
        return method_result(rows)

    return run


def write_grid(path: Path, rows: Sequence[GridRow], extra: Mapping[str, Any]) -> None:
    """The grid's rows as CSV (with `extra` columns, e.g. the seed), for the accuracy-against-evaluations plots."""
    records = [{**extra, **row.record()} for row in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)


def main(argv: Sequence[str] | None = None) -> None:
    """Runs the grid on one seed of an experiment, writes its rows and prints each method's best."""
    from compare_lm import load_experiment
    from compare_runs import compose_train_config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--experiment", default="lm_merge")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="default: results/<experiment>/mergekit_grid_seed<N>.csv")
    parser.add_argument("override", nargs="*", help="more train.py overrides")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = compose_train_config([f"experiment={args.experiment}", f"seed={args.seed}", *args.override])
    experiment = load_experiment(cfg)
    rows = experiment_grid(cfg, experiment)
    out = args.out or Path(__file__).parent / "results" / args.experiment / f"mergekit_grid_seed{args.seed}.csv"
    write_grid(out, rows, {"seed": args.seed})
    for name, result in results(rows).items():
        tests = ", ".join(f"{k} {v:.3f}" for k, v in result.test.items())
        print(f"{name}: {result.settings['method']} {json.dumps({k: v for k, v in result.settings.items() if k in ('weights', 't', 'lambda', 'density')})}"
              f" train {result.train:.3f}; test {tests} ({result.forward_passes} evaluations, {result.wall_seconds:.1f} s)")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
