"""The outputs of benchmarks/compare.py --setting lm_merge*: results.csv, curves.csv, table.md and three figures.

table.md is laid out like the paper's Table 1 (each skill's test accuracy and their mean,
here also the copy skill that no fitness term scores), methods ranked by the mean;
figure.png shows the same numbers as bars with standard errors over seeds; accuracy.png the
best member's test accuracy against evaluations (a baseline without a search, such as one
of mergekit's grids, is a point at the evaluations it spent); curves.png the population's
niche coverage and fitness entropy against evaluations (the paper's figure 5).
"""

from __future__ import annotations

import csv
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from compare_lm import LM_LABELS
from compare_outputs import (
    even_grid,
    finish_figure,
    mean_and_error,
    plot_runs,
    runs_by_method,
    write_csv,
)
from mergekit_grid import BEST as MERGEKIT_BEST

from m2n2_lightning.lm.merge import write_curve

#: curves.png's panels: (curve key, axis label).
PANELS = (("coverage", "coverage (training prompts solved by a member)"), ("fitness_entropy", "fitness entropy (nats)"))


def read_curves(path: Path) -> list[dict[str, Any]]:
    """The rows of a curves.csv, typed (empty cells: None)."""
    with path.open() as f:
        return [{k: v if k == "method" else int(v) if k in ("seed", "forward_passes") else float(v) if v else None
                 for k, v in row.items()} for row in csv.DictReader(f)]


def skill_columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The per-skill test columns (`<skill>_test`), in the order of the rows' keys."""
    return [key for key in dict.fromkeys(k for row in rows for k in row) if key.endswith("_test")]


