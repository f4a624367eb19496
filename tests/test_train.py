"""train.py and the Hydra configs: a real run, config errors, sweeps, Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate

from m2n2_lightning import MLP, FlatParams
from m2n2_lightning.config import register_schema
from m2n2_lightning.strategies.base import build_strategy

ROOT = Path(__file__).resolve().parents[1]


def run_train(tmp_path: Path, *overrides: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    tmp_path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={tmp_path}", "trainer.enable_progress_bar=false",
         *overrides],
        capture_output=True, text=True, timeout=timeout, cwd=tmp_path, env=env,
    )


def compose_config(*overrides: str):
    register_schema()
    with initialize_config_dir(config_dir=str(ROOT / "m2n2_lightning" / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_train_writes_every_output(tmp_path) -> None:
    result = run_train(tmp_path, "forward_passes=300", "seed=1", "checkpoint_every=100")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    for key in ("strategy", "seed", "forward_passes", "best_train_acc", "test_acc", "wall_seconds",
                "forward_passes_per_second"):
        assert key in summary, key
    assert summary["strategy"] == "m2n2" and summary["seed"] == 1 and summary["forward_passes"] == 300
    assert 0 < summary["test_acc"] <= 1 and summary["forward_passes_per_second"] > 0
    assert (tmp_path / "logs" / "metrics.csv").exists()
    assert (tmp_path / "logs" / "class_accuracy.png").exists()
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()
    model = MLP()
    model.load_state_dict(torch.load(tmp_path / "best_model.pt", weights_only=True))
    assert "test accuracy" in result.stdout.splitlines()[-2]


def test_config_groups_compose_and_instantiate() -> None:
    # a strategy config is a factory (`_partial_: true`) that train.py calls with the model's D
    dim = FlatParams(MLP(64, 256, 10)).num_params
    for strategy in ("m2n2", "ga", "ga_no_crossover", "m2n2_no_crossover", "m2n2_no_split_point", "m2n2_no_matchmaker"):
        cfg = compose_config(f"strategy={strategy}", "seed=4")
        built = build_strategy(instantiate(cfg.strategy), num_params=dim)
        assert built.seed == 4 and built.num_params == dim == 19_210
    ga = build_strategy(instantiate(compose_config("strategy=ga").strategy), num_params=dim)
    assert ga.alpha == 0.0 and not ga.use_matchmaker
    mnist = compose_config("experiment=mnist_mlp")
    # the model's input size is the data's (in_features: null), 784 for MNIST
    assert mnist.model.in_features is None and mnist.data._target_.endswith("MNISTDataModule")
    assert instantiate(mnist.data).input_dim == 784


def test_unknown_keys_and_wrong_types_fail_in_hydra() -> None:
    with pytest.raises(ConfigCompositionException):
        compose_config("no_such_key=1")
    with pytest.raises(ConfigCompositionException):
        compose_config("seed=abc")
    with pytest.raises(ConfigCompositionException):
        compose_config("strategy=no_such_strategy")


@pytest.mark.parametrize(
    ("override", "message"),
    [("strategy.pop_size=1", "pop_size must be an integer >= 2, got 1"),
     pytest.param("strategy.alpha=-1", "alpha must be a finite number >= 0", marks=pytest.mark.slow),
     pytest.param("forward_passes=0", "forward_passes must be >= 1", marks=pytest.mark.slow)],
)
def test_out_of_range_values_fail_before_any_work(tmp_path, override, message) -> None:
    result = run_train(tmp_path, override)
    assert result.returncode != 0
    assert message in result.stderr
    assert not (tmp_path / "logs").exists() and not (tmp_path / "checkpoints").exists()


@pytest.mark.slow
def test_sweep_runs_each_combination(tmp_path) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "-m", f"hydra.sweep.dir={tmp_path}", "forward_passes=50",
         "seed=0,1", "trainer.enable_progress_bar=false"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    seeds = sorted(json.loads(p.read_text())["seed"] for p in tmp_path.glob("*/summary.json"))
    assert seeds == [0, 1]


@pytest.mark.slow
def test_ctrl_c_leaves_a_checkpoint_that_resumes(tmp_path) -> None:
    run_dir = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={run_dir}", "forward_passes=1000000",
         "trainer.enable_progress_bar=false", "log_every=500"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
    )
    metrics = run_dir / "logs" / "metrics.csv"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() or (run_dir / "logs" / "hparams.yaml").exists()):
        time.sleep(0.5)
    time.sleep(3)  # some steps in
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    checkpoint = run_dir / "checkpoints" / "interrupted.ckpt"
    assert checkpoint.exists(), output[-3000:]
    state = torch.load(checkpoint, weights_only=True, map_location="cpu")
    assert state["global_step"] > 0
    done = state["callbacks"]["M2N2Callback"]["strategy"]["_extra_state"]["forward_passes"]
    assert done > 0
    resumed = run_train(tmp_path / "resumed", f"ckpt_path={checkpoint}", f"forward_passes={done + 20}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((tmp_path / "resumed" / "summary.json").read_text())["forward_passes"] == done + 20


def test_mnist_experiment_runs_a_few_steps_and_validates_on_held_out_images(tmp_path, mnist_dir) -> None:
    """experiment=mnist_mlp on the shared MNIST copy: val/acc is the best member's accuracy on the held-out
    training images after the resources (not the test set), test/acc on the test set."""
    run = tmp_path / "run"
    result = run_train(
        run, "experiment=mnist_mlp", f"data.data_dir={mnist_dir}", "data.train_size=300", "data.val_size=200",
        "forward_passes=50", "val_every=50", "logger=csv", "threads=1",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resources"] == 300 and summary["forward_passes"] == 50
    model = MLP(in_features=784, hidden=256, out_features=10)
    model.load_state_dict(torch.load(run / "best_model.pt", weights_only=True))
    data = instantiate(compose_config("experiment=mnist_mlp", f"data.data_dir={mnist_dir}").data, train_size=500, val_size=0)
    (x, y), (x_test, y_test) = data.train_tensors, data.test_tensors

    def accuracy(inputs: torch.Tensor, labels: torch.Tensor) -> float:
        with torch.no_grad():
            return (model(inputs).argmax(-1) == labels).double().mean().item()

    rows = [line.split(",") for line in (run / "logs" / "metrics.csv").read_text().splitlines()]
    column = rows[0].index("val/acc")
    val_acc = [float(r[column]) for r in rows[1:] if r[column]]
    assert len(val_acc) == 1 and val_acc[0] == pytest.approx(accuracy(x[300:500], y[300:500]), abs=1e-6)
    assert summary["test_acc"] == pytest.approx(accuracy(x_test, y_test), abs=1e-6)
