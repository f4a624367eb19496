"""benchmarks/compare.py on a tiny budget: the three outputs, their columns and rows."""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from test_lm_merge import tiny  # noqa: F401  (the tiny seed models, a module fixture)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compare():
    """benchmarks/compare.py as a module (it puts benchmarks/ on sys.path for its compare_* modules)."""
    spec = importlib.util.spec_from_file_location("compare", ROOT / "benchmarks" / "compare.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["compare"] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules["compare"]


@pytest.fixture(scope="module")
def runs(compare):
    """benchmarks/compare_runs.py: the runs of the scratch and merge settings."""
    import compare_runs

    return compare_runs


pytestmark = pytest.mark.usefixtures("one_thread")  # compare.main sets the thread count: restored afterwards


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == ("method", "seed", "forward_passes", "best_train_acc", "test_acc", "wall_seconds")
        return list(reader)


def table_rows(path: Path) -> list[list[str]]:
    table, note = path.read_text().strip().split("\n\n")
    lines = table.splitlines()
    assert lines[0].startswith("| method | seeds | forward passes | test accuracy |")
    assert note.startswith("± is the standard error of the mean over the seeds")
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


def test_scratch_outputs(compare, tmp_path: Path) -> None:
    out = compare.main(["--methods", "m2n2,ga", "--seeds", "1", "--forward-passes", "200", "--out", str(tmp_path)])
    rows = read_rows(out / "results.csv")
    for method in ("m2n2", "ga"):
        mine = [r for r in rows if r["method"] == method]
        passes = [int(r["forward_passes"]) for r in mine]
        assert passes[0] == 0 and passes[-1] == 200 and passes == sorted(set(passes))
        assert all(r["seed"] == "0" and 0 <= float(r["test_acc"]) <= 1 for r in mine)
        # The best member only changes when it is recorded; its training accuracy never drops.
        train = [float(r["best_train_acc"]) for r in mine]
        assert train == sorted(train)
    table = table_rows(out / "table.md")
    assert [row[0] for row in table] == ["M2N2", "GA"]
    assert table[0][1:3] == ["1", "200"] and table[0][-1] == "≈ 87.0% at 50,000, not this row's 200"
    assert (out / "figure.png").stat().st_size > 10_000

    redrawn = compare.main(["--from-csv", str(out / "results.csv"), "--methods", "ga", "--out", str(tmp_path / "again")])
    assert [row[0] for row in table_rows(redrawn / "table.md")] == ["GA", "M2N2"]


@pytest.mark.parametrize("eval_every", [0, 10])
def test_recorder_leaves_out_rows_that_repeat_both_accuracies(runs, eval_every: int) -> None:
    """A new best member as good as the last one adds no row, except at fixed evaluation points and at the end."""
    model = torch.nn.Linear(2, 2, bias=False)
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    spec = runs.RunSpec("ga", 0, 30, eval_every, "cpu", 1, {}, {}, None, "correctness", None, None)
    recorder = runs.Recorder(spec, model, (x, torch.tensor([0, 1])), (x, torch.tensor([0, 0])))
    weights = [torch.eye(2), 2 * torch.eye(2), 3 * torch.eye(2), torch.eye(2).flip(0)]  # the same accuracies, then others
    for step, w in zip((0, 10, 20, 30), weights):
        model.weight.data.copy_(w)
        recorder.after_step(step, w.flatten())
    rows = [(r["forward_passes"], r["best_train_acc"], r["test_acc"]) for r in recorder.rows]
    if eval_every:
        assert rows == [(0, 1.0, 0.5), (10, 1.0, 0.5), (20, 1.0, 0.5), (30, 0.0, 0.5)]
    else:
        assert rows == [(0, 1.0, 0.5), (30, 0.0, 0.5)]


def test_merge_outputs_with_brute_force_and_fixed_evaluation_points(compare, tmp_path: Path) -> None:
    out = compare.main([
        "--setting", "merge", "--methods", "m2n2_no_split_point,slerp_brute_force", "--seeds", "1",
        "--forward-passes", "200", "--eval-every", "50", "--out", str(tmp_path),
    ])  # fmt: skip
    rows = read_rows(out / "results.csv")
    assert [int(r["forward_passes"]) for r in rows if r["method"] == "m2n2_no_split_point"] == [0, 50, 100, 150, 200]
    brute_force = [r for r in rows if r["method"] == "slerp_brute_force"]
    assert [int(r["forward_passes"]) for r in brute_force] == [0, 100, 200]
    # Row 0 is w = 0, the first specialist, which is among the weights searched.
    assert float(brute_force[-1]["best_train_acc"]) >= float(brute_force[0]["best_train_acc"])
    assert [row[0] for row in table_rows(out / "table.md")] == ["M2N2 w/o split point", "SLERP brute force"]


def test_bad_arguments_exit(compare, tmp_path: Path) -> None:
    for argv in (["--methods", "sgd"], ["--setting", "merge", "--methods", "cmaes"], ["--methods", "slerp_brute_force"]):
        with pytest.raises(SystemExit):
            compare.main([*argv, "--out", str(tmp_path)])
    assert compare.parse_seeds("3") == [0, 1, 2] and compare.parse_seeds("4,7") == [4, 7]
    assert compare.parse_seeds("0,") == [0]


def test_zero_seeds_says_how_to_ask_for_seed_zero(compare, tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit):
        compare.main(["--seeds", "0", "--out", str(tmp_path)])
    assert "for seed 0 alone write --seeds 0," in capsys.readouterr().err


def test_ctrl_c_keeps_the_rows_of_the_stopped_run(compare, runs, tmp_path: Path, monkeypatch) -> None:
    step = runs.EvolutionEngine.step
    calls = []

    def interrupted_step(self, k=None):
        calls.append(k)
        if len(calls) > 50:
            raise KeyboardInterrupt
        step(self, k)

    monkeypatch.setattr(runs.EvolutionEngine, "step", interrupted_step)
    out = compare.main(["--methods", "m2n2,ga", "--seeds", "1", "--forward-passes", "200", "--out", str(tmp_path)])
    rows = read_rows(out / "results.csv")
    assert {r["method"] for r in rows} == {"m2n2"}  # the GA never started
    assert int(rows[-1]["forward_passes"]) == 50
    assert [row[:3] for row in table_rows(out / "table.md")] == [["M2N2", "1", "50"]]


LM_COLUMNS = ("method", "seed", "forward_passes", "best_train_acc", "test_acc", "wall_seconds", "add_test", "rev_test",
              "copy_test")


def test_lm_merge_outputs(compare, tiny: Path, tmp_path: Path) -> None:  # noqa: F811
    """--setting lm_merge on tiny seed models: rows at the test points, per-skill columns recomputed from the seeds."""
    from transformers import AutoModelForCausalLM

    from m2n2_lightning.lm.tasks import accuracy, skill_dataset

    seeds = [f"merge.models=['{tiny / 'skill_a'}','{tiny / 'skill_b'}']", f"merge.base_model='{tiny / 'base'}'"]
    out = compare.main([
        "--setting", "lm_merge", "--methods", "m2n2,cmaes_layerwise_slerp,slerp_brute_force,skill_a", "--seeds", "1",
        "--forward-passes", "10", "--eval-every", "5", "--out", str(tmp_path),
        *(arg for override in seeds for arg in ("--override", override)),
    ])  # fmt: skip
    with (out / "results.csv").open() as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == LM_COLUMNS
        rows = list(reader)
    assert [int(r["forward_passes"]) for r in rows if r["method"] == "m2n2"] == [0, 5, 10]
    assert [int(r["forward_passes"]) for r in rows if r["method"] == "cmaes_layerwise_slerp"] == [0, 25]  # a generation
    assert [int(r["forward_passes"]) for r in rows if r["method"] in ("slerp_brute_force", "skill_a")] == [10, 0]
    for r in rows:
        assert float(r["test_acc"]) == pytest.approx((float(r["add_test"]) + float(r["rev_test"])) / 2)
    seed_a = AutoModelForCausalLM.from_pretrained(tiny / "skill_a").eval()
    (row,) = [r for r in rows if r["method"] == "skill_a"]
    for name in ("add", "rev", "copy"):
        assert float(row[f"{name}_test"]) == accuracy(seed_a, skill_dataset((name,), "test"))
    assert float(row["best_train_acc"]) == accuracy(seed_a, skill_dataset(("add", "rev"), "train"))
    with (out / "curves.csv").open() as f:
        curves = list(csv.DictReader(f))
    assert [int(r["forward_passes"]) for r in curves if r["method"] == "m2n2"] == list(range(11))
    cmaes = [(int(r["forward_passes"]), r["coverage"] != "") for r in curves if r["method"] == "cmaes_layerwise_slerp"]
    assert cmaes == [(0, False), (25, True)]  # no population before the first generation is told
    lines = (out / "table.md").read_text().splitlines()
    assert lines[0].startswith("| rank | method | seeds | evaluations | add test | rev test | copy test | mean")
    means = [float(line.split("|")[8].split("±")[0]) for line in lines[2:]]
    assert len(means) == 4 and means == sorted(means, reverse=True)
    assert (out / "figure.png").stat().st_size > 10_000 and (out / "curves.png").stat().st_size > 10_000
    again = compare.main(["--setting", "lm_merge", "--from-csv", str(out / "results.csv"), "--out", str(tmp_path / "again")])
    assert (again / "table.md").read_text() == (out / "table.md").read_text() and (again / "curves.png").is_file()


def test_the_table_marks_the_papers_number_beside_another_budget(compare) -> None:
    from compare_outputs import table

    run = [{"test_acc": 0.8, "best_train_acc": 0.8, "wall_seconds": 1.0, "forward_passes": 3000}]
    text = table({"m2n2": [run, run]}, "scratch", {"m2n2": 0.87})
    assert "| ≈ 87.0% at 50,000, not this row's 3,000 |" in text and "0.800 ± 0.000" in text
    assert "± is the standard error of the mean over the seeds" in text
    full = [{**run[0], "forward_passes": 50_000}]
    assert "| ≈ 87.0% |" in table({"m2n2": [full]}, "scratch", {"m2n2": 0.87})

