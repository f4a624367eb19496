"""`train.py experiment=diffusion_merge` (issue 23): the reduced preset built from scratch and merged end to end, an
exact resume, the seed cache, and the score shift on a real diffusion archive against a float64 recomputation. The
end-to-end tests run train.py in subprocesses (slow); the task's and model class's checks are fast."""

from __future__ import annotations

import csv
import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from test_general_form import archive_with, oracle_dropped

from m2n2_lightning.diffusion.seeds import (
    SEED_NAMES,
    build_seeds,
    load_unet,
    preset,
    unet_dir,
)
from m2n2_lightning.merge_run import check_model_class
from m2n2_lightning.tasks.base import TaskSet
from m2n2_lightning.tasks.diffusion import DiffusionTask

ROOT = Path(__file__).resolve().parents[1]
#: The reduced preset's seeds with a few captions and DDIM steps: CI's end-to-end size.
SMALL = {"preset": "reduced", "resources": 8, "tests": 8, "steps": 3}
OVERRIDES = [f"merge.tasks.images.{key}={value}" for key, value in SMALL.items()]


def train_diffusion(run_dir: Path, cache_root: Path, *overrides: str) -> dict:
    """Run train.py experiment=diffusion_merge (reduced) in `run_dir`, seeds cached under `cache_root`; its summary."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "experiment=diffusion_merge", f"hydra.run.dir={run_dir}",
         "trainer.enable_progress_bar=false", *OVERRIDES, *overrides],
        check=False, capture_output=True, text=True, timeout=600, cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1", "M2N2_DIFFUSION_CACHE": str(cache_root)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((run_dir / "summary.json").read_text())


def curve_rows(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def reduced_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict, float]:
    """One run of 20 evaluations that builds the reduced seeds first: (run dir, cache, summary, wall seconds)."""
    root = tmp_path_factory.mktemp("diffusion")
    start = time.perf_counter()
    summary = train_diffusion(root / "run", root / "cache", "forward_passes=20", "checkpoint_every=10")
    return root / "run", root / "cache" / "reduced_seed0", summary, time.perf_counter() - start


def loaded_task(cache: Path) -> tuple[DiffusionTask, TaskSet]:
    task = DiffusionTask(cache=str(cache), **SMALL)
    return task, TaskSet({"images": task}, batch_size=60).load()


@pytest.mark.slow
def test_the_reduced_preset_builds_and_merges(reduced_run: tuple[Path, Path, dict, float]) -> None:
    run_dir, cache, summary, wall = reduced_run
    print(f"reduced preset end to end, build included: {wall:.1f} s")
    assert (cache / "build.json").is_file() and all(unet_dir(cache, name).is_dir() for name in SEED_NAMES)
    merged = UNet2DConditionModel.from_pretrained(run_dir / "best_model").eval()  # diffusers' own loader
    _, tasks = loaded_task(cache)
    assert set(summary["test"]) == {"en", "ja"}
    for language, score in summary["test"].items():
        assert score == pytest.approx(tasks.mean_score(merged, "images", tasks.data["images"].tests[language]), rel=1e-6)
    assert summary["test_acc"] == pytest.approx((summary["test"]["en"] + summary["test"]["ja"]) / 2)
    assert summary["best_train_acc"] == pytest.approx(tasks.train_score(merged), rel=1e-6)
    assert 0 < summary["best_train_acc"] < 1 and summary["forward_passes"] == 20 and summary["resources"] == 8
    settings = summary["strategy_settings"]
    assert settings["score_shift"] and settings["chromosomes"] == ["*attentions*"] and settings["mutation_sigma"] == 0
    assert settings["archive"] == "CoefficientArchive" and settings["seed_models"] == 4
    assert [int(r["forward_passes"]) for r in curve_rows(run_dir / "curves.csv")] == list(range(21))
    # the merge holds the seeds' mixture: the merged U-Net differs from every seed's
    merged_state = merged.state_dict()
    for name in SEED_NAMES:
        seed_state = load_unet(cache, name).state_dict()
        assert any(not torch.equal(merged_state[k], seed_state[k]) for k in merged_state)


@pytest.mark.slow
def test_the_seed_build_is_cached_and_deterministic(reduced_run: tuple[Path, Path, dict, float], tmp_path: Path) -> None:
    _, cache, _, _ = reduced_run
    weights = unet_dir(cache, "sharp") / "diffusion_pytorch_model.safetensors"
    stamp = weights.stat().st_mtime_ns
    record = build_seeds(cache, preset("reduced", 0))  # the same settings: read from build.json, nothing rebuilt
    assert weights.stat().st_mtime_ns == stamp and record == json.loads((cache / "build.json").read_text())
    build_seeds(tmp_path / "again", preset("reduced", 0))
    files = sorted(p.relative_to(cache) for p in cache.rglob("*.safetensors"))
    assert len(files) == 8  # five U-Nets, two text encoders, the scorer
    for path in files:
        assert (tmp_path / "again" / path).read_bytes() == (cache / path).read_bytes(), path


@pytest.mark.slow
def test_train_py_resumes_a_diffusion_merge_exactly(reduced_run: tuple[Path, Path, dict, float], tmp_path: Path) -> None:
    cache_root = reduced_run[1].parent
    whole = train_diffusion(tmp_path / "whole", cache_root, "forward_passes=12")
    train_diffusion(tmp_path / "half", cache_root, "forward_passes=6")
    resumed = train_diffusion(tmp_path / "resumed", cache_root, "forward_passes=12",
                              f"ckpt_path={tmp_path / 'half' / 'checkpoints' / 'last.ckpt'}")
    assert resumed["test"] == whole["test"] and resumed["best_train_acc"] == whole["best_train_acc"]
    keys = ("forward_passes", "coverage", "fitness_entropy", "best_score")
    assert [[r[k] for k in keys] for r in curve_rows(tmp_path / "resumed" / "curves.csv")] == [
        [r[k] for k in keys] for r in curve_rows(tmp_path / "whole" / "curves.csv")
    ]
    whole_weights = (tmp_path / "whole" / "best_model" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert (tmp_path / "resumed" / "best_model" / "diffusion_pytorch_model.safetensors").read_bytes() == whole_weights


@pytest.mark.slow
def test_the_score_shift_changes_which_row_is_dropped_on_a_real_archive(reduced_run: tuple[Path, Path, dict, float]) -> None:
    """The run's final archive (its members' per-caption similarities) and children scored here: the base, the seeds,
    the merge, and task-arithmetic extrapolations a + t (b - a) (t = 1.5, 2, 2.5) of every ordered pair of those five
    U-Nets, whose scores spread further than the archive's. For every child the strategy drops the row the float64
    recomputation drops, with and without the shift, and the shift changes that row for some of them (9 of the 60
    extrapolations on the machine this was written on; none of the six others)."""
    run_dir, cache, _, _ = reduced_run
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["callbacks"]["M2N2Callback"]["strategy"]
    scores, occupied = state["archive.scores"].double(), state["archive.occupied"]
    assert occupied.all() and scores.shape == (15, 8)
    task, tasks = loaded_task(cache)
    resources = [example for _, example in tasks.resources]
    unets = {name: load_unet(cache, name) for name in ("base", *SEED_NAMES)}
    unets["merge"] = UNet2DConditionModel.from_pretrained(run_dir / "best_model").eval()
    weights = {name: unet.state_dict() for name, unet in unets.items()}
    holder = load_unet(cache, "base")

    def children() -> Iterator[str]:
        for name in unets:
            holder.load_state_dict(weights[name])
            yield name
        for a, b in itertools.permutations(list(unets)[:5], 2):
            for t in (1.5, 2.0, 2.5):
                holder.load_state_dict({k: weights[a][k] + t * (weights[b][k] - weights[a][k]) for k in weights[a]})
                yield f"{a} + {t} ({b} - {a})"

    changed = []
    for name in children():
        with torch.no_grad():
            child = task.score(holder, resources).double()
        dropped = {}
        for shift in (False, True):
            strategy = archive_with(scores, occupied, score_shift=shift)
            dropped[shift] = int(strategy._dropped_row(child))
            assert dropped[shift] == oracle_dropped(scores.tolist(), occupied.tolist(), child.tolist(), 1.0, "unit", shift)
        if dropped[True] != dropped[False]:
            changed.append(name)
    print(f"the score shift changed the dropped row for {len(changed)} of 66 children: {changed}")
    assert changed, "the score shift dropped the same row as the plain fitness for every child"


@pytest.mark.slow
def test_a_recipe_merges_the_u_nets_through_m2n2_merge(reduced_run: tuple[Path, Path, dict, float], tmp_path: Path) -> None:
    """The merge-entry command with a recipe: the U-Nets' weight files as models, their class, the task by its class."""
    cache = reduced_run[1]
    recipe = {
        "models": [str(unet_dir(cache, name) / "diffusion_pytorch_model.safetensors") for name in SEED_NAMES],
        "base_model": str(unet_dir(cache, "bilingual")), "model_class": "diffusers.UNet2DConditionModel",
        "merge_method": "m2n2_merge", "evaluations": 6,
        "parameters": {"score_shift": True, "chromosomes": ["*attentions*"]},
        "tasks": {"images": {"_target_": "m2n2_lightning.tasks.diffusion.DiffusionTask", "cache": str(cache), **SMALL}},
    }
    (tmp_path / "recipe.yaml").write_text(json.dumps(recipe))  # JSON is YAML
    result = subprocess.run(
        [sys.executable, "-m", "m2n2_lightning.merge_cli", str(tmp_path / "recipe.yaml"), "--out", str(tmp_path / "out"),
         "trainer.enable_progress_bar=false"],
        check=False, capture_output=True, text=True, timeout=600, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["forward_passes"] == 6 and summary["strategy_settings"]["score_shift"]
    merged = UNet2DConditionModel.from_pretrained(tmp_path / "out" / "best_model").eval()
    _, tasks = loaded_task(cache)
    assert summary["test"]["ja"] == pytest.approx(tasks.mean_score(merged, "images", tasks.data["images"].tests["ja"]),
                                                  rel=1e-6)


def test_the_task_and_the_model_class_are_checked_before_anything_loads() -> None:
    for settings, message in (
        ({"preset": "huge"}, "preset must be one of"), ({"language": "fr"}, "language must be one of"),
        ({"resources": 0}, "resources must be an integer"), ({"tests": 181}, "tests must be an integer"),
        ({"steps": True}, "steps must be an integer"), ({"text_encoder": "bold"}, "text_encoder must be"),
    ):
        with pytest.raises(ValueError, match=message):
            DiffusionTask(**settings)
    check_model_class(None)
    check_model_class("diffusers.UNet2DConditionModel")
    with pytest.raises(ValueError, match="does not import as a class"):
        check_model_class("diffusers.NoSuchUNet")
    with pytest.raises(ValueError, match="has no from_pretrained"):
        check_model_class("collections.OrderedDict")
