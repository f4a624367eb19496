"""M2N2 against CMA-ES, the GA, MAP-Elites and the ablations: the paper's two figures.

    # from scratch (the paper: 10 seeds x 50,000 forward passes)
    python benchmarks/compare.py --methods m2n2,cmaes,ga,ga_no_crossover,m2n2_no_crossover,map_elites \\
        --seeds 10 --forward-passes 50000 --out benchmarks/results/scratch
    # merging the two pre-trained specialists (the paper: 10,000 forward passes)
    python benchmarks/compare.py --setting merge --forward-passes 10000 --seeds 10 \\
        --methods m2n2,m2n2_no_matchmaker,map_elites,m2n2_no_split_point,slerp_brute_force,ga \\
        --out benchmarks/results/merge
    # merging two fine-tuned language models by generation (the paper's section 4.2: 1,000 evaluations)
    OMP_NUM_THREADS=1 python benchmarks/compare.py --setting lm_merge --seeds 3 --out benchmarks/results/lm_merge
    # the four-skill setting, where standard merges lose skills (issue #22)
    OMP_NUM_THREADS=1 python benchmarks/compare.py --setting lm_merge4 --seeds 3 --out benchmarks/results/lm_merge4

A method is a strategy config of m2n2_lightning/conf/strategy/ (m2n2, cmaes, cmaes_diagonal,
ga, ga_no_crossover, m2n2_no_crossover, m2n2_no_split_point,
m2n2_no_matchmaker, map_elites), built by Hydra exactly as `train.py` builds
it (the config is a factory, called with the model's D by `build_strategy`), and run by
`EvolutionEngine` in a bare loop (no Trainer). In the merge
setting the two specialists of `m2n2_lightning.specialists` are trained once
per seed (Lightning + Adam) and given to the strategy as `init_models`
(mutation is then off), and `slerp_brute_force` is the paper's other
baseline: the best of `--forward-passes` SLERP weights w in [0, 1] (no split
point), chosen by training accuracy.

The best member's training and test accuracy are recorded each time the best
member changes and one of them with it (or every `--eval-every` forward
passes). Writes to `--out`:
results.csv (method, seed, forward_passes, best_train_acc, test_acc,
wall_seconds; one row per evaluation point), figure.png (test accuracy against
forward passes, mean and standard-error band over seeds) and table.md (final
accuracy, wall time, rate, the paper's number). `--from-csv` redraws the
figure and table from earlier results.csv files without running anything.
With `--jobs 1`, Ctrl-C stops the current run and writes the outputs with the
rows recorded so far (the table shows the forward passes each run reached).

`--setting lm_merge` and `--setting lm_merge4` (compare_lm.py) run the language-model merges of
m2n2_lightning/lm (two fine-tunes; four, where standard merges lose skills) through train.py's
`experiment=lm_merge` / `experiment=lm_merge4` config and the package's runner (callback and
Trainer): the searches (M2N2, its ablations, the GA, MAP-Elites, the layerwise CMA-ES), the
SLERP sweep (two seeds), mergekit's methods on a grid chosen by training accuracy, the gradient
fine-tunes and each seed alone; `--forward-passes` defaults to the config's 1,000
evaluations. results.csv then also has a `<skill>_test` column per test set (test_acc is the
mean of the trained skills), and curves.csv / curves.png hold the population's coverage and
fitness entropy after every step; table.md ranks the methods like the paper's Table 1,
figure.png shows it as bars and accuracy.png the test accuracy against evaluations.
Ctrl-C there stops everything (results.csv keeps the finished runs).

The runs live in compare_runs.py / compare_lm.py, the outputs in compare_outputs.py /
compare_lm_outputs.py.
"""


from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the compare_* modules beside this script
from compare_lm import LM_METHODS, build_lm_specs, run_lm
from compare_lm_outputs import read_curves, write_lm_outputs
from compare_outputs import BRUTE_FORCE, read_csv, write_csv, write_outputs
from compare_runs import (
    EXPERIMENT,
    PRECISIONS,
    SCRATCH_ONLY,
    STRATEGY_METHODS,
    build_specs,
    quiet,
    run,
    run_all,
)

from m2n2_lightning.lm.merge import write_curve

SETTINGS = ("scratch", "merge", *LM_METHODS)
DEFAULT_METHODS = {"scratch": "m2n2,ga", "merge": "m2n2,ga", **{s: ",".join(m) for s, m in LM_METHODS.items()}}


def parse_seeds(text: str) -> list[int]:
    """'3' -> seeds 0, 1, 2; '0,4,7' -> those seeds."""
    if "," in text:
        return [int(s) for s in text.split(",") if s.strip()]
    return list(range(int(text)))


