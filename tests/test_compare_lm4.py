"""compare.py --setting lm_merge4 end to end at CI size: the reduced four-skill seeds built from scratch, M2N2 in
task-vector space and mergekit's grid, tens of evaluations (issue #22's CI check)."""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKILLS = ("add", "rev", "sort", "shift")


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_reduced_four_skill_comparison(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("M2N2_LM_CACHE", str(tmp_path / "cache"))
    spec = importlib.util.spec_from_file_location("compare", ROOT / "benchmarks" / "compare.py")
    compare = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "compare", compare)
    spec.loader.exec_module(compare)
    out = compare.main(["--setting", "lm_merge4", "--methods", "m2n2_task_vectors,mergekit", "--seeds", "0,",
                        "--forward-passes", "20", "--eval-every", "10", "--override", "lm.reduced=true",
                        "--out", str(tmp_path / "out")])
    assert (tmp_path / "cache" / "reduced4_seed0" / "build.json").is_file()
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    searched = [r for r in rows if r["method"] == "m2n2_task_vectors"]
    assert [int(r["forward_passes"]) for r in searched] == [0, 10, 20]
    import mergekit_grid

    grid = mergekit_grid.grid(4)
    best = [r for r in rows if r["method"] == mergekit_grid.BEST]
    assert int(best[-1]["forward_passes"]) == len(grid)  # the whole grid, counted in evaluations
    for method in {point.method for point in grid}:
        runs = [r for r in rows if r["method"] == f"mergekit_{method}"]
        assert int(runs[-1]["forward_passes"]) == sum(point.method == method for point in grid)
    for r in rows:  # the headline is the mean of the four trained skills; copy is reported beside them
        assert float(r["test_acc"]) == pytest.approx(sum(float(r[f"{s}_test"]) for s in SKILLS) / 4)
        assert 0 <= float(r["copy_test"]) <= 1
    header = (out / "table.md").read_text().splitlines()[0]
    assert "| add test | rev test | sort test | shift test | copy test | mean of the trained skills" in header
    assert all((out / name).stat().st_size > 10_000 for name in ("figure.png", "accuracy.png", "curves.png"))