def final_stats(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per method, ranked by the mean test accuracy of the two skills: mean and standard error of every
    accuracy column over the seeds' final rows, the seeds, evaluations and mean wall time."""
    columns = ["test_acc", "best_train_acc", *skill_columns(rows)]
    stats = {}
    for method, runs in runs_by_method(rows).items():
        final = [run[-1] for run in runs]
        stats[method] = {column: mean_and_error([row[column] for row in final]) for column in columns}
        stats[method].update(seeds=len(final), passes=sorted({row["forward_passes"] for row in final}),
                             wall=statistics.fmean(row["wall_seconds"] for row in final))
    return dict(sorted(stats.items(), key=lambda item: -item[1]["test_acc"][0]))


def lm_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown like the paper's Table 1: each skill's test accuracy, the mean of the trained skills (± s.e.)."""
    skills = skill_columns(rows)
    stats = final_stats(rows)
    head = [f"{name.removesuffix('_test')} test" for name in skills]
    lines = [
        "| rank | method | seeds | evaluations | " + " | ".join(head)
        + " | mean of the trained skills (± s.e.) | train exact match | wall s per run |",
        "|---" * (len(head) + 7) + "|",
    ]
    for rank, (method, s) in enumerate(stats.items(), 1):
        cells = [f"{s[name][0]:.3f}" for name in skills]
        mean, error = s["test_acc"]
        lines.append(
            f"| {rank} | {LM_LABELS.get(method, method)} | {s['seeds']} | {'/'.join(f'{p:,}' for p in s['passes'])} | "
            + " | ".join(cells) + f" | {mean:.3f} ± {error:.3f} | {s['best_train_acc'][0]:.3f} | {s['wall']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_bars(rows: Sequence[dict[str, Any]], title: str, path: Path) -> None:
    """Grouped bars: each skill's test accuracy and the two skills' mean per method, standard-error whiskers."""
    plt = _pyplot()
    stats = final_stats(rows)
    columns = [*skill_columns(rows), "test_acc"]
    width = 0.8 / len(columns)
    figure, axes = plt.subplots(figsize=(max(8, 1.2 * len(stats)), 5))
    for i, column in enumerate(columns):
        xs = [j + (i - (len(columns) - 1) / 2) * width for j in range(len(stats))]
        means = [s[column][0] for s in stats.values()]
        errors = [s[column][1] for s in stats.values()]
        label = "mean of the trained skills" if column == "test_acc" else f"{column.removesuffix('_test')} test"
        axes.bar(xs, means, width, yerr=errors, capsize=2, label=label)
    axes.set_xticks(range(len(stats)))
    axes.set_xticklabels([LM_LABELS.get(m, m) for m in stats], rotation=30, ha="right", fontsize=7)
    axes.set_ylabel("test exact match of the best member")
    axes.set_ylim(0, 1.15)
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3, axis="y")
    axes.legend(fontsize=8, loc="upper center", ncol=len(columns))
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def save_curves(curves: Sequence[dict[str, Any]], title: str, path: Path) -> None:
    """Coverage and fitness entropy of the population against evaluations: mean over seeds, standard-error band."""
    plt = _pyplot()
    figure, panels = plt.subplots(1, len(PANELS), figsize=(12, 4.5))
    for (key, label), axes in zip(PANELS, panels):
        for method, runs in runs_by_method([row for row in curves if row.get(key) is not None]).items():
            plot_runs(axes, runs, even_grid(min(run[-1]["forward_passes"] for run in runs)),
                      f"{LM_LABELS.get(method, method)}, n={len(runs)}", key)
        axes.set_xlabel("evaluations")
        axes.set_ylabel(label)
        axes.grid(alpha=0.3)
    panels[0].legend(fontsize=7, loc="lower right")
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def save_accuracy(rows: Sequence[dict[str, Any]], title: str, path: Path) -> None:
    """The best member's test accuracy (mean of the trained skills) against evaluations, on a log axis: a line per
    search and for mergekit's whole grid (mean over seeds; the standard errors are in table.md), a point with
    standard-error whiskers per baseline that spends its evaluations at once and per mergekit method's grid."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(12, 5.5))
    axes.set_prop_cycle(color=plt.get_cmap("tab20").colors)  # 20 colours: one per method of a full comparison
    for method, runs in runs_by_method(rows).items():
        label = f"{LM_LABELS.get(method, method)}, n={len(runs)}"
        if all(len(run) == 1 for run in runs) or (method.startswith("mergekit_") and method != MERGEKIT_BEST):
            mean, error = mean_and_error([run[-1]["test_acc"] for run in runs])
            passes = max(1.0, statistics.fmean(run[-1]["forward_passes"] for run in runs))  # the seeds at 1 on the log axis
            axes.errorbar([passes], [mean], yerr=[error], fmt="o", capsize=3, label=label)
            continue
        grid = sorted({1, *even_grid(min(run[-1]["forward_passes"] for run in runs))} - {0})
        plot_runs(axes, runs, grid, label, band=False)
    axes.set_xscale("log")
    finish_figure(figure, axes, path, "evaluations (candidates scored on every training prompt; log scale)",
                  "test exact match of the best member (mean of the trained skills)", title, legend_size=7)


#: Each setting's figure titles: what is merged.
MERGED = {"lm_merge": "two fine-tuned language models (add, rev)", "lm_merge4": "four fine-tuned language models"}


def write_lm_outputs(rows: Sequence[dict[str, Any]], curves: Sequence[dict[str, Any]], out: Path,
                     setting: str = "lm_merge") -> None:
    """results.csv, curves.csv, table.md, figure.png, accuracy.png and curves.png in `out`."""
    write_csv(rows, out / "results.csv")
    write_curve(curves, out / "curves.csv", ("method", "seed"))
    (out / "table.md").write_text(lm_table(rows))
    merged = MERGED.get(setting, setting)
    save_bars(rows, f"Merging {merged}: test accuracy, mean ± s.e. over seeds", out / "figure.png")
    save_accuracy(rows, f"Merging {merged}: the best member's test accuracy against evaluations", out / "accuracy.png")
    if curves:
        save_curves(curves, "Population of each search: coverage and fitness entropy on the training prompts",
                    out / "curves.png")
