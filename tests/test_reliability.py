"""Faults and bad input: stopping, resuming and failing never lose, corrupt or silently change a run.

Signals are delivered to real `train.py` subprocesses; resumed runs are compared bit for bit
with uninterrupted ones through the strategy state in their final `last.ckpt`. The same faults
through `Trainer.fit` with `M2N2Callback`, and a DDP rank that stops responding, are in
test_fault_injection.py.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from functools import partial

import pytest
import torch
from conftest import Classifier, make_trainer
from faults import (
    CHILD_ENV,
    assert_same_state,
    bad_checkpoint,
    finish,
    start_train,
    strategy_state,
    wait_for,
)

from m2n2_lightning import CMAESStrategy, M2N2Callback, M2N2Strategy
from m2n2_lightning.checkpointing import AtomicCheckpointIO, load_checkpoint_file
from m2n2_lightning.data import DigitsDataModule
from m2n2_lightning.scoring import correctness

#: A writer that dies mid-write: its torch.save writes a few bytes, signals the test and waits to be killed.
KILLED_WRITER = """
import sys, time, torch
from pathlib import Path
from m2n2_lightning.checkpointing import AtomicCheckpointIO

def stalls(obj, file, *args, **kwargs):
    file.write(b"the first bytes of a checkpoint")
    file.flush()
    Path(sys.argv[2]).touch()
    time.sleep(120)

torch.save = stalls
AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, Path(sys.argv[1]))
"""


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
@pytest.mark.parametrize(("signum", "code", "step"), [(signal.SIGINT, 130, 1), (signal.SIGTERM, 143, 60)])
def test_a_signal_stops_at_a_step_boundary_and_resumes_exactly(tmp_path, uninterrupted, signum, code, step) -> None:
    # Early (right after the first training step) and later in the run; faults.PauseAfter waits
    # at that step until the signal has arrived.
    marker = tmp_path / "paused"
    pause = f"+callbacks.pause={{_target_: faults.PauseAfter, step: {step}, marker: '{marker}'}}"
    process = start_train(tmp_path, "forward_passes=1473", pause)
    wait_for(marker, process)
    process.send_signal(signum)
    returncode, output = finish(process)
    assert returncode == code, output[-3000:]
    interrupted = tmp_path / "checkpoints" / "interrupted.ckpt"
    name = signal.Signals(signum).name
    assert f"Stopped by {name} after training step {step}: resume with ckpt_path={interrupted}" in output
    assert load_checkpoint_file(interrupted)["global_step"] == step
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


@pytest.mark.parametrize(
    ("content", "message"),
    [("crafted", "refuses to load .*it could run code"), ("empty", "is empty"),
     ("truncated", "not a usable checkpoint")],
)
def test_bad_checkpoints_are_refused_without_running_code(tmp_path, content, message) -> None:
    bad, marker = bad_checkpoint(tmp_path, content)
    with pytest.raises(ValueError, match=message):
        load_checkpoint_file(bad)
    assert not marker.exists()


def test_random_bytes_are_never_a_checkpoint(tmp_path) -> None:
    # torch's unpickler fails on random bytes in many ways (UnpicklingError mostly, IndexError, UnicodeDecodeError
    # and KeyError in about 6%, 1.4% and 1% of 4 KB files): each must be the same clear ValueError.
    for seed in range(300):
        bad, _ = bad_checkpoint(tmp_path, "random", seed)
        with pytest.raises(ValueError, match="is not a usable checkpoint"):
            load_checkpoint_file(bad)


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
    from m2n2_lightning.checks import check_labels

    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\).*\[0, 12\]"):
        check_labels(torch.tensor([0, 3, 12]), 10)
    check_labels(torch.tensor([0, 9]), 10)


def dead_pid() -> int:
    """The pid of a process that has ended (and was reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_save_removes_the_leftovers_of_dead_writers_only(tmp_path) -> None:
    host = socket.gethostname()
    dead = tmp_path / f".last.ckpt.{host}-{dead_pid()}-abc.tmp"
    alive = tmp_path / f".last.ckpt.{host}-{os.getpid()}-def.tmp"  # a writer still at work (this process)
    other_host = tmp_path / f".last.ckpt.elsewhere-{dead_pid()}-ghi.tmp"  # its pid means nothing here
    for leftover in (dead, alive, other_host):
        leftover.write_bytes(b"partial")
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(3)}}, tmp_path / "last.ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["last.ckpt", alive.name, other_host.name])


