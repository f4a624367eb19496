"""What a Lightning / Hydra user meets first: modules with dict outputs and batches, a configured Timer, an Optuna sweep."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from m2n2_lightning import M2N2Callback, M2N2Strategy

ROOT = Path(__file__).resolve().parents[1]


class DictModel(L.LightningModule):
    """forward takes a dict batch and returns a dict with "logits", like Hugging Face models."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))

    def forward(self, batch: dict) -> dict:
        return {"logits": self.net(batch["x"])}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return nn.functional.cross_entropy(self(batch)["logits"], batch["labels"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(60, 4, generator=g)
        y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
        return torch.utils.data.DataLoader([{"x": x[i], "labels": y[i]} for i in range(60)], batch_size=20)


def test_callback_evolves_a_module_with_dict_outputs_and_batches(tmp_path, one_thread) -> None:
    module = DictModel()
    callback = M2N2Callback(strategy=functools.partial(M2N2Strategy, pop_size=6))
    trainer = L.Trainer(max_steps=40, callbacks=[callback], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module)
    assert callback.strategy.forward_passes == 40 and callback.strategy.num_resources == 60
    # The archive's best scores are the module's own accuracy with the best member loaded, recomputed here.
    data = next(iter(torch.utils.data.DataLoader(module.train_dataloader().dataset, batch_size=60)))
    with torch.no_grad():
        right = (module(data)["logits"].argmax(-1) == data["labels"]).float()
    assert torch.equal(right, callback.strategy.scores[callback.strategy.best_index()[0]])


@pytest.mark.slow
def test_a_configured_timer_stops_the_run(tmp_path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    timer = "+callbacks.timer={_target_: lightning.pytorch.callbacks.Timer, duration: '00:00:00:03'}"
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={tmp_path}", "forward_passes=10000000",
         "trainer.enable_progress_bar=false", timer],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert 0 < summary["forward_passes"] < 10_000_000 and summary["wall_seconds"] < 60


@pytest.mark.slow
def test_an_optuna_sweep_of_three_trials_returns_floats_and_reports_the_best(tmp_path) -> None:
    """`hparams_search=m2n2_optuna`: main returns the optimized_metric as a float for each trial, and the
    sweeper's best value is the highest best_train_acc among the three trials' summary.json files."""
    import yaml

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "-m", "hparams_search=m2n2_optuna", "hydra.sweeper.n_trials=3",
         "forward_passes=300", f"hydra.sweep.dir={tmp_path}", "trainer.enable_progress_bar=false"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summaries = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("*/summary.json"))]
    assert len(summaries) == 3
    best = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(max(s["best_train_acc"] for s in summaries), abs=1e-12)
    assert set(best["best_params"]) == {"strategy.pop_size", "strategy.alpha"}
