"""A Hydra callback that writes one table of a sweep's runs when the sweep ends."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

#: The summary.json keys the table shows, in order (others are left out).
COLUMNS = ("strategy", "experiment", "seed", "forward_passes", "best_train_acc", "test_acc",
           "wall_seconds", "forward_passes_per_second", "output_dir")


class SweepSummary(Callback):
    """On multirun end: `summary.csv` and `summary.md` in the sweep directory, a row per run's summary.json
    (with the run's overrides), in job order."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = []
        for path in sorted(sweep_dir.glob("*/summary.json"), key=lambda p: (len(p.parent.name), p.parent.name)):
            summary = json.loads(path.read_text())
            overrides = path.parent / ".hydra" / "overrides.yaml"
            row = {"job": path.parent.name, "overrides": " ".join(_overrides(overrides))}
            row.update({key: summary.get(key) for key in COLUMNS})
            rows.append(row)
        if not rows:
            return
        with (sweep_dir / "summary.csv").open("w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        header = [key for key in rows[0] if key != "output_dir"]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in rows:
            lines.append("| " + " | ".join(_cell(row[key]) for key in header) + " |")
        (sweep_dir / "summary.md").write_text("\n".join(lines) + "\n")


def _overrides(path: Path) -> list[str]:
    if not path.exists():
        return []
    return [line[2:].strip() for line in path.read_text().splitlines() if line.startswith("- ")]


def _cell(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)
