"""Faults injected into real processes: signals to a `Trainer.fit` with `M2N2Callback`, and a DDP rank that stops.

The Python path runs tests/interrupt_run.py (a user's script: a LightningModule,
the callback, a ModelCheckpoint and an InterruptCheckpoint); the signal is sent
once the child has reached a known training step and waits there (`faults.PauseAfter`).
The DDP case runs train.py on two CPU processes (gloo) and stops one with SIGSTOP.
"""

from __future__ import annotations

import os
import signal
import time
from datetime import timedelta
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import Classifier, make_trainer
from faults import (
    assert_same_state,
    finish,
    start_script,
    start_train,
    strategy_state,
    wait_for,
)
from hydra.utils import instantiate
from interrupt_run import STEPS, STEPS_PER_BATCH
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy
from test_train import compose_config

from m2n2_lightning import M2N2Callback, M2N2Strategy
from m2n2_lightning.checkpointing import load_checkpoint_file
from m2n2_lightning.data import DigitsDataModule
from m2n2_lightning.distributed import EvolutionDDPStrategy, RankTimeoutError, lost_rank
from m2n2_lightning.stopping import SignalStop, StopOnSignal

#: gloo's messages, as a collective whose peer was stopped raised them (torch 2.13): the first, then the next one.
GLOO_TIMEOUT = "[gloo/transport/tcp/unbound_buffer.cc:129] Timed out waiting 20000ms for send operation to complete"
GLOO_CLOSED = "Application timeout caused pair closure"

#: Forward passes per training step of interrupt_run.py: evolution steps x candidates per step.
PASSES_PER_STEP = STEPS_PER_BATCH * M2N2Strategy(num_params=2, pop_size=8).candidates_per_step


