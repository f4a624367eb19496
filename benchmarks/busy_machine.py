"""`python train.py` on a quiet machine against the same run with one core kept busy.

    python benchmarks/busy_machine.py --runs "forward_passes=10000" \\
        "experiment=mnist_mlp data.train_size=5000 forward_passes=1000 data.data_dir=$M2N2_DATA_DIR"

Each run is `python train.py <overrides>` in a fresh process with the thread
count train.py picks itself (`threads: null`); the busy case starts one
process spinning on one core first and waits for the load average to see it,
as another user's job would. The rate is the run's own
`forward_passes_per_second` from summary.json. Prints a markdown table
(quiet rate, busy rate, their ratio; the issue's bar is 0.70).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def spin() -> None:
    """Keep one core busy until killed."""
    while True:
        pass


def run_train(overrides: str) -> float:
    """Run train.py once and return its forward passes per second."""
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, str(ROOT / "train.py"), *shlex.split(overrides), f"hydra.run.dir={out}", "logger=csv"]
        subprocess.run(command, check=True, cwd=out, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return json.loads((Path(out) / "summary.json").read_text())["forward_passes_per_second"]


def wait_for_load(low: float, high: float, timeout: float = 180.0) -> None:
    """Wait until the 1-minute load average is in [low, high] (train.py reads it to pick its threads)."""
    start = time.monotonic()
    while not low <= os.getloadavg()[0] <= high and time.monotonic() - start < timeout:
        time.sleep(2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=["forward_passes=10000"], help="train.py overrides, one string a run")
    parser.add_argument("--repeats", type=int, default=2, help="quiet/busy pairs per run, alternating")
    args = parser.parse_args()
    print("| run | quiet fp/s | busy fp/s | busy / quiet |\n|---|---|---|---|")
    for overrides in args.runs:
        quiet, busy = [], []
        for _ in range(args.repeats):
            wait_for_load(0.0, 0.5)
            quiet.append(run_train(overrides))
            spinner = multiprocessing.Process(target=spin, daemon=True)
            spinner.start()
            try:
                wait_for_load(0.9, 1.5)
                busy.append(run_train(overrides))
            finally:
                spinner.terminate()
                spinner.join()
        q, b = sum(quiet) / len(quiet), sum(busy) / len(busy)
        runs = ", ".join(f"{x:.0f}/{y:.0f}" for x, y in zip(quiet, busy))
        print(f"| `{overrides}` | {q:.1f} | {b:.1f} | {b / q:.2f} (pairs: {runs}) |", flush=True)


if __name__ == "__main__":
    main()
