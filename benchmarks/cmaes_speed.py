"""Seconds per CMA-ES generation: pycma (the paper's implementation) vs CMAESStrategy.

    python benchmarks/cmaes_speed.py                      # D = 19,210 (the paper's MLP), popsize 20, CPU
    python benchmarks/cmaes_speed.py --device cuda        # ours on the GPU (pycma stays on the CPU)

Each implementation runs in a fresh process, so that its peak resident memory
can be reported; ask/tell are timed with random scores (the fitness
evaluation is not part of the strategy's cost). pycma is slow at this size,
so only a few of its generations are timed. At D = 19,210 neither
implementation eigendecomposes C in the timed generations (pycma's lazy gap
is 179 generations); its cost is timed separately with --eigh.
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import sys
import time


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def time_pycma(dim: int, popsize: int, generations: int) -> dict:
    import cma
    import numpy as np

    start = time.perf_counter()
    x0 = np.random.default_rng(0).normal(0, 0.01, dim)
    es = cma.CMAEvolutionStrategy(x0, 0.01, {"popsize": popsize, "seed": 1, "verbose": -9})
    setup = time.perf_counter() - start
    rng = np.random.default_rng(1)
    times = []
    for _ in range(generations):
        start = time.perf_counter()
        solutions = es.ask()
        es.tell(solutions, list(-rng.random(popsize)))
        times.append(time.perf_counter() - start)
    return {
        "setup": setup,
        "times": times,
        "rss": peak_rss_gib(),
        "gap": es.sm.lazy_update_gap,
        "decompositions": es.sm.count_eigen,
    }


def time_ours(
    dim: int, popsize: int, generations: int, device: str, diagonal: bool, eigh: bool, threads: int | None
) -> dict:
    import torch

    from m2n2_lightning.strategies.cmaes import CMAESStrategy

    if threads is not None:
        torch.set_num_threads(threads)

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    start = time.perf_counter()
    strategy = CMAESStrategy(num_params=dim, popsize=popsize, diagonal=diagonal).to(device)
    strategy.start(lambda candidates: None)  # CMA-ES scores nothing at the start: it only draws its mean
    sync()
    setup = time.perf_counter() - start
    generator = torch.Generator(device=device).manual_seed(1)
    times, decompositions = [], 0
    for _ in range(generations):
        start = time.perf_counter()
        decomposed_at = strategy.eigen_updated_at
        candidates = strategy.ask()
        decompositions += strategy.eigen_updated_at != decomposed_at
        strategy.tell(candidates, torch.rand(popsize, 1, generator=generator, device=device))
        sync()
        times.append(time.perf_counter() - start)
    eigh_seconds = None
    if eigh and not strategy.diagonal:
        start = time.perf_counter()
        strategy.eigen_updated_at = strategy.generation - strategy.params.eigen_update_gap - 1
        strategy.ask()
        sync()
        eigh_seconds = time.perf_counter() - start
    gpu_peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    return {
        "setup": setup,
        "times": times,
        "rss": peak_rss_gib(),
        "gpu": gpu_peak,
        "gap": strategy.params.eigen_update_gap if not strategy.diagonal else None,
        "decompositions": decompositions,
        "eigh": eigh_seconds,
    }


def in_fresh_process(function, *args) -> dict:
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(function, args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=19_210)
    parser.add_argument("--popsize", type=int, default=20)
    parser.add_argument("--pycma-generations", type=int, default=3)
    parser.add_argument("--generations", type=int, default=50, help="generations of ours")
    parser.add_argument("--device", default="cpu", help="device of ours")
    parser.add_argument("--eigh", action="store_true", help="also time one eigendecomposition of C (ours)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads for ours (default: torch's)")
    parser.add_argument("--skip-pycma", action="store_true")
    args = parser.parse_args()

    rows = []
    if not args.skip_pycma:
        pycma = in_fresh_process(time_pycma, args.dim, args.popsize, args.pycma_generations)
        rows.append(("pycma (numpy, CPU)", pycma))
    for diagonal in (False, True):
        name = f"ours, {'separable' if diagonal else 'full'} ({args.device})"
        result = in_fresh_process(
            time_ours, args.dim, args.popsize, args.generations, args.device, diagonal, args.eigh, args.threads
        )
        rows.append((name, result))

    import torch

    threads = args.threads or torch.get_num_threads()
    print(f"\nCMA-ES, D = {args.dim:,}, popsize {args.popsize}, {threads} torch thread(s); s per generation\n")
    print("| implementation | generations | setup s | first s | mean s after the first | peak RSS GiB | GPU peak GiB |")
    print("|---|---|---|---|---|---|---|")
    for name, result in rows:
        times = result["times"]
        rest = times[1:] or times
        gpu = f"{result['gpu']:.2f}" if result.get("gpu") is not None else "-"
        print(
            f"| {name} | {len(times)} | {result['setup']:.2f} | {times[0]:.3f} | {sum(rest) / len(rest):.3f} "
            f"| {result['rss']:.2f} | {gpu} |"
        )
    for name, result in rows:
        if result["gap"] is not None:
            print(
                f"\n{name}: C is eigendecomposed every {result['gap']:.1f} generations, "
                f"{result['decompositions']} times in the timed ones",
                end="",
            )
    for name, result in rows:
        if result.get("eigh") is not None:
            print(f"\n{name}: one eigendecomposition takes {result['eigh']:.1f} s", end="")
    print()


if __name__ == "__main__":
    sys.exit(main())