@pytest.fixture(scope="module")
def python_uninterrupted(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("python_uninterrupted")
    code, output = finish(start_script("interrupt_run.py", str(out)))
    assert code == 0, output[-3000:]
    return torch.load(out / "final.pt", weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("stop", "code", "step"),
    [("SIGINT", 130, 1), ("SIGINT", 130, 7), ("SIGTERM", 143, 7), ("exception", 1, 7)],
)
def test_a_stop_of_a_python_fit_comes_at_its_step_and_resumes_exactly(
    tmp_path, python_uninterrupted, stop, code, step
) -> None:
    stopped = tmp_path / "stopped"
    if stop == "exception":
        returncode, output = finish(start_script("interrupt_run.py", str(stopped), "--fail-after", str(step)))
        cause = "Failed (RuntimeError)"
    else:
        process = start_script("interrupt_run.py", str(stopped), "--pause-after", str(step))
        wait_for(stopped / "paused", process)
        process.send_signal(signal.Signals[stop])
        returncode, output = finish(process)
        cause = f"Stopped by {stop}"
    assert returncode == code, output[-3000:]
    interrupted = stopped / "checkpoints" / "interrupted.ckpt"
    assert f"{cause} after training step {step}: resume with ckpt_path={interrupted}" in output
    assert load_checkpoint_file(interrupted)["global_step"] == step  # the step boundary it stopped at
    total = python_uninterrupted["_extra_state"]["forward_passes"]
    done = strategy_state(interrupted)["_extra_state"]["forward_passes"]
    assert done == total - (STEPS - step) * PASSES_PER_STEP

    resumed = tmp_path / "resumed"
    returncode, output = finish(start_script("interrupt_run.py", str(resumed), "--resume", str(interrupted)))
    assert returncode == 0, output[-3000:]
    assert f"done: {total - done} forward passes this run" in output
    assert_same_state(torch.load(resumed / "final.pt", weights_only=True), python_uninterrupted)


def children(pid: int) -> list[int]:
    """The direct child processes of `pid` (Linux /proc)."""
    tasks = Path(f"/proc/{pid}/task").iterdir()
    return [int(child) for task in tasks for child in (task / "children").read_text().split()]


def local_rank(pid: int) -> str | None:
    """The LOCAL_RANK in a process's environment (how Lightning's launcher tells its children apart)."""
    entries = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return next((e.split(b"=", 1)[1].decode() for e in entries if e.startswith(b"LOCAL_RANK=")), None)


@pytest.mark.slow
def test_a_stopped_ddp_rank_makes_the_others_fail_within_the_timeout(tmp_path) -> None:
    timeout = 20
    run_dir, log = tmp_path / "run", tmp_path / "output.log"
    with log.open("w") as output:  # a file, not a pipe: the stopped rank would hold a pipe open
        launcher = start_train(
            run_dir, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
            f"trainer.strategy.timeout={timeout}", "forward_passes=1000000", output=output,
        )
    ranks: list[int] = []
    try:
        wait_for(run_dir / "checkpoints" / "last.ckpt", launcher, timeout=240)  # both ranks are stepping
        ranks = children(launcher.pid)
        (rank_1,) = [pid for pid in ranks if local_rank(pid) == "1"]
        os.kill(rank_1, signal.SIGSTOP)
        stopped_at = time.monotonic()
        returncode = launcher.wait(timeout=timeout + 120)
        elapsed = time.monotonic() - stopped_at
    finally:
        for pid in ranks:
            for signum in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(pid, signum)
                except ProcessLookupError:
                    pass
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    text = log.read_text()
    assert returncode != 0, text[-3000:]
    assert timeout - 1 <= elapsed <= timeout + 45, (elapsed, text[-3000:])
    assert f"the other ranks did not answer within the collective timeout of {timeout} s" in text, text[-3000:]
    assert "a rank stopped responding" in text and "trainer.strategy.timeout=<seconds>" in text
    # rank zero saved the state of the last finished step, without waiting for the lost rank
    interrupted = run_dir / "checkpoints" / "interrupted.ckpt"
    assert "Failed (RankTimeoutError) after training step" in text and f"resume with ckpt_path={interrupted}" in text
    assert load_checkpoint_file(interrupted)["global_step"] > 0


def test_a_signal_is_a_stop_at_the_next_boundary_with_the_shell_exit_status() -> None:
    previous = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    stop = StopOnSignal()
    stop.install()
    try:
        stop.check()  # nothing received: no stop
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signal == signal.SIGTERM
        with pytest.raises(SignalStop) as stopped:
            stop.check()
        assert isinstance(stopped.value, SystemExit) and stopped.value.code == 128 + 15
        os.kill(os.getpid(), signal.SIGINT)  # while the stop is under way (saving): ignored, no KeyboardInterrupt
        assert stop.signal == signal.SIGTERM
    finally:
        stop.restore()
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == previous


def test_a_second_ctrl_c_stops_at_once() -> None:
    stop = StopOnSignal()
    stop.install()
    try:
        os.kill(os.getpid(), signal.SIGINT)  # the first: noted, the step goes on
        assert stop.signal == signal.SIGINT
        with pytest.raises(SignalStop) as stopped:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler raises here at the latest
        assert stopped.value.code == 128 + 2
    finally:
        stop.restore()


class TerminatedAtTrainStart(Callback):
    """Send this process SIGTERM when training starts, while Lightning's own SIGTERM handler is installed."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        os.kill(os.getpid(), signal.SIGTERM)


def test_a_sigterm_lightning_caught_before_the_first_step_stops_before_it(tmp_path) -> None:
    previous = signal.getsignal(signal.SIGTERM)
    evolution = M2N2Callback(heatmap=False)
    trainer = make_trainer(tmp_path, 3, [TerminatedAtTrainStart(), evolution])
    with pytest.raises(SignalStop) as stopped:  # not Lightning's SIGTERMException, which exits 0
        trainer.fit(Classifier(hidden=8), datamodule=DigitsDataModule(steps_per_epoch=3))
    assert stopped.value.code == 128 + 15 and evolution.stop_signal == signal.SIGTERM
    assert trainer.global_step == 0 and evolution.strategy.forward_passes == evolution.forward_passes_at_start
    assert signal.getsignal(signal.SIGTERM) == previous


def test_the_ddp_timeout_is_one_config_key_in_seconds() -> None:
    configured = instantiate(compose_config("trainer=ddp", "trainer.strategy.timeout=20").trainer.strategy)
    assert isinstance(configured, EvolutionDDPStrategy) and configured._timeout == timedelta(seconds=20)
    default = instantiate(compose_config("trainer=ddp").trainer.strategy)
    by_name = L.Trainer(strategy="ddp_evolution", accelerator="cpu", devices=2, logger=False).strategy
    # the same 5 minutes from the config, the class and the registered name (DDP's own default is 30)
    assert default._timeout == EvolutionDDPStrategy()._timeout == by_name._timeout == timedelta(minutes=5)
    assert EvolutionDDPStrategy(timeout=timedelta(seconds=7))._timeout == timedelta(seconds=7)


@pytest.mark.parametrize("bad", [0, -5, float("nan"), float("inf"), "20", True, timedelta(0)])
def test_a_bad_ddp_timeout_is_refused_naming_the_key(bad) -> None:
    with pytest.raises(ValueError, match=r"positive number of seconds.*trainer\.strategy\.timeout=300"):
        EvolutionDDPStrategy(timeout=bad)


def test_a_collective_that_lost_its_peer_says_so_and_names_the_timeout(monkeypatch) -> None:
    assert lost_rank(RuntimeError(GLOO_TIMEOUT)) and lost_rank(RuntimeError(GLOO_CLOSED))
    assert not lost_rank(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not lost_rank(ValueError(GLOO_TIMEOUT))
    strategy = EvolutionDDPStrategy(timeout=20)

    def barrier_fails(self, *args, **kwargs):
        raise RuntimeError(GLOO_TIMEOUT)

    monkeypatch.setattr(DDPStrategy, "barrier", barrier_fails)
    named = r"collective timeout of 20 s, or closed their connection \(in a barrier\): a rank stopped responding"
    with pytest.raises(RankTimeoutError, match=named):
        strategy.barrier("x")

    def reduce_fails(self, *args, **kwargs):
        raise RuntimeError("some other failure")

    monkeypatch.setattr(DDPStrategy, "reduce", reduce_fails)
    with pytest.raises(RuntimeError, match="some other failure") as other:
        strategy.reduce(torch.ones(1))
    assert type(other.value) is RuntimeError  # not a lost rank: passed on unchanged
