"""Faults and bad input: stopping, resuming and failing never lose, corrupt or silently change a run.

Signals are delivered to real `train.py` subprocesses; resumed runs are compared bit for bit
with uninterrupted ones through the strategy state in their final `last.ckpt`.
"""

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

from m2n2_lightning.checkpointing import AtomicCheckpointIO, load_checkpoint_file
from m2n2_lightning.scoring import correctness

ROOT = Path(__file__).resolve().parents[1]
QUICK = ("trainer.enable_progress_bar=false", "checkpoint_every=200", "log_every=100", "module.steps_per_batch=10")


def start_train(run_dir: Path, *overrides: str) -> subprocess.Popen:
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={run_dir}", *QUICK, *overrides],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=run_dir, env=env,
    )


def finish(process: subprocess.Popen, timeout: int = 300) -> tuple[int, str]:
    output, _ = process.communicate(timeout=timeout)
    return process.returncode, output


def strategy_state(checkpoint: Path) -> dict:
    content = load_checkpoint_file(checkpoint)
    (state,) = [value for key, value in content["callbacks"].items() if key.startswith("M2N2Callback")]
    return state["strategy"]


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
    extra_a, extra_b = a["_extra_state"], b["_extra_state"]
    assert torch.equal(extra_a["rng_state"], extra_b["rng_state"])
    assert extra_a["forward_passes"] == extra_b["forward_passes"]


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()[0][-3000:]
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    code, output = finish(start_train(run_dir, "forward_passes=1473"))
    assert code == 0, output[-3000:]
    return {"dir": run_dir, "state": strategy_state(run_dir / "checkpoints" / "last.ckpt")}


@pytest.mark.slow
def test_last_checkpoint_holds_the_final_step(uninterrupted) -> None:
    # 1473 passes is no multiple of the checkpoint interval (200): last.ckpt still holds all of them.
    assert uninterrupted["state"]["_extra_state"]["forward_passes"] == 1473
    summary = json.loads((uninterrupted["dir"] / "summary.json").read_text())
    assert summary["forward_passes"] == summary["forward_passes_this_run"] == 1473
    leftovers = [p.name for p in (uninterrupted["dir"] / "checkpoints").iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "code", "later"), [(signal.SIGINT, 130, 0.0), (signal.SIGTERM, 143, 1.0)])
def test_a_signal_stops_at_a_step_boundary_and_resumes_exactly(tmp_path, uninterrupted, signum, code, later) -> None:
    process = start_train(tmp_path, "forward_passes=1473")
    # Early (right after the first periodic checkpoint) and later in the run.
    wait_for(tmp_path / "checkpoints" / "last.ckpt", process)
    time.sleep(later)
    process.send_signal(signum)
    returncode, output = finish(process)
    assert returncode == code, output[-3000:]
    interrupted = tmp_path / "checkpoints" / "interrupted.ckpt"
    assert f"resume with ckpt_path={interrupted}" in output
    stopped = strategy_state(interrupted)["_extra_state"]["forward_passes"]
    assert 0 < stopped < 1473
    resumed_dir = tmp_path / "resumed"
    returncode, output = finish(start_train(resumed_dir, "forward_passes=1473", f"ckpt_path={interrupted}"))
    assert returncode == 0, output[-3000:]
    assert_same_state(strategy_state(resumed_dir / "checkpoints" / "last.ckpt"), uninterrupted["state"])
    summary = json.loads((resumed_dir / "summary.json").read_text())
    assert summary["forward_passes_this_run"] == 1473 - stopped  # the rate counts this run only


@pytest.mark.slow
@pytest.mark.parametrize(
    ("override", "named"),
    [("seed=1", "seed: 0 in the checkpoint, 1 now"), ("strategy.pop_size=10", "pop_size: 20 in the checkpoint, 10 now"),
     ("data.normalize=true", "other resources")],
)
def test_resume_refuses_other_settings(tmp_path, uninterrupted, override, named) -> None:
    last = uninterrupted["dir"] / "checkpoints" / "last.ckpt"
    returncode, output = finish(start_train(tmp_path, "forward_passes=1600", f"ckpt_path={last}", override))
    assert returncode != 0
    assert named in output and "allow_resume_changes=true" in output
    assert not (tmp_path / "checkpoints" / "interrupted.ckpt").exists()  # a failure before any step saves nothing


