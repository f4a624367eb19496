"""`train.py experiment=lm_merge` end to end, in subprocesses: on tiny seed models (about 7 s), a resume and the reduced
preset built from scratch (slow: 20-30 s each). (`compare.py --setting lm_merge` runs end to end in test_compare.py.)"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_lm_merge import tiny  # noqa: F401  (the tiny seed models, a module fixture)
from transformers import AutoModelForCausalLM

from m2n2_lightning.lm.tasks import accuracy, skill_dataset

ROOT = Path(__file__).resolve().parents[1]


def train_lm(run_dir: Path, *overrides: str, env: dict[str, str] | None = None) -> dict:
    """Run train.py experiment=lm_merge in `run_dir`; its summary.json."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "experiment=lm_merge", f"hydra.run.dir={run_dir}",
         "trainer.enable_progress_bar=false", *overrides],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((run_dir / "summary.json").read_text())


def tiny_seeds(tiny: Path) -> list[str]:  # noqa: F811
    return [f"merge.models=['{tiny / 'skill_a'}','{tiny / 'skill_b'}']", f"merge.base_model='{tiny / 'base'}'"]


def curve_rows(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def check_outputs(run_dir: Path, summary: dict, evaluations: int) -> None:
    """summary.json against the saved merge, re-scored here; the curve has a row per step and one at the start."""
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "best_model").eval()
    assert set(summary["test"]) == {"add", "rev", "copy"}
    for name, acc in summary["test"].items():
        # a fraction of 200 prompts: the summary's float64 and accuracy()'s float32 mean agree to float32 rounding
        assert acc == pytest.approx(accuracy(merged, skill_dataset((name,), "test")), rel=1e-6, abs=1e-7)
    assert summary["test_acc"] == pytest.approx((summary["test"]["add"] + summary["test"]["rev"]) / 2)
    assert summary["best_train_acc"] == pytest.approx(accuracy(merged, skill_dataset(("add", "rev"), "train")),
                                                      rel=1e-6, abs=1e-7)
    assert summary["forward_passes"] == evaluations and summary["resources"] == 200
    assert summary["strategy"] == "m2n2_merge" and summary["strategy_settings"]["archive"] == "CoefficientArchive"
    rows = curve_rows(run_dir / "curves.csv")
    assert [int(r["forward_passes"]) for r in rows] == list(range(evaluations + 1))
    assert all(0 <= float(r["coverage"]) <= 1 for r in rows)
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()


def test_train_py_merges_given_directories(tiny: Path, tmp_path: Path) -> None:  # noqa: F811
    summary = train_lm(tmp_path, *tiny_seeds(tiny), "forward_passes=20", "checkpoint_every=10")
    check_outputs(tmp_path, summary, 20)


@pytest.mark.slow
def test_train_py_resumes_a_merge_exactly(tiny: Path, tmp_path: Path) -> None:  # noqa: F811
    whole = train_lm(tmp_path / "whole", *tiny_seeds(tiny), "forward_passes=16")
    train_lm(tmp_path / "half", *tiny_seeds(tiny), "forward_passes=8")
    resumed = train_lm(tmp_path / "resumed", *tiny_seeds(tiny), "forward_passes=16",
                       f"ckpt_path={tmp_path / 'half' / 'checkpoints' / 'last.ckpt'}")
    assert resumed["test"] == whole["test"] and resumed["best_train_acc"] == whole["best_train_acc"]
    keys = ("forward_passes", "coverage", "fitness_entropy", "best_score")
    assert [[r[k] for k in keys] for r in curve_rows(tmp_path / "resumed" / "curves.csv")] == [
        [r[k] for k in keys] for r in curve_rows(tmp_path / "whole" / "curves.csv")
    ]


@pytest.mark.slow
def test_train_py_builds_the_reduced_seeds_and_merges(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    summary = train_lm(run_dir, "lm.reduced=true", "forward_passes=30", env={"M2N2_LM_CACHE": str(tmp_path / "cache")})
    check_outputs(run_dir, summary, 30)
    assert (tmp_path / "cache" / "reduced_seed0" / "build.json").is_file()
