"""Helpers for the fault tests (test_reliability.py, test_fault_injection.py): real subprocesses and their states.

(`from faults import ...`: pytest puts tests/ on sys.path, and the children get it on PYTHONPATH, so that
train.py can instantiate `PauseAfter` as `+callbacks.pause={_target_: faults.PauseAfter, ...}`.)
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from m2n2_lightning import M2N2Callback
from m2n2_lightning.checkpointing import AtomicCheckpointIO, load_checkpoint_file

ROOT = Path(__file__).resolve().parents[1]
#: Quiet, quick train.py runs: 10 evolution steps per training step, checkpoints every 200 forward passes.
QUICK = ("trainer.enable_progress_bar=false", "checkpoint_every=200", "log_every=100", "module.steps_per_batch=10")
#: One thread per process, unbuffered output, and the repository importable from any working directory.
CHILD_ENV = {
    **os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
    "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
}


class PauseAfter(Callback):
    """After training step `step`, write the file `marker` and wait there (at most `limit` s) for a stop signal.

    The test sends the signal once the marker exists, so it arrives at a known
    step, without racing sleeps. Put it before the evolution callback (a
    trainer callback is, in train.py and in tests/interrupt_run.py) so that
    the run stops at this very step.
    """

    def __init__(self, step: int, marker: str | Path, limit: float = 120) -> None:
        self.step, self.marker, self.limit = step, Path(marker), limit

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step != self.step:
            return
        (evolution,) = [c for c in trainer.callbacks if isinstance(c, M2N2Callback)]
        self.marker.parent.mkdir(parents=True, exist_ok=True)
        self.marker.write_text(str(self.step))
        deadline = time.monotonic() + self.limit
        while evolution.stop_signal is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no signal arrived within {self.limit} s of step {self.step}")
            time.sleep(0.01)


class FailAfter(Callback):
    """Raise a RuntimeError after training step `step`: an exception in the middle of a run."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"injected failure after step {self.step}")


def start_train(run_dir: Path, *overrides: str, output: IO[str] | None = None) -> subprocess.Popen:
    """`python train.py` with QUICK and `overrides`, its output in `run_dir`'s Hydra folder; stdout piped unless
    `output` (a file: use one where a child process may outlive the launcher and keep a pipe open)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={run_dir}", *QUICK, *overrides],
        stdout=output or subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=run_dir, env=CHILD_ENV,
    )


def start_script(script: str, *arguments: str) -> subprocess.Popen:
    """`python tests/<script> <arguments>`, stdout and stderr piped together."""
    return subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / script), *arguments],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=CHILD_ENV,
    )


def finish(process: subprocess.Popen, timeout: int = 300) -> tuple[int, str]:
    """Wait for the process; its exit status and output."""
    output, _ = process.communicate(timeout=timeout)
    return process.returncode, output


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    """Poll until `path` exists; fail if the process ends first or it takes longer than `timeout` s."""
    deadline = time.time() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()[0][-3000:] if process.stdout else process.returncode
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def strategy_state(checkpoint: Path) -> dict:
    """The evolution callback's strategy state_dict in a Lightning checkpoint."""
    content = load_checkpoint_file(checkpoint)
    (state,) = [value for key, value in content["callbacks"].items() if key.startswith("M2N2Callback")]
    return state["strategy"]


def assert_same_state(a: dict, b: dict) -> None:
    """Two strategy state_dicts are bit-identical: archive members, scores, occupancy, generator, counters."""
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    extra_a, extra_b = a["_extra_state"], b["_extra_state"]
    assert extra_a.keys() == extra_b.keys()
    for key in extra_a:
        if isinstance(extra_a[key], torch.Tensor):
            assert torch.equal(extra_a[key], extra_b[key]), key
        else:
            assert extra_a[key] == extra_b[key], key


class Payload:
    """Unpickling this creates a marker file: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def bad_checkpoint(tmp_path: Path, content: str, seed: int = 0) -> tuple[Path, Path]:
    """`tmp_path/bad.ckpt` holding `content` ("crafted": a pickle that would create `tmp_path/payload_ran`,
    "empty", "truncated", else 4096 random bytes drawn with `seed`) and the payload's marker path."""
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
        bad.write_bytes(random.Random(seed).randbytes(4096))
    return bad, marker
