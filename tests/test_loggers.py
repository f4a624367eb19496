"""The logger configs (conf/logger/): each composes, each writes the run in its own on-disk format, read back
with that logger's own reader, and a missing package is a clear message naming the extra to install.

The end-to-end runs (`train.py logger=...`, 2,000 forward passes of digits) check, against the run's
summary.json: the logged `forward_passes` at every `log_every` (500 passes = 10 training steps of 50 steps),
the last `train/best_score` (the best member's training accuracy), `test/acc`, the strategy's settings as
hyperparameters and the member-by-class heatmap. A local socket stands in as the HTTP(S) proxy: nothing
may connect to it (no network use, no login)."""

from __future__ import annotations

import io
import json
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml
from omegaconf import OmegaConf
from test_train import ROOT, compose_config, run_train

from m2n2_lightning.loggers import check_logger_installed

RUN = ("forward_passes=2000", "seed=3")
LOGGED_STEPS = [9, 19, 29, 39]  # log_every=500 forward passes, 50 per training step: every 10th step
LOGGED_PASSES = [500, 1000, 1500, 2000]


def record_connections(listener: socket.socket, accepted: list[str]) -> None:
    """Accept connections until the listener is closed, noting each peer."""
    try:
        while True:
            accepted.append(str(listener.accept()[1]))
    except OSError:
        return


@pytest.fixture
def offline(tmp_path, monkeypatch) -> Iterator[list[str]]:
    """Point every proxy variable at a local listener, keep wandb's files under tmp_path; yields the list of
    connections the listener accepted (it must stay empty)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    accepted: list[str] = []
    threading.Thread(target=record_connections, args=(listener, accepted), daemon=True).start()
    proxy = f"http://127.0.0.1:{listener.getsockname()[1]}"
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.setenv(name, proxy)
    for name in ("NO_PROXY", "no_proxy", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb_home"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield accepted
    listener.close()


def train(run_dir: Path, logger: str) -> dict:
    """Run train.py with `logger`; returns its summary.json."""
    result = run_train(run_dir, f"logger={logger}", *RUN)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((run_dir / "summary.json").read_text())


def pixels(png: bytes | Path) -> np.ndarray:
    """The RGB pixels of a PNG (bytes or a file): loggers re-encode the figure, so the files' bytes differ."""
    from PIL import Image

    data = png.read_bytes() if isinstance(png, Path) else png
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def same_picture(logged: bytes | Path, saved: Path) -> bool:
    """Whether a logger's copy of the heatmap shows the same pixels as the PNG the run wrote (and is no blank)."""
    a, b = pixels(logged), pixels(saved)
    return a.shape == b.shape and bool((a == b).all()) and len(np.unique(a.reshape(-1, 3), axis=0)) > 10


def expected_settings(summary: dict) -> dict:
    return {"strategy": "M2N2Strategy", **summary["strategy_settings"]}


