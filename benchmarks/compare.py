"""M2N2 against CMA-ES, the GA, MAP-Elites and the ablations: the paper's two figures.

    # from scratch (the paper: 10 seeds x 50,000 forward passes)
    python benchmarks/compare.py --methods m2n2,cmaes,ga,ga_no_crossover,m2n2_no_crossover,map_elites \\
        --seeds 10 --forward-passes 50000 --out benchmarks/results/scratch
    # merging the two pre-trained specialists (the paper: 10,000 forward passes)
    python benchmarks/compare.py --setting merge --forward-passes 10000 --seeds 10 \\
        --methods m2n2,m2n2_no_matchmaker,map_elites,m2n2_no_split_point,slerp_brute_force,ga \\
        --out benchmarks/results/merge

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
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import multiprocessing
import statistics
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import Tensor, nn

from m2n2_lightning.config import register_schema, steps_for
from m2n2_lightning.engine import EvolutionEngine
from m2n2_lightning.evaluator import Evaluator
from m2n2_lightning.params import FlatParams, flat_vector
from m2n2_lightning.specialists import SPECIALIST_CLASSES, train_specialists
from m2n2_lightning.strategies.base import build_strategy
from m2n2_lightning.strategies.operators import slerp

CONF_DIR = Path(__file__).resolve().parents[1] / "m2n2_lightning" / "conf"
BRUTE_FORCE = "slerp_brute_force"
STRATEGY_METHODS = (
    "m2n2", "cmaes", "cmaes_diagonal", "ga", "ga_no_crossover", "m2n2_no_crossover",
    "m2n2_no_split_point", "m2n2_no_matchmaker", "map_elites",
)  # fmt: skip
#: Methods that cannot start from given models.
SCRATCH_ONLY = ("cmaes", "cmaes_diagonal")
EXPERIMENT = {"digits": "digits_mlp", "mnist": "mnist_mlp"}
COLUMNS = ("method", "seed", "forward_passes", "best_train_acc", "test_acc", "wall_seconds")
#: Candidates scored at once by the brute-force search.
BRUTE_FORCE_CHUNK = 100

LABELS = {
    "m2n2": "M2N2",
    "cmaes": "CMA-ES (full C)",
    "cmaes_diagonal": "CMA-ES (separable, diagonal C)",
    "ga": "GA",
    "ga_no_crossover": "GA w/o crossover",
    "m2n2_no_crossover": "M2N2 w/o crossover",
    "m2n2_no_split_point": "M2N2 w/o split point",
    "m2n2_no_matchmaker": "M2N2 w/o matchmaker",
    "map_elites": "MAP-Elites",
    BRUTE_FORCE: "SLERP brute force",
}
#: The paper's test accuracy (docs/ALGORITHM.md; digits): from scratch at 50,000 and merging at 10,000 forward passes.
PAPER = {
    "scratch": {
        "m2n2": 0.87, "cmaes": 0.86, "m2n2_no_crossover": 0.77, "ga_no_crossover": 0.71, "ga": 0.68,
        "map_elites": 0.60,
    },
    "merge": {
        "m2n2": 0.685, "m2n2_no_matchmaker": 0.66, "map_elites": 0.62, "m2n2_no_split_point": 0.577,
        BRUTE_FORCE: 0.577, "ga": 0.52,
    },
}  # fmt: skip
PAPER_BUDGET = {"scratch": 50_000, "merge": 10_000}


@dataclass
class RunSpec:
    """Everything one (method, seed) run needs; picklable for worker processes."""

    method: str
    seed: int
    forward_passes: int
    eval_every: int
    device: str
    threads: int
    data: dict[str, Any]
    model: dict[str, Any]
    strategy: dict[str, Any] | None
    score_fn: str
    chunk_size: int | None
    init_models: list[Tensor] | None


def compose_config(method: str, seed: int, data: str, data_dir: str | None) -> Any:
    """The config `train.py` would build for this method, seed and data set."""
    overrides = [f"seed={seed}", f"experiment={EXPERIMENT[data]}"]
    if method != BRUTE_FORCE:
        overrides.append(f"strategy={method}")
    if data_dir is not None:
        overrides.append(f"data.data_dir={data_dir}")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


ACCURACIES = ("best_train_acc", "test_acc")


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    return (model(x).argmax(dim=-1) == y).float().mean().item()


class Recorder:
    """Rows of one run: the best member's accuracies when it changes, or every `eval_every` forward passes.

    When the best member changes but its two accuracies do not (a GA often swaps
    one best member for another that is as good), no row is added: the curve is
    a step function, so the row would repeat the one before it.
    """

    def __init__(self, spec: RunSpec, model: nn.Module, train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor]) -> None:
        self.spec, self.model, self.train, self.test = spec, model, train, test
        self.rows: list[dict[str, Any]] = []
        self.start = time.perf_counter()
        self._best: Tensor | None = None
        self._reported_tenths = 0

    def after_step(self, forward_passes: int, best: Tensor) -> None:
        """Record if the best member `best` [D] (already in the model) is due for evaluation."""
        every = self.spec.eval_every
        if every > 0:
            due = not self.rows or forward_passes // every > self.rows[-1]["forward_passes"] // every
        else:
            due = self._best is None or not torch.equal(best, self._best)
        done = forward_passes >= self.spec.forward_passes
        if due or done:
            self._best = best.clone()
            self.record(forward_passes, keep_repeats=every > 0 or done)
        tenths = 10 * forward_passes // self.spec.forward_passes
        if tenths > self._reported_tenths:
            self._reported_tenths = tenths
            self.report(forward_passes)

    def record(self, forward_passes: int, keep_repeats: bool = True) -> None:
        row = dict(
            method=self.spec.method,
            seed=self.spec.seed,
            forward_passes=forward_passes,
            best_train_acc=accuracy(self.model, *self.train),
            test_acc=accuracy(self.model, *self.test),
            wall_seconds=time.perf_counter() - self.start,
        )
        if self.rows and self.rows[-1]["forward_passes"] == forward_passes:
            self.rows.pop()
        elif self.rows and not keep_repeats and all(self.rows[-1][key] == row[key] for key in ACCURACIES):
            return
        self.rows.append(row)

    def report(self, forward_passes: int) -> None:
        last, seconds = self.rows[-1], time.perf_counter() - self.start
        print(
            f"{self.spec.method} seed {self.spec.seed}: {forward_passes / self.spec.forward_passes:4.0%} "
            f"{forward_passes}/{self.spec.forward_passes} forward passes, best member train "
            f"{last['best_train_acc']:.3f} test {last['test_acc']:.3f}, {forward_passes / seconds:.0f}/s",
            flush=True,
        )


def run(spec: RunSpec) -> list[dict[str, Any]]:
    """One method, one seed: the recorded rows."""
    torch.set_num_threads(spec.threads)
    device = torch.device(spec.device)
    data = instantiate(spec.data)
    model = instantiate(spec.model, in_features=spec.model.get("in_features") or data.input_dim).to(device)
    train, test = (tuple(t.to(device) for t in pair) for pair in (data.train_tensors, data.test_tensors))
    if spec.method == BRUTE_FORCE:
        return brute_force(spec, model, train, test)
    flat = FlatParams(model)
    # The strategy config is a factory (`_partial_: true`): called with the model's D, as train.py does.
    strategy = build_strategy(instantiate(spec.strategy), flat.num_params, spec.init_models, flat.layout).to(device)
    engine = EvolutionEngine(model, strategy, spec.score_fn, spec.chunk_size, flat=flat)
    engine.attach(*train)
    recorder = Recorder(spec, model, train, test)
    engine.start()
    recorder.after_step(0, strategy.best_params())
    try:
        for _ in range(steps_for(spec.forward_passes, strategy.candidates_per_step)):
            engine.step()
            recorder.after_step(strategy.forward_passes, strategy.best_params())
    except KeyboardInterrupt:
        print(f"{spec.method} seed {spec.seed}: stopped at {strategy.forward_passes} forward passes", flush=True)
        engine.load_best()
        recorder.record(strategy.forward_passes)
        raise RunInterrupted(recorder.rows) from None
    return recorder.rows


class RunInterrupted(Exception):
    """Ctrl-C during a run; carries the rows recorded up to then (the last at the stop)."""

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        super().__init__(f"interrupted after {len(rows)} rows")
        self.rows = rows


@torch.no_grad()
def brute_force(spec: RunSpec, model: nn.Module, train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor]) -> list[dict[str, Any]]:
    """The best of `forward_passes` SLERP weights w = linspace(0, 1) between the two
    specialists, by training accuracy (the first on ties); no split point."""
    if spec.init_models is None or len(spec.init_models) != 2:
        raise ValueError(f"{BRUTE_FORCE} merges two given models (--setting merge)")
    evaluator = Evaluator(model, *train, spec.score_fn, spec.chunk_size)
    a, b = (m.to(evaluator.inputs.device) for m in spec.init_models)
    weights = torch.linspace(0, 1, spec.forward_passes, device=a.device)
    recorder = Recorder(spec, model, train, test)
    best, best_score, done = a, -math.inf, 0
    evaluator.flat.load_into(model, best)
    recorder.after_step(done, best)  # w = 0, the first specialist (scored again in the first chunk)
    for chunk in weights.split(BRUTE_FORCE_CHUNK):
        candidates = slerp(a.expand(len(chunk), -1), b.expand(len(chunk), -1), chunk.unsqueeze(1))
        scores = evaluator(candidates).mean(dim=1)
        top = int(scores.argmax())
        if scores[top].item() > best_score:
            best, best_score = candidates[top], scores[top].item()
        done += len(chunk)
        evaluator.flat.load_into(model, best)
        recorder.after_step(done, best)
    return recorder.rows


def parse_seeds(text: str) -> list[int]:
    """'3' -> seeds 0, 1, 2; '0,4,7' -> those seeds."""
    if "," in text:
        return [int(s) for s in text.split(",") if s.strip()]
    return list(range(int(text)))


def build_specs(args: argparse.Namespace) -> list[RunSpec]:
    """Compose each run's config; in the merge setting train the specialists once per seed."""
    register_schema()
    specs = []
    for seed in args.seeds:
        init_models = None
        for method in args.methods:
            cfg = compose_config(method, seed, args.data, args.data_dir)
            if args.setting == "merge" and init_models is None:
                init_models = specialist_vectors(cfg, seed)
            specs.append(
                RunSpec(
                    method=method,
                    seed=seed,
                    forward_passes=args.forward_passes,
                    eval_every=args.eval_every,
                    device=args.device,
                    threads=args.threads,
                    data=OmegaConf.to_container(cfg.data, resolve=True),
                    model=OmegaConf.to_container(cfg.model, resolve=True),
                    strategy=None if method == BRUTE_FORCE else OmegaConf.to_container(cfg.strategy, resolve=True),
                    score_fn=cfg.module.score_fn,
                    chunk_size=cfg.module.chunk_size,
                    init_models=init_models,
                )
            )
    return specs