@pytest.mark.slow
def test_a_writer_killed_mid_write_leaves_the_previous_checkpoint(tmp_path) -> None:
    target, writing = tmp_path / "last.ckpt", tmp_path / "writing"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, target)
    process = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(target), str(writing)], env=CHILD_ENV)
    try:
        wait_for(writing, process)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert torch.equal(load_checkpoint_file(target)["state_dict"]["w"], torch.ones(3))  # the previous one, whole
    (leftover,) = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert f"-{process.pid}-" in leftover  # the killed writer's partial file, beside the target ...
    io.save_checkpoint({"state_dict": {"w": torch.full((3,), 2.0)}}, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "writing"]  # ... gone at the next save


@pytest.fixture(scope="module")
def m2n2_checkpoint(tmp_path_factory) -> tuple:
    """A checkpoint of 3 training steps of M2N2 on a Classifier (through the callback)."""
    root = tmp_path_factory.mktemp("m2n2_checkpoint")
    trainer = make_trainer(root, 3, [M2N2Callback(strategy=partial(M2N2Strategy, pop_size=4, seed=0), heatmap=False)])
    trainer.fit(Classifier(hidden=8), datamodule=DigitsDataModule(steps_per_epoch=3))
    trainer.save_checkpoint(root / "m2n2.ckpt")
    return root / "m2n2.ckpt"


@pytest.mark.parametrize(
    ("allow", "message"),
    [(False, "strategy: 'M2N2Strategy' in the checkpoint, 'CMAESStrategy' now"),
     (True, "the checkpoint's strategy state does not fit CMAESStrategy")],
)
def test_a_checkpoint_of_another_strategy_is_named_not_a_key_error(tmp_path, m2n2_checkpoint, allow, message) -> None:
    callback = M2N2Callback(
        strategy=partial(CMAESStrategy, popsize=4, diagonal=True, seed=0), allow_resume_changes=allow, heatmap=False
    )
    trainer = make_trainer(tmp_path, 6, [callback])
    with pytest.raises(ValueError, match=message):
        trainer.fit(Classifier(hidden=8), datamodule=DigitsDataModule(steps_per_epoch=6), ckpt_path=m2n2_checkpoint)
    assert trainer.global_step == 0


def test_a_crafted_checkpoint_given_to_fit_runs_no_code(tmp_path, monkeypatch) -> None:
    bad, marker = bad_checkpoint(tmp_path, "crafted")
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # torch's own default would then run it
    trainer = make_trainer(tmp_path, 3, [M2N2Callback(heatmap=False)])
    with pytest.raises(ValueError, match="refuses to load"):
        trainer.fit(Classifier(hidden=8), datamodule=DigitsDataModule(steps_per_epoch=3), ckpt_path=bad)
    assert not marker.exists()


def test_bad_settings_fail_when_the_callback_is_built(tmp_path) -> None:
    with pytest.raises(ValueError, match="foo"):
        M2N2Callback(score_fn="foo")
    with pytest.raises(ValueError, match="chunk_size must be an integer >= 1, got 0"):
        M2N2Callback(chunk_size=0)


def test_labels_out_of_range_fail_through_fit_before_any_step(tmp_path) -> None:
    x, y = DigitsDataModule().train_tensors
    callback = M2N2Callback(resources=(x[:50], torch.cat([y[:49], torch.tensor([12])])), heatmap=False)
    trainer = make_trainer(tmp_path, 3, [callback])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\).*got labels in \[0, 12\]"):
        trainer.fit(Classifier(hidden=8), datamodule=DigitsDataModule(steps_per_epoch=3))
    assert trainer.global_step == 0 and callback.strategy.forward_passes == 0


@pytest.mark.parametrize(("content", "message"), [("crafted", "refuses to load"), ("empty", "is empty"),
                                                  ("random", "not a usable checkpoint")])
def test_load_from_checkpoint_never_runs_code_and_says_what_is_wrong(tmp_path, monkeypatch, content, message) -> None:
    from m2n2_lightning import MLP, EvolutionModule

    bad, marker = bad_checkpoint(tmp_path, content)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # torch's own default would then run the payload
    with pytest.raises(ValueError, match=message):
        EvolutionModule.load_from_checkpoint(bad, model=MLP(64, 8, 10))
    assert not marker.exists()
