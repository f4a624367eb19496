"""Merging pre-trained models at their real size: peak memory and time of the documented merge path (issue 25).

    python benchmarks/merge_scale.py --shape tiny                        # the script itself, in seconds
    python benchmarks/merge_scale.py --build-only --shapes 255m 0.5b     # build and cache the seeds
    python benchmarks/merge_scale.py --shapes 255m 0.5b --mem-cap-gb 12  # the whole grid

Seeds: Qwen2-shaped models with random weights (merge_scale_seeds.py): the
0.5B shape (Qwen2-0.5B's architecture, 494M parameters, tied embeddings), an
8-layer 255M version and a tiny one; each seed is the base plus small noise,
bf16 sharded safetensors, built once under `--seeds`. Each configuration
(shape, K seeds, pop size P, storage) is one merge through `M2N2Callback` in a
plain Trainer, then `save_merged` (merge_scale_run.py), in its own process
under `/usr/bin/time -v` with its address space capped. Grid: every shape x P x
storage with K = 2, and `--seeds-k` (K = 3, 4) with coefficients at P = 15 at
the largest shape asked for; "coefficients/files" is the coefficient storage
with the seeds left in their files (`M2N2Callback(seeds_in="files")`). A configuration whose archive cannot fit
(`--mem-cap-gb` for dense and host, the free disk for mmap) is not run; the
table gives the bytes it would need.

Columns: peak RSS / bytes of one model (bf16 parameters); the same before
`trainer.fit` (Python, torch, Lightning, transformers and the holding model); seconds per
evaluation (search wall time / evaluations); `evaluate`'s own seconds; the
library's share beside `evaluate` ((search wall time - time in `evaluate`) /
time in `evaluate`, over the search steps after the seeds are scored); seed
load (from `trainer.fit` to the first evaluation: reading the seeds and
building the archive); `save_merged`.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from merge_scale_seeds import SHAPES, build_model, build_seeds, model_bytes

from m2n2_lightning import M2N2Strategy

HERE = Path(__file__).resolve().parent
COLUMNS = ["shape", "K", "P", "storage", "status", "model_bytes", "peak_rss", "rss_per_model", "needed_bytes",
           "seconds_per_evaluation", "evaluate_seconds", "library_share", "seed_load_seconds", "save_seconds",
           "evaluations", "seed_scores", "best_score", "rss_before_fit", "rss_after_fit", "error"]


def grid(args: argparse.Namespace) -> list[tuple[str, int, int, str]]:
    """(shape, K, P, storage) of every configuration asked for."""
    configs = [(shape, 2, pop, storage) for shape in args.shapes for pop in args.pops for storage in args.storages]
    largest = max(args.shapes, key=lambda s: list(SHAPES).index(s))
    return configs + [(largest, k, 15, storage) for k in args.seeds_k for storage in ("coefficients", "coefficients/files")]


def member_bytes_per_param() -> float:
    """Bytes a dense archive holds per member and parameter for bf16 seeds (read off a small built archive)."""
    seeds = [torch.zeros(4096, dtype=torch.bfloat16), torch.ones(4096, dtype=torch.bfloat16)]
    strategy = M2N2Strategy(4096, pop_size=2, init_models=seeds, storage="dense")
    tensors = [t for t in strategy.state_dict().values() if isinstance(t, torch.Tensor)]
    return max(t.nbytes for t in tensors) / (2 * 4096)


def archive_bytes(storage: str, pop: int, num_params: int, per_param: float) -> int:
    """The bytes of a dense, host or mmap archive (0 for coefficients: kilobytes)."""
    return 0 if storage.startswith("coefficients") else int(pop * num_params * per_param)


def fits(storage: str, needed: int, cap: int, work: Path) -> bool:
    """Whether an archive of `needed` bytes fits: under the cap in memory, on the disk for mmap."""
    if storage == "mmap":
        return needed < 0.8 * shutil.disk_usage(work).free
    return needed < cap


def capped(cap: int) -> Any:
    """A preexec function limiting the child's address space to `cap` bytes (as `ulimit -v`), or to any lower
    hard limit already set."""
    def limit() -> None:
        hard = resource.getrlimit(resource.RLIMIT_AS)[1]
        resource.setrlimit(resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard))
    return limit


def peak_from_time(stderr: str) -> int:
    """'Maximum resident set size (kbytes)' of `/usr/bin/time -v`, in bytes."""
    for line in stderr.splitlines():
        if "Maximum resident set size" in line:
            return int(line.rsplit(":", 1)[1]) * 1024
    return 0


def run_one(config: tuple[str, int, int, str], args: argparse.Namespace, mapped: int) -> dict[str, Any]:
    """One configuration in a fresh process under `/usr/bin/time -v`; its row."""
    shape, k, pop, storage = config
    storage, _, seeds_in = storage.partition("/")
    command = ["/usr/bin/time", "-v", sys.executable, str(HERE / "merge_scale_run.py"), "--shape", shape,
               "--seeds-k", str(k), "--pop", str(pop), "--storage", storage, "--seeds-in", seeds_in or "memory",
               "--evaluations", str(args.evaluations),
               "--threads", str(args.threads), "--seeds", str(args.seeds), "--work", str(args.work)]
    threads = str(args.threads)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "TOKENIZERS_PARALLELISM": "false"}
    cap = int(args.mem_cap_gb * 2**30) + mapped  # files the run maps count towards its address space
    done = subprocess.run(command, check=False, capture_output=True, text=True, env=env, preexec_fn=capped(cap))
    row: dict[str, Any] = {"peak_rss": peak_from_time(done.stderr)}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        tail = [line for line in done.stderr.splitlines()
                if line.strip() and not line.startswith(("\t", "Command exited", "Command terminated"))]
        return {**row, "status": f"failed (exit {done.returncode})", "error": " | ".join(tail[-2:])}
    return {**row, **json.loads(lines[-1]), "status": "ran"}


def seed_file_bytes(shape: str, k: int, seeds: Path) -> int:
    """Bytes of the safetensors files of the first k seeds (mapped by lazy reading)."""
    return sum(f.stat().st_size for i in range(k) for f in (seeds / shape / str(i)).glob("*.safetensors"))


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """The results as a markdown table with the command that made them."""
    lines = [
        (f"`python benchmarks/merge_scale.py {' '.join(sys.argv[1:])}` ({args.threads} threads, "
         f"{args.evaluations} steps of which 5 warm-up; address space capped at {args.mem_cap_gb} GB plus mapped files)"),
        "",
        ("| shape | K | P | storage | peak RSS / model | before fit / model | s / evaluation | evaluate s | "
         "library share | seed load s | save_merged s | seed scores | best score |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        head = f"| {row['shape']} | {row['K']} | {row['P']} | {row['storage']} |"
        if row["status"] != "ran":
            why = f"{row['status']}: {row['error'][-120:]}" if row["status"] != "not run" else \
                f"not run: the archive needs {row['needed_bytes'] / 1e9:.3g} GB"
            lines.append(f"{head} {why} | | | | | | | | |")
            continue
        lines.append(
            f"{head} {row['rss_per_model']:.2f} | {row['rss_before_fit'] / row['model_bytes']:.2f} | "
            f"{row['seconds_per_evaluation']:.2f} | {row['evaluate_seconds']:.2f} | "
            f"{row['library_share']:.0%} | {row['seed_load_seconds']:.1f} | {row['save_seconds']:.1f} | "
            f"{', '.join(f'{s:.3f}' for s in row['seed_scores'])} | {row['best_score']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", "--shape", nargs="+", default=["255m", "0.5b"], choices=list(SHAPES))
    parser.add_argument("--pops", nargs="+", type=int, default=[5, 15, 50])
    parser.add_argument("--storages", nargs="+", default=["coefficients", "coefficients/files", "dense", "host", "mmap"],
                        help="archive storages; 'coefficients/files': with M2N2Callback(seeds_in='files')")
    parser.add_argument("--seeds-k", nargs="*", type=int, default=[3, 4], help="K > 2 runs (coefficients, P = 15)")
    parser.add_argument("--evaluations", type=int, default=12, help="training steps (one evaluation each)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--mem-cap-gb", type=float, default=12.0, help="each run's address-space cap")
    parser.add_argument("--sigma", type=float, default=1e-2, help="seed noise, relative to each tensor's RMS")
    parser.add_argument("--shard-size", default="200MB", help="max_shard_size of the seeds")
    parser.add_argument("--seeds", type=Path, default=Path("/work/scale/seeds"), help="the seed cache")
    parser.add_argument("--work", type=Path, default=Path("/work/scale/work"), help="merges and mmap files")
    parser.add_argument("--out", type=Path, default=Path("/work/scale/results/merge_scale"),
                        help="writes OUT.csv and OUT.md")
    parser.add_argument("--build-only", action="store_true", help="build the seeds, run nothing")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    configs = grid(args)
    for shape in dict.fromkeys(c[0] for c in configs):
        build_seeds(args.seeds, shape, max(c[1] for c in configs if c[0] == shape), args.sigma, args.shard_size)
    if args.build_only:
        return
    args.work.mkdir(parents=True, exist_ok=True)
    per_param = member_bytes_per_param()
    with torch.device("meta"):  # sizes without allocating the models
        sizes = {shape: model_bytes(build_model(shape)) for shape in args.shapes}
    rows = []
    for shape, k, pop, storage in configs:
        num_params = sizes[shape] // 2  # bf16
        needed = archive_bytes(storage, pop, num_params, per_param)
        row = {"shape": shape, "K": k, "P": pop, "storage": storage, "needed_bytes": needed}
        if fits(storage, needed, int(args.mem_cap_gb * 2**30), args.work):
            mapped = seed_file_bytes(shape, k, args.seeds) + (needed if storage == "mmap" else 0)
            row.update(run_one((shape, k, pop, storage), args, mapped))
            row["rss_per_model"] = row["peak_rss"] / sizes[shape]
        else:
            row["status"] = "not run"
        rows.append(row)
        print({key: row.get(key) for key in COLUMNS if key in row}, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.with_suffix(".csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    table = markdown(rows, args)
    args.out.with_suffix(".md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