@pytest.mark.slow
def test_resume_with_an_explicit_override_continues(tmp_path, uninterrupted) -> None:
    last = uninterrupted["dir"] / "checkpoints" / "last.ckpt"
    returncode, output = finish(
        start_train(tmp_path, "forward_passes=1523", f"ckpt_path={last}", "seed=1", "allow_resume_changes=true")
    )
    assert returncode == 0, output[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["seed"] == 0  # the value in force: the checkpoint's generator and seed
    assert summary["forward_passes"] == 1523 and summary["forward_passes_this_run"] == 50


class Payload:
    """Unpickling this creates a marker file: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def bad_checkpoint(tmp_path: Path, content: str) -> tuple[Path, Path]:
    bad, marker = tmp_path / "bad.ckpt", tmp_path / "payload_ran"
    if content == "crafted":
        torch.save({"state_dict": {}, "x": Payload(marker)}, bad)
    elif content == "empty":
        bad.write_bytes(b"")
    elif content == "truncated":
        good = tmp_path / "good.ckpt"
        AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.randn(5000)}}, good)
        bad.write_bytes(good.read_bytes()[:5000])
    else:
        bad.write_bytes(os.urandom(4096))
    return bad, marker


@pytest.mark.parametrize("content", ["crafted", "empty", "truncated", "random"])
def test_bad_checkpoints_are_refused_without_running_code(tmp_path, content) -> None:
    bad, marker = bad_checkpoint(tmp_path, content)
    with pytest.raises(ValueError, match="not a usable checkpoint|refuses to load|is empty"):
        load_checkpoint_file(bad)
    assert not marker.exists()


@pytest.mark.slow
@pytest.mark.parametrize("content", ["crafted", "random"])
def test_train_refuses_bad_checkpoints_before_any_data_is_read(tmp_path, content) -> None:
    bad, marker = bad_checkpoint(tmp_path, content)
    returncode, output = finish(start_train(tmp_path / "run", f"ckpt_path={bad}"))
    assert returncode != 0 and ("not a usable checkpoint" in output or "refuses to load" in output or "is empty" in output)
    assert not marker.exists()
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_atomic_save_keeps_the_previous_checkpoint_when_a_write_fails(tmp_path, monkeypatch) -> None:
    target = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, target)
    real_save = torch.save

    def dies_midway(obj, file, *args, **kwargs):
        file.write(b"partial bytes")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, target)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.equal(load_checkpoint_file(target)["state_dict"]["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_non_finite_outputs_are_wrong_not_argmax_of_nan() -> None:
    logits = torch.tensor([[[0.0, 2.0, 1.0], [float("nan"), 0.0, 1.0], [0.0, float("inf"), 1.0], [float("-inf"), 3.0, 1.0]]])
    targets = torch.tensor([1, 0, 1, 1])
    # By hand: right; NaN (argmax of NaN would say class 0 = right); +inf; a -inf below a finite maximum is fine.
    assert correctness(logits, (None, targets)).tolist() == [[1.0, 0.0, 0.0, 1.0]]


def test_score_function_returning_a_float_says_what_to_return() -> None:
    from m2n2_lightning import MLP, Evaluator

    evaluator = Evaluator(MLP(4, 3, 2), torch.randn(5, 4), torch.zeros(5, dtype=torch.long), score_fn=lambda o, b: 0.5)
    with pytest.raises(TypeError, match=r"return a Tensor of shape \[k=2, N=5\]"):
        evaluator(torch.zeros(2, 23))


def test_labels_out_of_range_fail_before_any_step(tmp_path) -> None:
    from m2n2_lightning.stopping import check_labels

    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\).*\[0, 12\]"):
        check_labels(torch.tensor([0, 3, 12]), 10)
    check_labels(torch.tensor([0, 9]), 10)