def specialist_vectors(cfg: Any, seed: int) -> list[Tensor]:
    """Train the specialists for this seed (Lightning + Adam) and report their test accuracy."""
    data = instantiate(cfg.data)
    specialists = train_specialists(data, seed=seed, hidden=cfg.model.hidden)
    shown = ", ".join(
        f"digits {classes[0]}-{classes[-1]}: {accuracy(model, *data.test_tensors):.3f}"
        for classes, model in zip(SPECIALIST_CLASSES, specialists)
    )
    print(f"specialists of seed {seed} (test accuracy on all digits): {shown}", flush=True)
    return [flat_vector(model) for model in specialists]


def run_all(specs: Sequence[RunSpec], jobs: int, on_done: Callable[[list[dict[str, Any]]], None]) -> None:
    """Run the specs, `jobs` processes at a time (in this process when 1). With one job,
    Ctrl-C ends the current run, keeps its rows so far and skips the rest."""
    if jobs == 1:
        for spec in specs:
            try:
                on_done(run(spec))
            except RunInterrupted as stop:
                on_done(stop.rows)
                return
        return
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=quiet) as pool:
        for future in as_completed([pool.submit(run, spec) for spec in specs]):
            on_done(future.result())


def quiet() -> None:
    """Silence Lightning's per-Trainer banners and warnings about data loader workers."""
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")


