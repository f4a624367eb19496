"""The image-generation merge (issue 23) at one budget: M2N2 against its ablations, the GA, each seed and the average.

Every merge runs through `train.py experiment=diffusion_merge` (a subprocess each, the same seeds,
resources and budget of evaluations); the seeds alone and mergekit's uniform average of the four
U-Nets cost no search. Each resulting U-Net is then evaluated on the test captions of both
languages (m2n2_lightning/diffusion/evaluate.py): the normalised similarity, the FID-like
distance on the scorer's features, and the consistency between the languages. Writes, under
--out: results_seed<N>.csv and .md, results.md (over every seed's CSV there: mean +- sd, and M2N2
against each model), curves_seed<N>.png (coverage and fitness entropy of the merges) and
grid_seed<N>.png (the same test captions, in the second language, for every model); the runs go
to --runs.

    OMP_NUM_THREADS=1 python benchmarks/diffusion_merge.py [--seed 0] [--evaluations 100] [--preset full]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from m2n2_lightning.diffusion.evaluate import evaluate, save_grid
from m2n2_lightning.diffusion.seeds import SEED_NAMES, default_cache, load_unet
from m2n2_lightning.tasks.base import TaskSet
from m2n2_lightning.tasks.diffusion import DiffusionTask

ROOT = Path(__file__).resolve().parents[1]
#: The U-Net's blocks (regex on parameter names): the groups of the CMA-ES baseline, one mixing weight per seed each.
BLOCKS = ["^(conv_in|time_embedding)", "^down_blocks[.]0[.]", "^down_blocks[.]1[.]", "^mid_block[.]", "^up_blocks[.]0[.]",
          "^up_blocks[.]1[.]", "^conv_(norm_)?out"]
#: The merges and their overrides of experiment=diffusion_merge.
MERGES = {
    "m2n2": [],
    "m2n2_no_score_shift": ["strategy.score_shift=false"],
    "m2n2_no_chromosomes": ["strategy.chromosomes=null"],
    "ga": ["ablation=ga"],
    # CMA-ES over the four seeds' mixing weights per U-Net block (the paper's comparison, section 4.3), here
    # maximising the mean similarity as every method does (the paper's minimised FID)
    "cmaes_blockwise": ["strategy=cmaes_layerwise_simplex", "~strategy.score_shift", "~strategy.chromosomes",
                        "strategy.groups=" + json.dumps(BLOCKS)],
}


def run_merge(name: str, overrides: list[str], args: argparse.Namespace) -> Path:
    """Run one merge with train.py; its run directory."""
    run_dir = args.runs.resolve() / f"{name}_seed{args.seed}"
    task = [f"merge.tasks.images.{k}={v}" for k, v in
            (("preset", args.preset), ("resources", args.resources), ("tests", args.tests), ("steps", args.steps))]
    command = [sys.executable, str(ROOT / "train.py"), "experiment=diffusion_merge", f"seed={args.seed}",
               f"forward_passes={args.evaluations}", f"checkpoint_every={args.evaluations}", f"hydra.run.dir={run_dir}",
               "trainer.enable_progress_bar=false", *task, *overrides]
    start = time.perf_counter()
    result = subprocess.run(command, check=False, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if result.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{result.stderr[-3000:]}")
    print(f"{name}: {time.perf_counter() - start:.0f} s", flush=True)
    return run_dir


def average(cache: Path) -> torch.nn.Module:
    """mergekit's `linear` merge with equal weights: the mean of the four seed U-Nets."""
    unets = [load_unet(cache, name) for name in SEED_NAMES]
    states = [u.state_dict() for u in unets]
    unets[0].load_state_dict({k: torch.stack([s[k] for s in states]).mean(0) for k in states[0]})
    return unets[0].eval()


