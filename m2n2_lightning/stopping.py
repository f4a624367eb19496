"""Stopping cleanly: signals turned into a stop at the next evolution-step boundary."""

from __future__ import annotations

import signal
import threading
from typing import Any

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