# --------------------------------------------------------------------- outputs
def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def read_csv(path: Path) -> list[dict[str, Any]]:
    types = {"method": str, "seed": int, "forward_passes": int}
    with path.open() as f:
        return [{key: types.get(key, float)(value) for key, value in row.items()} for row in csv.DictReader(f)]


def runs_by_method(rows: Sequence[dict[str, Any]]) -> dict[str, list[list[dict[str, Any]]]]:
    """Rows grouped by method, then by seed (each run's rows in forward-pass order)."""
    runs: dict[str, dict[int, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        runs[row["method"]][row["seed"]].append(row)
    return {
        method: [sorted(r, key=lambda row: row["forward_passes"]) for _, r in sorted(seeds.items())]
        for method, seeds in runs.items()
    }


def mean_and_error(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (0 for one value)."""
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0


def curve(run_rows: Sequence[dict[str, Any]], grid: Sequence[int]) -> list[float]:
    """The run's test accuracy at each grid point: the last evaluation at or before it."""
    values, i = [], 0
    for point in grid:
        while i + 1 < len(run_rows) and run_rows[i + 1]["forward_passes"] <= point:
            i += 1
        values.append(run_rows[i]["test_acc"])
    return values


def paper_label(method: str, setting: str) -> str:
    paper = PAPER[setting].get(method)
    return LABELS.get(method, method) + (f" (paper {paper:.1%})" if paper is not None else "")


def save_figure(runs: dict[str, list[list[dict[str, Any]]]], setting: str, title: str, path: Path) -> None:
    """Test accuracy against forward passes: mean over seeds and a standard-error band per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5))
    for method, method_runs in runs.items():
        end = min(r[-1]["forward_passes"] for r in method_runs)
        grid = [round(end * i / 200) for i in range(201)]
        if method == BRUTE_FORCE:  # a sweep over w, not a search: only its end point means something
            grid = [0, end]
            method_runs = [[r[-1]] for r in method_runs]
        curves = [curve(r, grid) for r in method_runs]
        stats = [mean_and_error(values) for values in zip(*curves)]
        mean = [m for m, _ in stats]
        style = "--" if method == BRUTE_FORCE else "-"
        line = axes.plot(grid, mean, style, label=f"{paper_label(method, setting)}, n={len(method_runs)}")[0]
        if len(method_runs) > 1:
            low = [m - e for m, e in stats]
            high = [m + e for m, e in stats]
            axes.fill_between(grid, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    axes.set_xlabel("forward passes")
    axes.set_ylabel("test accuracy of the best member")
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def table(runs: dict[str, list[list[dict[str, Any]]]], setting: str) -> str:
    """Markdown: final accuracies (mean ± standard error over seeds, when more than one), time, rate, the paper's number."""
    budget = PAPER_BUDGET[setting]
    lines = [
        f"| method | seeds | forward passes | test accuracy | best train accuracy | wall s per run "
        f"| forward passes / s | paper ({budget:,} forward passes) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method, method_runs in runs.items():
        final = [r[-1] for r in method_runs]
        test, test_se = mean_and_error([row["test_acc"] for row in final])
        train, train_se = mean_and_error([row["best_train_acc"] for row in final])
        wall = statistics.fmean(row["wall_seconds"] for row in final)
        rate = statistics.fmean(row["forward_passes"] / row["wall_seconds"] for row in final)
        passes = sorted({row["forward_passes"] for row in final})
        paper = PAPER[setting].get(method)
        error = (lambda se: f" ± {se:.3f}") if len(final) > 1 else (lambda se: "")
        lines.append(
            f"| {LABELS.get(method, method)} | {len(final)} | {'/'.join(f'{p:,}' for p in passes)} "
            f"| {test:.3f}{error(test_se)} | {train:.3f}{error(train_se)} | {wall:.1f} | {rate:.0f} "
            f"| {'≈ ' + format(paper, '.1%') if paper is not None else '—'} |"
        )
    return "\n".join(lines) + "\n"


def write_outputs(rows: Sequence[dict[str, Any]], args: argparse.Namespace) -> None:
    """results.csv, figure.png and table.md in `args.out`."""
    write_csv(rows, args.out / "results.csv")
    runs = runs_by_method(rows)
    order = [m for m in args.methods if m in runs] + [m for m in runs if m not in args.methods]
    runs = {method: runs[method] for method in order}
    title = {"scratch": "From scratch", "merge": "Merging two pre-trained specialists"}[args.setting]
    title = f"{title} ({args.data}); in brackets: the paper at {PAPER_BUDGET[args.setting]:,} forward passes"
    save_figure(runs, args.setting, title, args.out / "figure.png")
    (args.out / "table.md").write_text(table(runs, args.setting))


# ------------------------------------------------------------------------ main
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="m2n2,ga", help="comma list of " + ", ".join(STRATEGY_METHODS + (BRUTE_FORCE,)))
    parser.add_argument("--seeds", type=parse_seeds, default=parse_seeds("3"), help="N (seeds 0..N-1) or a comma list")
    parser.add_argument("--forward-passes", type=int, default=10_000, help="budget per run")
    parser.add_argument("--setting", choices=("scratch", "merge"), default="scratch")
    parser.add_argument("--data", choices=tuple(EXPERIMENT), default="digits")
    parser.add_argument("--data-dir", default=None, help="MNIST folder (default: the data config's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--eval-every", type=int, default=0, help="evaluate every N forward passes (0: when the best changes)")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel processes")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/compare"))
    parser.add_argument("--from-csv", type=Path, nargs="+", help="redraw figure and table from these results.csv")
    args = parser.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    known = STRATEGY_METHODS + ((BRUTE_FORCE,) if args.setting == "merge" else ())
    unknown = [m for m in args.methods if m not in known]
    if unknown:
        parser.error(f"unknown method(s) {unknown} for --setting {args.setting}; choose from {', '.join(known)}")
    if args.setting == "merge" and set(args.methods) & set(SCRATCH_ONLY):
        parser.error(f"{', '.join(SCRATCH_ONLY)} cannot start from given models: leave them out of --setting merge")
    if args.forward_passes < 1 or args.jobs < 1 or args.threads < 1 or args.eval_every < 0 or not args.seeds:
        parser.error("--forward-passes, --jobs, --threads and --seeds must be positive, --eval-every >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> Path:
    """Run (or with --from-csv, only redraw) and write the three outputs; returns the output folder."""
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.from_csv:
        write_outputs([row for path in args.from_csv for row in read_csv(path)], args)
        return args.out
    quiet()
    torch.set_num_threads(args.threads)
    specs = build_specs(args)
    print(f"{len(specs)} runs: {', '.join(args.methods)} x seeds {args.seeds}, {args.forward_passes:,} forward passes, "
          f"{args.setting}, {args.data}, {args.device}, {args.jobs} job(s)", flush=True)
    rows: list[dict[str, Any]] = []

    def on_done(run_rows: list[dict[str, Any]]) -> None:
        rows.extend(run_rows)
        write_csv(rows, args.out / "results.csv")  # partial results survive an interruption

    run_all(specs, args.jobs, on_done)
    write_outputs(rows, args)
    print(f"\n{(args.out / 'table.md').read_text()}\nresults.csv, figure.png, table.md in {args.out}")
    return args.out


if __name__ == "__main__":
    main()
