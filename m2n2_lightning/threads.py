"""How many intra-op threads a run uses: few for small steps, and only the cores actually free.

Torch's OpenMP threads spin while they wait; on a machine where another process
keeps a core busy, a thread per core then runs several times slower than one
thread. train.py therefore sets `OMP_WAIT_POLICY=PASSIVE` before torch loads
(unless the user set it) and picks the thread count here.
"""

from __future__ import annotations

import os

#: Below this many multiply-adds per scored candidate (D x N), one thread: the step is too small to share.
SMALL_PROBLEM = 50_000_000


def free_cores() -> int:
    """Cores this process may use, minus those other processes keep busy (the 1-minute load average)."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    busy = round(os.getloadavg()[0]) if hasattr(os, "getloadavg") else 0
    return max(1, min(usable, usable - busy + 1))  # +1: this process itself may be in the load


def auto_threads(num_params: int, num_resources: int) -> int:
    """One thread for small problems (the digits MLP), else the free cores."""
    return 1 if num_params * num_resources < SMALL_PROBLEM else free_cores()
