"""Stopping cleanly: signals turned into a stop at the next evolution-step boundary; a stop before the budget
that a callback asked for (a `Timer`, `EarlyStopping`) says which one, at what count, and how to continue."""

from __future__ import annotations

import os
import signal
import threading
from datetime import timedelta
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, EarlyStopping, Timer
from lightning.pytorch.utilities import rank_zero_info

#: The signals that stop a run at a step boundary.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def exit_code(signum: int) -> int:
    """The shell's convention for a process stopped by a signal: 128 + its number (130 SIGINT, 143 SIGTERM)."""
    return 128 + int(signum)


class SignalStop(SystemExit):
    """Raised at a training-step boundary after SIGINT or SIGTERM: a `SystemExit` whose code is `exit_code(signum)`.

    Like Lightning's own `SIGTERMException` (also a `SystemExit`), it goes through
    Lightning's exception handling: every callback's `on_exception` runs (an
    `InterruptCheckpoint` saves), the trainer tears down, and `trainer.fit`
    re-raises it, so a script that does not catch it exits 130 / 143, as the
    shell reports a process killed by that signal. (A bare `KeyboardInterrupt`
    would make Lightning exit 1 for both signals.)
    """

    def __init__(self, signum: int) -> None:
        super().__init__(exit_code(signum))
        self.signum = int(signum)

    def __str__(self) -> str:
        return f"stopped by {signal.Signals(self.signum).name} (exit status {self.code})"


class StopOnSignal:
    """SIGINT and SIGTERM during training: note the signal, stop at the next step boundary.

    `install()` routes both signals here (main thread only; elsewhere Python
    cannot install handlers and the previous behaviour stays), `check()` at a
    step boundary raises `SignalStop` once one was received, and `restore()`
    puts the previous handlers back. A second Ctrl-C raises `SignalStop` at
    once, inside the step (the engine rolls the unfinished step back). Once
    `SignalStop` is raised, later signals are ignored until `restore()`, so
    that they cannot cut the interrupt checkpoint short (as Lightning ignores
    Ctrl-C during its own shutdown).
    """

    def __init__(self) -> None:
        #: The signal received (signal.SIGINT / SIGTERM), else None.
        self.signal: int | None = None
        self._stopping = False
        self._previous: dict[int, Any] = {}

    def install(self, received: int | None = None) -> None:
        """Take over SIGINT and SIGTERM; `received`: a signal that already arrived (else None)."""
        self.signal, self._stopping = received, False
        if threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.signal(signum, self._received) for signum in STOP_SIGNALS}

    def _received(self, signum: int, frame: Any) -> None:
        if self._stopping:
            return
        if self.signal == signal.SIGINT and signum == signal.SIGINT:
            self._stopping = True
            raise SignalStop(signum)  # a second Ctrl-C: now
        self.signal = signum

    def check(self) -> None:
        """Raise `SignalStop` if a signal was received (call at a step boundary)."""
        if self.signal is not None:
            self._stopping = True
            raise SignalStop(self.signal)

    def restore(self) -> None:
        """Put back the handlers `install` replaced."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}


class StopReport(Callback):
    """At the end of fit, when evolution stopped short of its `max_forward_passes` without a signal or an error:
    say which callback stopped it (a `Timer`, `EarlyStopping`, or whichever set `trainer.should_stop`), at what
    count, and how to continue (`resume`: the checkpoint the caller writes after fit; default: the trainer's
    `ModelCheckpoint`'s last one)."""

    def __init__(self, resume: str | os.PathLike | None = None) -> None:
        self.resume = resume
        #: The message, when one was given.
        self.message: str | None = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # also when no step ran
        from m2n2_lightning.callback import M2N2Callback  # here: the callback module imports this one

        evolution = next((c for c in trainer.callbacks if isinstance(c, M2N2Callback)), None)
        if evolution is None or evolution.max_forward_passes is None or evolution.engine is None:
            return
        done, budget = evolution.engine.forward_passes, evolution.max_forward_passes
        if done >= budget or (trainer.max_steps >= 0 and trainer.global_step >= trainer.max_steps):
            return  # the budget, or the Trainer's own max_steps, ended the run
        who, hint = stopper(trainer)
        resume = self.resume or getattr(trainer.checkpoint_callback, "last_model_path", "") or None
        where = f"ckpt_path={resume}" if resume else "a checkpoint saved now (trainer.save_checkpoint) as ckpt_path"
        self.message = f"Stopped by {who} at {done:,} of {budget:,} forward passes; to continue, resume from {where}{hint}"
        rank_zero_info(self.message)


def stopper(trainer: L.Trainer) -> tuple[str, str]:
    """(which callback stopped the run, what to change when resuming)."""
    for callback in trainer.callbacks:
        if isinstance(callback, Timer) and (callback.time_remaining() or 0) <= 0:
            return f"the Timer (duration {timedelta(seconds=round(callback._duration or 0))})", (
                " with a longer Timer duration (train.py: callbacks.timer.duration=...) or none"
            )
        if isinstance(callback, EarlyStopping) and callback.stopped_epoch > 0:
            return f"EarlyStopping on {callback.monitor!r} ({callback.stopping_reason_message or 'no improvement'})", ""
    return "a callback or the module setting trainer.should_stop", ""