def plot_curves(runs: dict[str, Path], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for name, run_dir in runs.items():
        with (run_dir / "curves.csv").open() as f:
            rows = list(csv.DictReader(f))
        for axis, key in zip(axes, ("coverage", "fitness_entropy")):
            points = [(int(r["forward_passes"]), float(r[key])) for r in rows if r[key] != ""]  # CMA-ES: no archive
            if points:
                axis.plot(*zip(*points), label=name)
            axis.set_xlabel("evaluations")
            axis.set_title(key)
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def summarize(out: Path) -> str:
    """results.md: every metric's mean +- standard deviation over the seeds' results_seed*.csv, and whether M2N2
    beats each other model on the mean test similarity (both languages) and on the mean FID-like distance."""
    import statistics

    rows: dict[str, list[dict[str, float]]] = {}
    for path in sorted(out.glob("results_seed*.csv")):
        with path.open() as f:
            for row in csv.DictReader(f):
                rows.setdefault(row["model"], []).append({k: float(v) for k, v in row.items() if k != "model"})
    keys = [k for k in next(iter(rows.values()))[0] if k != "seed"]

    def mean(model: str, key: str) -> float:
        return statistics.fmean(r[key] for r in rows[model])

    def cell(model: str, key: str) -> str:
        values = [r[key] for r in rows[model]]
        spread = f" +- {statistics.stdev(values):.4f}" if len(values) > 1 else ""
        return f"{statistics.fmean(values):.4f}{spread}"

    lines = ["| model | seeds | " + " | ".join(keys) + " |", "|---" * (len(keys) + 2) + "|"]
    lines += [f"| {m} | {len(rows[m])} | " + " | ".join(cell(m, k) for k in keys) + " |" for m in rows]
    similarity = {m: (mean(m, "similarity_en") + mean(m, "similarity_ja")) / 2 for m in rows}
    fid = {m: (mean(m, "fid_en") + mean(m, "fid_ja")) / 2 for m in rows}
    lines += ["", "| M2N2 against | higher test similarity (mean of en, ja) | lower FID-like distance (mean of en, ja) |",
              "|---|---|---|"]
    def verdict(ours: float, theirs: float, higher: bool) -> str:
        return "tie" if ours == theirs else "yes" if (ours > theirs) == higher else "no"

    lines += [f"| {m} | {verdict(similarity['m2n2'], similarity[m], True)} ({similarity['m2n2']:.4f} vs "
              f"{similarity[m]:.4f}) | {verdict(fid['m2n2'], fid[m], False)} ({fid['m2n2']:.1f} vs {fid[m]:.1f}) |"
              for m in rows if m != "m2n2"]
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", default="full")
    parser.add_argument("--evaluations", type=int, default=100)
    parser.add_argument("--resources", type=int, default=30)
    parser.add_argument("--tests", type=int, default=180)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "diffusion_merge")
    parser.add_argument("--runs", type=Path, default=Path("outputs") / "diffusion_merge", help="the merges' run directories")
    parser.add_argument("--summary-only", action="store_true", help="only write results.md from the seeds' CSVs")
    args = parser.parse_args()
    if args.summary_only:
        print(summarize(args.out))
        return
    torch.set_num_threads(1)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    cache = default_cache(args.preset, args.seed)  # where train.py's config finds it ($M2N2_DIFFUSION_CACHE)
    task = DiffusionTask(cache=str(cache), preset=args.preset, seed_models_seed=args.seed, resources=args.resources,
                         tests=args.tests, steps=args.steps)
    tasks = TaskSet({"images": task}).load()  # builds the seeds on first use
    runs = {name: run_merge(name, overrides, args) for name, overrides in MERGES.items()}
    from diffusers import UNet2DConditionModel

    models = {name: load_unet(cache, name) for name in SEED_NAMES}
    models["average"] = average(cache)
    models.update({name: UNet2DConditionModel.from_pretrained(d / "best_model").eval() for name, d in runs.items()})
    tests = tasks.data["images"].tests
    rows = []
    for name, unet in models.items():
        row = {"model": name, "seed": args.seed, "train_similarity": tasks.train_score(unet), **evaluate(task, unet, tests)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    path = out / f"results_seed{args.seed}.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    keys = [k for k in rows[0] if k not in ("model", "seed")]
    table = ["| model | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    table += ["| " + r["model"] + " | " + " | ".join(f"{r[k]:.4f}" for k in keys) + " |" for r in rows]
    (out / f"results_seed{args.seed}.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    plot_curves(runs, out / f"curves_seed{args.seed}.png")
    shown = tests["ja"][:: max(1, len(tests["ja"]) // 12)][:12]
    save_grid({name: task.generate(unet, shown) for name, unet in models.items()}, [e["caption"] for e in shown],
              out / f"grid_seed{args.seed}.png")
    print(summarize(out))


if __name__ == "__main__":
    main()
