"""Stopping cleanly: signals turned into a stop at the next evolution-step boundary, and early input checks."""

from __future__ import annotations

import signal
import threading
from typing import Any, Callable

from torch import Tensor

#: The signals that stop a run at a step boundary.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def install_stop_handlers(handler: Callable[[int, Any], None]) -> dict[int, Any]:
    """Route SIGINT and SIGTERM to `handler` (main thread only); returns the previous handlers."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {signum: signal.signal(signum, handler) for signum in STOP_SIGNALS}


def restore_handlers(previous: dict[int, Any]) -> None:
    """Put back what `install_stop_handlers` replaced."""
    for signum, handler in previous.items():
        signal.signal(signum, handler)


def exit_code(signum: int) -> int:
    """The shell's convention for a process stopped by a signal: 128 + its number (130 SIGINT, 143 SIGTERM)."""
    return 128 + int(signum)


def check_labels(targets: Tensor, num_classes: int | None) -> None:
    """ValueError, before any step, when integer labels fall outside [0, num_classes)."""
    if num_classes is None or targets.is_floating_point() or targets.numel() == 0:
        return
    low, high = int(targets.min()), int(targets.max())
    if low < 0 or high >= num_classes:
        raise ValueError(
            f"resource labels must lie in [0, {num_classes}) (the data's num_classes), got labels in [{low}, {high}]; "
            "check the data or its num_classes"
        )
