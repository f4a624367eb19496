"""A Hydra callback that keeps one table of a sweep's runs: rewritten as each job ends (failed ones marked with
their error), so a sweep that stops at a failure still leaves the table of the jobs that finished."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

#: The summary.json keys the table shows, in order (others are left out).
COLUMNS = ("strategy", "experiment", "seed", "forward_passes", "best_train_acc", "test_acc",
           "wall_seconds", "forward_passes_per_second", "output_dir")
#: What a failed job leaves in its directory: the error's message (the table's status column shows its first line).
FAILED_NAME = "failed.txt"


class SweepSummary(Callback):
    """`summary.csv` and `summary.md` in the sweep directory: a row per job in job order, with its overrides,
    its status (`ok`, `failed: <error>`, or `not finished`) and its summary.json entries."""

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        if job_return.status == JobStatus.FAILED:
            error = job_return._return_value
            (Path(config.hydra.runtime.output_dir) / FAILED_NAME).write_text(f"{type(error).__name__}: {error}\n")
        write_table(Path(config.hydra.sweep.dir))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        write_table(Path(config.hydra.sweep.dir))


def write_table(sweep_dir: Path) -> None:
    """Write summary.csv and summary.md of every job directory of `sweep_dir` (nothing when there is none)."""
    jobs = [path.parent.parent for path in sweep_dir.glob("*/.hydra/overrides.yaml")]
    rows = [job_row(job) for job in sorted(jobs, key=lambda p: (len(p.name), p.name))]
    if not rows:
        return
    header = list(rows[0])
    write_atomically(sweep_dir / "summary.csv", lambda file: _csv(file, header, rows))
    shown = [key for key in header if key != "output_dir"]
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(_cell(row[key]) for key in shown) + " |" for row in rows]
    write_atomically(sweep_dir / "summary.md", lambda file: file.write("\n".join(lines) + "\n"))


def job_row(job: Path) -> dict[str, Any]:
    """One job's row: its name, overrides, status and summary.json entries."""
    summary_path, failed = job / "summary.json", job / FAILED_NAME
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    if failed.exists():
        status = "failed: " + (failed.read_text().strip().splitlines() or [""])[0]
    else:
        status = "ok" if summary else "not finished"
    row = {"job": job.name, "overrides": " ".join(_overrides(job / ".hydra" / "overrides.yaml")), "status": status}
    row.update({key: summary.get(key) for key in COLUMNS})
    return row


def write_atomically(path: Path, write: Any) -> None:
    """Write through a temporary file renamed over `path` (jobs of a parallel launcher may write at once)."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with temporary.open("w", newline="") as file:
        write(file)
    os.replace(temporary, path)


def _csv(file: Any, header: list[str], rows: list[dict[str, Any]]) -> None:
    writer = csv.DictWriter(file, fieldnames=header)
    writer.writeheader()
    writer.writerows(rows)


def _overrides(path: Path) -> list[str]:
    if not path.exists():
        return []
    return [line[2:].strip() for line in path.read_text().splitlines() if line.startswith("- ")]


def _cell(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.4f}" if isinstance(value, float) else str(value).replace("|", "\\|")
