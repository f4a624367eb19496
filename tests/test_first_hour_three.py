"""Issue 24, the first hour: quiet runs, stops that say why, one-line errors, the accuracy curve and heatmap,
seed builds with a progress bar, a resumed finished run's figures, outputs kept out of the clone."""

from __future__ import annotations

import functools
import io
import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Timer

from m2n2_lightning import MLP, EvolutionModule, M2N2Strategy
from m2n2_lightning.data import DigitsDataModule
from m2n2_lightning.metrics import save_heatmap
from m2n2_lightning.progress import AccuracyCurve
from m2n2_lightning.stopping import StopReport

ROOT = Path(__file__).resolve().parents[1]


def run_train(directory: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={directory}", "trainer.enable_progress_bar=false",
         *overrides], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env,
    )


def evolve(root: Path, steps: int, callbacks: list, ckpt_path: Path | None = None, budget: int = 1000) -> EvolutionModule:
    module = EvolutionModule(MLP(64, 16, 10), functools.partial(M2N2Strategy, pop_size=4, seed=0),
                             max_forward_passes=budget, steps_per_batch=5, heatmap=False)
    trainer = L.Trainer(max_steps=steps, callbacks=callbacks, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=root, log_every_n_steps=1)
    trainer.fit(module, datamodule=DigitsDataModule(), ckpt_path=ckpt_path)
    trainer.save_checkpoint(root / "last.ckpt")
    return module


@pytest.mark.slow  # a whole train.py / m2n2-merge run in a subprocess (CI runs it)
def test_a_default_run_is_quiet_and_a_resumed_finished_run_reports_no_work(tmp_path) -> None:
    first = run_train(tmp_path, "forward_passes=300")
    assert first.returncode == 0, first.stderr[-3000:]
    noise = [line for line in (first.stdout + first.stderr).splitlines()
             if "warn" in line.lower() or "Tip:" in line or "deprecated" in line]
    assert noise == []
    assert (tmp_path / "logs" / "accuracy.png").stat().st_size > 10_000
    again = run_train(tmp_path, f"ckpt_path={tmp_path / 'checkpoints' / 'last.ckpt'}", "forward_passes=300")
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["forward_passes"] == 300 and summary["forward_passes_this_run"] == 0
    assert summary["forward_passes_per_second"] is None and "0 forward passes in" in again.stderr + again.stdout


