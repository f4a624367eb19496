"""Peak memory and checkpoint size of the dense and the coefficient archive, merging two seed models.

docs/ALGORITHM.md ("Memory", section 4.1): the archive's memory grows with its size P.
When seeds are merged without mutation, `storage="coefficients"` keeps every
member as a mixture of the seeds, so the memory should not grow with P and the
checkpoint of the whole evolutionary state is kilobytes. This measures both on
the CPU: a stack of Linear layers (10.5 million parameters), two seeds (two
initialisations), P = 5, 20 and 80, 50 merge steps, each child scored by a
forward pass on a small batch. Every configuration runs in a fresh subprocess
that reports its peak resident set (VmHWM) before it writes its checkpoint.

    OMP_NUM_THREADS=1 python benchmarks/archive_memory.py

Writes benchmarks/results/archive_memory.md and fails (exit 1) when the
coefficient archive's peak RSS grows by more than 10% from P = 5 to P = 80.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from m2n2_lightning import FlatParams, M2N2Strategy
from m2n2_lightning.strategies.children import Children

WIDTH, DEPTH, BATCH, CLASSES = 1024, 10, 32, 10
POP_SIZES = (5, 20, 80)
STORAGES = ("dense", "coefficients")
STEPS = 50
RESULTS = Path(__file__).parent / "results" / "archive_memory.md"
COMMAND = "OMP_NUM_THREADS=1 python benchmarks/archive_memory.py"


def make_model(seed: int) -> nn.Sequential:
    """DEPTH Linear layers of WIDTH x WIDTH with ReLUs between them, initialised from `seed`."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(DEPTH):
        layers += [nn.Linear(WIDTH, WIDTH)] + ([nn.ReLU()] if i < DEPTH - 1 else [])
    return nn.Sequential(*layers)


def peak_rss_bytes() -> int:
    """The process's peak resident set so far (VmHWM of /proc/self/status)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def measure(storage: str, pop_size: int) -> dict[str, float]:
    """One configuration: build, start, STEPS merge steps, then the peak RSS and the checkpoint size."""
    torch.set_num_threads(1)
    model = make_model(0)
    flat = FlatParams(model)
    seeds = [flat.flatten(make_model(seed)).detach() for seed in (1, 2)]
    inputs = torch.randn(BATCH, WIDTH, generator=torch.Generator().manual_seed(3))
    targets = torch.randint(0, CLASSES, (BATCH,), generator=torch.Generator().manual_seed(4))

    @torch.no_grad()
    def score(children: Children) -> torch.Tensor:
        """Correctness of the first CLASSES outputs on the batch, child by child (each written into one working model)."""
        rows = []
        for index in range(len(children)):
            children.load_into(index, model, flat)
            rows.append((model(inputs)[:, :CLASSES].argmax(dim=1) == targets).float())
        return torch.stack(rows)

    strategy = M2N2Strategy(flat.num_params, pop_size=pop_size, init_models=seeds, storage=storage, seed=0)
    began = time.perf_counter()
    strategy.start(score)
    for _ in range(STEPS):
        children = strategy.ask()
        strategy.tell(children, score(children))
        del children
    seconds = time.perf_counter() - began
    peak = peak_rss_bytes()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "state.pt")
        torch.save(strategy.state_dict(), path)
        checkpoint = os.path.getsize(path)
    return {"num_params": flat.num_params, "peak_rss": peak, "checkpoint": checkpoint, "seconds": seconds}


def run_fresh(storage: str, pop_size: int) -> dict[str, float]:
    """`measure` in a fresh Python process, so that each peak RSS is its own."""
    command = [sys.executable, __file__, "--one", storage, str(pop_size)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(results: dict[tuple[str, int], dict[str, float]]) -> list[str]:
    lines = [
        "| storage | P | peak RSS (MiB) | checkpoint (bytes) | 50 steps (s) |",
        "|---|---|---|---|---|",
    ]
    for (storage, pop_size), result in results.items():
        lines.append(
            f"| {storage} | {pop_size} | {result['peak_rss'] / 2**20:,.0f} | {result['checkpoint']:,} | "
            f"{result['seconds']:.1f} |"
        )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", nargs=2, metavar=("STORAGE", "P"), help="measure one configuration (internal)")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]))))
        return 0
    results = {}
    for storage in STORAGES:
        for pop_size in POP_SIZES:
            results[(storage, pop_size)] = run_fresh(storage, pop_size)
            print(storage, pop_size, results[(storage, pop_size)], flush=True)
    smallest, largest = (results[("coefficients", pop_size)]["peak_rss"] for pop_size in (POP_SIZES[0], POP_SIZES[-1]))
    growth = largest / smallest - 1
    passed = growth <= 0.10
    num_params = results[("dense", POP_SIZES[0])]["num_params"]
    report = [
        "# Archive memory: dense vs coefficient storage",
        "",
        f"Model: {DEPTH} Linear layers {WIDTH} x {WIDTH} (D = {num_params:,} parameters, float32), two seeds "
        f"(two initialisations), {STEPS} merge steps (no mutation), each child scored on {BATCH} inputs; "
        "one CPU thread; every row a fresh process. Peak RSS is VmHWM before the checkpoint is written; "
        "the checkpoint is `torch.save(strategy.state_dict())`.",
        "",
        *table(results),
        "",
        f"Coefficient archive, peak RSS from P = {POP_SIZES[0]} to {POP_SIZES[-1]}: {growth:+.1%} "
        f"({'pass' if passed else 'FAIL'}: at most +10%). The dense archive's members alone are P x D x 4 bytes "
        f"= {POP_SIZES[-1] * num_params * 4 / 2**20:,.0f} MiB at P = {POP_SIZES[-1]}.",
        "",
        "Command:",
        "",
        f"    {COMMAND}",
        "",
    ]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(report))
    print("\n".join(report))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