# --------------------------------------------------------------------------------------------------- wandb
def wandb_records(path: Path):
    """The protobuf records of a W&B run file (run-<id>.wandb): a 7-byte header (":W&B", magic, version), then
    32 KiB blocks of chunks, each with a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    position, pending = 7, b""
    while position + 7 <= len(data):
        left = 32768 - position % 32768
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if left < 7 or (length == 0 and kind == 0):  # block padding
            position += left
            continue
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_items(items) -> dict:
    """A history / config record's items as {key: value}; a nested key (e.g. an image's fields) joined by "/"."""
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}


@pytest.mark.slow
def test_wandb_offline_run_holds_metrics_settings_and_heatmap(tmp_path, offline) -> None:
    summary = train(tmp_path / "run", "wandb")
    (run_file,) = (tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb")
    history, config = [], {}
    for record in wandb_records(run_file):
        if record.HasField("history"):
            history.append(wandb_items(record.history.item))
        elif record.HasField("config"):
            config.update(wandb_items(record.config.update))
    rows = [row for row in history if "forward_passes" in row]
    assert [row["forward_passes"] for row in rows] == LOGGED_PASSES
    assert [row["trainer/global_step"] for row in rows] == LOGGED_STEPS
    assert rows[-1]["train/best_score"] == summary["best_train_acc"]
    assert [row["test/acc"] for row in history if "test/acc" in row] == [summary["test_acc"]]
    evolution = config["evolution"]
    assert {key: evolution[key] for key in expected_settings(summary)} == expected_settings(summary)
    assert config["steps_per_batch"] == 50 and config["max_forward_passes"] == 2000  # the module's arguments
    (image,) = [row for row in history if "niche/class_accuracy/_type" in row]
    assert image["niche/class_accuracy/_type"] == "images/separated" and image["trainer/global_step"] == 40
    (name,) = image["niche/class_accuracy/filenames"]
    media = run_file.parent / "files" / name
    assert same_picture(media, tmp_path / "run" / "class_accuracy.png")
    assert offline == []


# -------------------------------------------------------------------------------------------------- mlflow
@pytest.mark.slow
def test_mlflow_run_holds_metrics_settings_and_heatmap(tmp_path, offline) -> None:
    from mlflow import MlflowClient

    run_dir = tmp_path / "run"
    summary = train(run_dir, "mlflow")
    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("m2n2-lightning")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    passes = client.get_metric_history(run.info.run_id, "forward_passes")
    assert [(m.step, m.value) for m in passes] == list(zip(LOGGED_STEPS, LOGGED_PASSES))
    assert client.get_metric_history(run.info.run_id, "train/best_score")[-1].value == summary["best_train_acc"]
    assert run.data.metrics["test/acc"] == summary["test_acc"]
    # MLflow keeps parameters as strings, nested keys joined by "/"
    params = run.data.params
    settings = expected_settings(summary)
    assert {key: params[f"evolution/{key}"] for key in settings} == {key: str(value) for key, value in settings.items()}
    assert params["steps_per_batch"] == "50"
    (artifact,) = client.list_artifacts(run.info.run_id, "niche")
    assert artifact.path == "niche/class_accuracy.png"
    local = Path(client.download_artifacts(run.info.run_id, artifact.path, str(tmp_path)))
    assert same_picture(local, run_dir / "class_accuracy.png")
    assert str(run.info.artifact_uri).startswith(str(run_dir / "mlartifacts"))
    assert offline == []


# ---------------------------------------------------------------------------------------------- tensorboard
@pytest.mark.slow
def test_tensorboard_run_holds_metrics_settings_and_heatmap(tmp_path, offline) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    summary = train(run_dir, "tensorboard")
    events = EventAccumulator(str(run_dir / "logs"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    passes = events.Scalars("forward_passes")
    assert [(e.step, e.value) for e in passes] == list(zip(LOGGED_STEPS, LOGGED_PASSES))
    assert events.Scalars("train/best_score")[-1].value == summary["best_train_acc"]  # float32 both
    assert [e.value for e in events.Scalars("test/acc")] == [summary["test_acc"]]
    (image,) = events.Images("niche/class_accuracy")
    assert same_picture(image.encoded_image_string, run_dir / "logs" / "class_accuracy.png")
    hparams = yaml.safe_load((run_dir / "logs" / "hparams.yaml").read_text())
    assert {key: hparams["evolution"][key] for key in expected_settings(summary)} == expected_settings(summary)
    assert offline == []


# ------------------------------------------------------------------------------------- composing, missing packages
@pytest.mark.parametrize(
    ("logger", "target", "keys"),
    [("csv", "CSVLogger", {"save_dir": "${hydra:runtime.output_dir}", "name": "logs"}),
     ("tensorboard", "TensorBoardLogger", {"save_dir": "${hydra:runtime.output_dir}", "name": "logs"}),
     ("wandb", "WandbLogger", {"save_dir": "${hydra:runtime.output_dir}", "offline": True}),
     ("mlflow", "MLFlowLogger", {"tracking_uri": "sqlite:///${hydra:runtime.output_dir}/mlflow.db",
                                 "artifact_location": "${hydra:runtime.output_dir}/mlartifacts"})],
)
def test_each_logger_config_composes(logger, target, keys) -> None:
    """Every file the logger writes is under the run's directory (the end-to-end tests check resolved paths)."""
    config = OmegaConf.to_container(compose_config(f"logger={logger}").logger, resolve=False)
    assert config["_target_"] == f"lightning.pytorch.loggers.{target}"
    assert {key: config[key] for key in keys} == keys


@pytest.mark.slow
@pytest.mark.parametrize("logger", ["csv", "tensorboard", "wandb", "mlflow"])
def test_each_logger_config_prints_with_cfg_job(tmp_path, logger) -> None:
    """`train.py logger=... --cfg job` prints the same logger config as composing it."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), f"logger={logger}", "--cfg", "job"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    composed = OmegaConf.to_container(compose_config(f"logger={logger}").logger, resolve=False)
    assert yaml.safe_load(result.stdout)["logger"] == composed


@pytest.mark.parametrize(
    ("logger", "modules", "extra"),
    [("WandbLogger", ["wandb"], "wandb"), ("MLFlowLogger", ["mlflow"], "mlflow"),
     ("TensorBoardLogger", ["tensorboard", "tensorboardX"], "tensorboard")],  # Lightning's TensorBoard takes either
)
def test_a_missing_logger_package_names_the_extra(monkeypatch, logger, modules, extra) -> None:
    assert f"\n{extra} = [" in (ROOT / "pyproject.toml").read_text()  # the message names an extra that exists
    config = {"_target_": f"lightning.pytorch.loggers.{logger}"}
    check_logger_installed(config)  # installed here (the dev extra)
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)  # import of `name` fails, find_spec(name) is None
    with pytest.raises(ModuleNotFoundError, match=rf'needs the `{modules[0]}` package.*"m2n2-lightning\[{extra}\]"'):
        check_logger_installed(config)


@pytest.mark.parametrize("config", [None, False, {"_target_": "lightning.pytorch.loggers.CSVLogger"}])
def test_loggers_without_optional_packages_pass_the_check(config) -> None:
    check_logger_installed(config)


def test_train_py_without_wandb_stops_first_with_the_extra_to_install(tmp_path) -> None:
    """`train.py logger=wandb` where `import wandb` fails: a message naming the extra, before any data is read."""
    script = (
        "import runpy, sys; sys.modules['wandb'] = None; "
        f"sys.argv = ['train.py', 'logger=wandb', 'hydra.run.dir={tmp_path}']; "
        f"runpy.run_path({str(ROOT / 'train.py')!r}, run_name='__main__')"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode != 0
    assert 'needs the `wandb` package, which is not installed. Install it with pip install "m2n2-lightning[wandb]"' \
        in result.stderr, result.stderr[-3000:]
    assert "Error in call to target" not in result.stderr  # not from inside Hydra's instantiate
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "summary.json").exists()
