"""Seconds to write one mixture of two seeds (`mixture.mix`) over 100M bf16 coordinates, by chunk size, beside a
plain copy of one seed (the memory-bandwidth floor of writing a model).

    python benchmarks/mix_chunks.py [--threads 2] [--coordinates 100000000]
"""

from __future__ import annotations

import argparse
import time

import torch

import m2n2_lightning.strategies.mixture as mixture


def best_of(repeats: int, run) -> float:
    """The fastest of `repeats` timed calls of `run` (after one warm-up call)."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--coordinates", type=int, default=100_000_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    seeds = torch.empty(2, args.coordinates, dtype=torch.bfloat16).normal_()
    out = torch.empty(args.coordinates, dtype=torch.bfloat16)
    for bits in (16, 18, 20, 22):
        mixture.MIX_CHUNK = 1 << bits
        seconds = best_of(args.repeats, lambda: mixture.mix([seeds[0], seeds[1]], [0.3, 0.71], out))
        print(f"chunk 2^{bits}: {seconds:.3f} s")
    print(f"copy of one seed: {best_of(args.repeats, lambda: out.copy_(seeds[0])):.3f} s")


if __name__ == "__main__":
    main()