def known_methods(setting: str) -> tuple[str, ...]:
    """The methods a setting runs."""
    if setting in LM_METHODS:
        return tuple(LM_METHODS[setting])
    return STRATEGY_METHODS + ((BRUTE_FORCE,) if setting == "merge" else ())


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=None, help="comma list (default: m2n2,ga; lm_merge*: all of its methods)")
    parser.add_argument("--seeds", type=parse_seeds, default=parse_seeds("3"), help="N (seeds 0..N-1) or a comma list")
    parser.add_argument("--forward-passes", type=int, default=None,
                        help="budget per run (default 10,000; lm_merge*: the config's 1,000 evaluations)")
    parser.add_argument("--setting", choices=SETTINGS, default="scratch")
    parser.add_argument("--data", choices=tuple(EXPERIMENT), default="digits")
    parser.add_argument("--data-dir", default=None, help="MNIST folder (default: the data config's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=tuple(PRECISIONS), default="32", help="scoring precision")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="a Hydra override of train.py's config, e.g. data.train_size=10000 (repeatable)")
    parser.add_argument("--eval-every", type=int, default=0, help="evaluate every N forward passes (0: when the best changes)")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel processes")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/compare"))
    parser.add_argument("--from-csv", type=Path, nargs="+", help="redraw figure and table from these results.csv")
    args = parser.parse_args(argv)
    methods = args.methods if args.methods is not None else DEFAULT_METHODS[args.setting]
    args.methods = [m.strip() for m in methods.split(",") if m.strip()]
    known = known_methods(args.setting)
    unknown = [m for m in args.methods if m not in known]
    if unknown:
        parser.error(f"unknown method(s) {unknown} for --setting {args.setting}; choose from {', '.join(known)}")
    if args.setting == "merge" and set(args.methods) & set(SCRATCH_ONLY):
        parser.error(f"{', '.join(SCRATCH_ONLY)} cannot start from given models: leave them out of --setting merge")
    if args.setting in LM_METHODS and (args.precision != "32" or args.data != "digits" or args.data_dir):
        parser.error(f"--precision, --data and --data-dir do not apply to --setting {args.setting} (its prompts and models "
                     f"are the merge block of conf/experiment/{args.setting}.yaml: change them with --override "
                     "merge.<key>=...)")
    if args.forward_passes is None and args.setting not in LM_METHODS:
        args.forward_passes = 10_000
    if not args.seeds:
        parser.error("--seeds N runs seeds 0..N-1, so N must be >= 1; for seed 0 alone write --seeds 0,")
    if (args.forward_passes is not None and args.forward_passes < 1) or args.jobs < 1 or args.threads < 1 \
            or args.eval_every < 0:
        parser.error("--forward-passes, --jobs and --threads must be positive, --eval-every >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> Path:
    """Run (or with --from-csv, only redraw) and write the outputs; returns the output folder."""
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    lm = args.setting in LM_METHODS
    if args.from_csv:
        rows = [row for path in args.from_csv for row in read_csv(path)]
        if lm:
            curves = [row for path in args.from_csv if (path.parent / "curves.csv").is_file()
                      for row in read_curves(path.parent / "curves.csv")]
            write_lm_outputs(rows, curves, args.out, args.setting)
        else:
            write_outputs(rows, args)
        return args.out
    quiet()
    torch.set_num_threads(args.threads)
    specs = build_lm_specs(args) if lm else build_specs(args)
    budget = f"{args.forward_passes:,}" if args.forward_passes else "the config's"
    data = "" if lm else f"{args.data}, {args.precision}, "
    print(f"{len(specs)} runs: {', '.join(args.methods)} x seeds {args.seeds}, {budget} forward passes, "
          f"{args.setting}, {data}{args.device}, {args.jobs} job(s) {' '.join(args.override)}", flush=True)
    rows: list[dict[str, Any]] = []
    curves: list[dict[str, Any]] = []

    def on_done(done: Any) -> None:
        if lm:
            rows.extend(done.rows)
            curves.extend(done.curve)
            write_curve(curves, args.out / "curves.csv", ("method", "seed"))
        else:
            rows.extend(done)
        write_csv(rows, args.out / "results.csv")  # partial results (and curves) survive an interruption

    run_all(specs, args.jobs, on_done, run_lm if lm else run)
    if lm:
        write_lm_outputs(rows, curves, args.out, args.setting)
    else:
        write_outputs(rows, args)
    print(f"\n{(args.out / 'table.md').read_text()}\nresults.csv, figure.png, table.md in {args.out}")
    return args.out


if __name__ == "__main__":
    main()