@pytest.mark.slow  # a whole train.py / m2n2-merge run in a subprocess (CI runs it)
def test_a_bad_value_is_one_line_and_the_traceback_is_behind_hydra_full_error(tmp_path) -> None:
    result = run_train(tmp_path, "strategy.pop_size=1")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "pop_size must be an integer >= 2, got 1" in result.stderr and len(result.stderr.strip().splitlines()) <= 4
    env_full = {**os.environ, "HYDRA_FULL_ERROR": "1", "OMP_NUM_THREADS": "1"}
    full = subprocess.run([sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={tmp_path}", "strategy.pop_size=1"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=env_full)
    assert "Traceback" in full.stderr and "pop_size must be an integer >= 2, got 1" in full.stderr
    typo = run_train(tmp_path, "optimized_metric=tset_acc")
    assert typo.returncode == 1 and "optimized_metric='tset_acc' is not a summary.json number" in typo.stderr
    assert not (tmp_path / "logs").exists()  # refused before any work


class StopAt(L.Callback):
    """Sets `trainer.should_stop` after training step `step`, as any user callback may."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        trainer.should_stop = trainer.should_stop or trainer.global_step >= self.step


def test_a_stop_by_a_callback_says_which_at_what_count_and_how_to_continue(tmp_path) -> None:
    report = StopReport(resume=tmp_path / "last.ckpt")
    module = evolve(tmp_path, 100, [StopAt(3), report])
    assert module.strategy.forward_passes == 15 and report.message == (
        f"Stopped by a callback or the module setting trainer.should_stop at 15 of 1,000 forward passes; to "
        f"continue, resume from ckpt_path={tmp_path / 'last.ckpt'}"
    )
    timer_report = StopReport(resume=tmp_path / "last.ckpt")
    module = evolve(tmp_path, 100, [Timer(duration=timedelta(seconds=0), verbose=False), timer_report])
    assert timer_report.message.startswith("Stopped by the Timer (duration 0:00:00) at ")
    assert timer_report.message.endswith(
        f"of 1,000 forward passes; to continue, resume from ckpt_path={tmp_path / 'last.ckpt'} with a longer Timer "
        "duration (train.py: callbacks.timer.duration=...) or none"
    )


def test_a_run_that_spends_its_budget_says_nothing_more(tmp_path) -> None:
    report = StopReport()
    evolve(tmp_path, 100, [report], budget=50)
    assert report.message is None


def test_the_accuracy_curve_covers_the_whole_run_after_a_resume(tmp_path) -> None:
    evolve(tmp_path, 4, [AccuracyCurve()], budget=40)
    curve = AccuracyCurve()
    evolve(tmp_path, 8, [curve], ckpt_path=tmp_path / "last.ckpt", budget=40)
    passes = [p[0] for p in curve.points["train/best_score"]]
    assert passes[0] <= 10 and passes[-1] == 40 and passes == sorted(passes)
    assert curve.save(tmp_path / "accuracy.png", 0.5, "m2n2 on digits_mlp, seed 0").stat().st_size > 10_000


def test_the_class_heatmap_spreads_its_colours_at_low_accuracy(tmp_path) -> None:
    accuracy = torch.rand(20, 10, generator=torch.Generator().manual_seed(0)) * 0.3  # a 2,000-pass MNIST run
    figure = save_heatmap(accuracy, tmp_path / "heatmap.png")
    image = figure.axes[0].images[0]
    shades = image.norm(1 - accuracy.numpy().clip(0, 0.999))
    assert shades.max() - shades.min() > 0.1  # not one colour
    assert min(text.get_fontsize() for text in figure.axes[0].texts) >= 8


def test_the_seed_build_counts_its_steps() -> None:
    from tqdm.auto import tqdm

    from m2n2_lightning.lm.seeds import SKILL_A, make_model, preset, train

    settings = preset(reduced=True)
    model = make_model(settings)
    with tqdm(total=3, file=io.StringIO()) as bar:
        train(model, ((SKILL_A, 1.0),), 3, settings.ft_lr, 2, 0, bar)
        assert bar.n == 3


def test_examples_and_benchmarks_write_outside_the_clone_or_are_ignored() -> None:
    if not (ROOT / ".git").exists():
        pytest.skip("not a git clone")
    ignored = subprocess.run(["git", "check-ignore", "merged_lm/", "benchmarks/results/compare/", "outputs/x"],
                             capture_output=True, text=True, cwd=ROOT)
    assert ignored.stdout.split() == ["merged_lm/", "benchmarks/results/compare/", "outputs/x"]
    assert 'default="outputs/merged_lm"' in (ROOT / "examples" / "merge_language_models.py").read_text()


def test_quiet_lightning_drops_the_tips_and_the_known_noise_only(lightning_log) -> None:
    import warnings

    from lightning.pytorch.utilities import rank_zero_info

    from m2n2_lightning.loggers import quiet_lightning

    with warnings.catch_warnings(record=True) as caught:
        quiet_lightning()
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning)
        warnings.warn("Found 33 module(s) in eval mode at the start of training.", UserWarning)
        warnings.warn("something else", UserWarning)
    assert [str(w.message) for w in caught] == ["something else"]
    with lightning_log.at_level("INFO"):
        rank_zero_info("💡 Tip: For seamless cloud logging ...")
        rank_zero_info("`Trainer.fit` stopped: `max_steps=6` reached.")
    assert "Tip" not in lightning_log.text and "max_steps=6" in lightning_log.text
