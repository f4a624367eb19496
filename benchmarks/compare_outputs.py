"""The outputs of benchmarks/compare.py: results.csv, figure.png (test accuracy against forward passes) and table.md.

The labels of the methods and the paper's numbers (docs/ALGORITHM.md, the digits) live
here too, since the figure and the table are what shows them.
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

BRUTE_FORCE = "slerp_brute_force"
COLUMNS = ("method", "seed", "forward_passes", "best_train_acc", "test_acc", "wall_seconds")

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


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """The rows under COLUMNS, then any further keys the rows have (the LM setting's per-skill accuracies)."""
    extra = [key for key in dict.fromkeys(k for row in rows for k in row) if key not in COLUMNS]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*COLUMNS, *extra])
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


def curve(run_rows: Sequence[dict[str, Any]], grid: Sequence[int], key: str = "test_acc") -> list[float]:
    """The run's `key` at each grid point: the value of the last row at or before it."""
    values, i = [], 0
    for point in grid:
        while i + 1 < len(run_rows) and run_rows[i + 1]["forward_passes"] <= point:
            i += 1
        values.append(run_rows[i][key])
    return values


def paper_numbers(setting: str, data: str) -> dict[str, float]:
    """The paper's test accuracies for this setting: digits only (it has no MNIST runs)."""
    return PAPER[setting] if data == "digits" else {}


def paper_label(method: str, paper_numbers: dict[str, float]) -> str:
    paper = paper_numbers.get(method)
    return LABELS.get(method, method) + (f" (paper {paper:.1%})" if paper is not None else "")


def even_grid(end: int, points: int = 200) -> list[int]:
    """`points` + 1 evenly spaced forward-pass counts from 0 to `end`."""
    return [round(end * i / points) for i in range(points + 1)]


def plot_runs(axes: Any, runs: Sequence[Sequence[dict[str, Any]]], grid: Sequence[int], label: str, key: str = "test_acc",
              style: str = "-", band: bool = True) -> None:
    """The runs' mean `key` on `grid` as a line, with a standard-error band where there are several runs."""
    stats = [mean_and_error(values) for values in zip(*(curve(run, grid, key) for run in runs))]
    line = axes.plot(grid, [m for m, _ in stats], style, label=label)[0]
    if band and len(runs) > 1:
        axes.fill_between(grid, [m - e for m, e in stats], [m + e for m, e in stats], color=line.get_color(),
                          alpha=0.2, linewidth=0)


def finish_figure(figure: Any, axes: Any, path: Path, xlabel: str, ylabel: str, title: str, legend_size: int = 8) -> None:
    """Labels, grid and legend of a one-panel figure, saved to `path` and closed."""
    import matplotlib.pyplot as plt

    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=legend_size, loc="lower right" if legend_size >= 8 else "center left", bbox_to_anchor=None
                if legend_size >= 8 else (1.01, 0.5))
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def save_figure(runs: dict[str, list[list[dict[str, Any]]]], paper: dict[str, float], title: str, path: Path) -> None:
    """Test accuracy against forward passes: mean over seeds and a standard-error band per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5))
    for method, method_runs in runs.items():
        end = min(r[-1]["forward_passes"] for r in method_runs)
        grid = even_grid(end)
        if method == BRUTE_FORCE:  # a sweep over w, not a search: only its end point means something
            grid = [0, end]
            method_runs = [[r[-1]] for r in method_runs]
        plot_runs(axes, method_runs, grid, f"{paper_label(method, paper)}, n={len(method_runs)}",
                  style="--" if method == BRUTE_FORCE else "-")
    finish_figure(figure, axes, path, "forward passes", "test accuracy of the best member", title)


def table(runs: dict[str, list[list[dict[str, Any]]]], setting: str, numbers: dict[str, float]) -> str:
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
        paper = numbers.get(method)
        error = (lambda se: f" ± {se:.3f}") if len(final) > 1 else (lambda se: "")
        lines.append(
            f"| {LABELS.get(method, method)} | {len(final)} | {'/'.join(f'{p:,}' for p in passes)} "
            f"| {test:.3f}{error(test_se)} | {train:.3f}{error(train_se)} | {wall:.1f} | {rate:.0f} "
            f"| {paper_cell(paper, budget, passes)} |"
        )
    note = ("± is the standard error of the mean over the seeds of a row (none with one seed). The paper's numbers "
            f"are its test accuracies at {budget:,} forward passes; a row of another budget says so in that column.")
    return "\n".join(lines) + "\n\n" + note + "\n"


def paper_cell(paper: float | None, budget: int, passes: list[int]) -> str:
    """The paper's number, marked when this row ran another budget (it is then not a like-for-like comparison)."""
    if paper is None:
        return "—"
    if passes == [budget]:
        return f"≈ {paper:.1%}"
    return f"≈ {paper:.1%} at {budget:,}, not this row's {'/'.join(f'{p:,}' for p in passes)}"


def write_outputs(rows: Sequence[dict[str, Any]], args: argparse.Namespace) -> None:
    """results.csv, figure.png and table.md in `args.out`."""
    write_csv(rows, args.out / "results.csv")
    runs = runs_by_method(rows)
    order = [m for m in args.methods if m in runs] + [m for m in runs if m not in args.methods]
    runs = {method: runs[method] for method in order}
    title = {"scratch": "From scratch", "merge": "Merging two pre-trained specialists"}[args.setting]
    paper = paper_numbers(args.setting, args.data)
    if paper:
        title = f"{title} ({args.data}); in brackets: the paper at {PAPER_BUDGET[args.setting]:,} forward passes"
    else:
        title = f"{title} ({args.data})"
    save_figure(runs, paper, title, args.out / "figure.png")
    (args.out / "table.md").write_text(table(runs, args.setting, paper))

