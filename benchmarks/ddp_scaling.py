"""Forward passes per second of M2N2 under Lightning's DDP (CPU processes, gloo) against one process.

Each configuration is one `Trainer.fit` of `EvolutionModule` (M2N2, paper
settings apart from k) in a fresh worker process; with 2 processes it uses
`strategy="ddp_evolution"` and Lightning's launcher starts the second rank.
Configurations: 1 process x 1 thread (the baseline), 2 processes x 1 thread
(DDP: each scores half of the resources), and, for comparison, 1 process x
2 threads (the same two cores used by intra-op parallelism).

Measured inside the fit, from step `--warmup` to the last step (start-up,
process-group set-up and the initial members are not counted):

- forward passes per second (wall clock, rank zero);
- CPU time per forward pass, summed over the ranks (and threads). Waiting in
  the all-gather costs no CPU, so on a machine shared with other work this
  shows the work DDP adds (`efficiency` = baseline CPU / this CPU) even when
  the wall clock mostly shows the other work;
- rank zero's CPU time over wall time (below 1: it waited for a core, or for
  the other rank in the all-gather);
- whether the archive is bit-identical (CRC-32) to the 1 x 1 run's: every
  configuration runs the same seed for the same steps.

The runs are repeated `--repeats` times, interleaved so that load from
elsewhere hits all configurations alike; reported are the best and the median
rate (on a shared machine the best is the closest to free cores), the median
CPU time and the median load average.

    python benchmarks/ddp_scaling.py                     # digits (k = 1, 20), 10,000 and 60,000 MNIST examples
    python benchmarks/ddp_scaling.py --repeats 1 --no-write

MNIST is read from $M2N2_DATA_DIR (else ./data/mnist). Writes
benchmarks/results/ddp_scaling.json and the "## DDP scaling" section of
benchmarks/RESULTS.md (other sections are left as they are).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

from report import write_section

HERE = Path(__file__).resolve().parent
SECTION = "## DDP scaling"
#: (processes, threads per process)
CONFIGS = ((1, 1), (2, 1), (1, 2))
#: name -> (dataset, resources, k, measured steps)
CASES = {
    "digits_k1": ("digits", 1437, 1, 3000),
    "digits_k20": ("digits", 1437, 20, 300),
    "mnist10k_k1": ("mnist", 10_000, 1, 100),
    "mnist60k_k1": ("mnist", 60_000, 1, 30),
}


def worker(case: str, processes: int, threads: int, warmup: int, out: Path) -> None:
    """One timed fit; every rank writes its measurements to `out.<rank>`."""
    from functools import partial

    import lightning as L
    import torch

    from m2n2_lightning import MLP, EvolutionModule, M2N2Strategy
    from m2n2_lightning.data import DigitsDataModule, MNISTDataModule

    torch.set_num_threads(threads)
    dataset, resources, k, steps = CASES[case]
    if dataset == "digits":
        data, model = DigitsDataModule(steps_per_epoch=1000), MLP(64, 256, 10)
    else:
        data, model = MNISTDataModule(train_size=resources, steps_per_epoch=1000), MLP(784, 256, 10)
    module = EvolutionModule(model, partial(M2N2Strategy, seed=0, children_per_step=k), heatmap=False)

    class Timer(L.Callback):
        def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
            if trainer.global_step == warmup:
                self.start = (time.perf_counter(), time.process_time(), module.strategy.forward_passes)

        def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            self.wall = time.perf_counter() - self.start[0]
            self.cpu = time.process_time() - self.start[1]
            self.forward_passes = module.strategy.forward_passes - self.start[2]

    timer = Timer()
    trainer = L.Trainer(
        accelerator="cpu", devices=processes, strategy="ddp_evolution" if processes > 1 else "auto",
        max_steps=warmup + steps, callbacks=[timer], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )
    trainer.fit(module, datamodule=data)
    archive = module.strategy.archive.members.contiguous().view(torch.uint8).numpy()
    result = {"wall": timer.wall, "cpu": timer.cpu, "forward_passes": timer.forward_passes,
              "archive_crc": zlib.crc32(archive)}
    Path(f"{out}.{trainer.global_rank}").write_text(json.dumps(result))


def run_worker(case: str, processes: int, threads: int, warmup: int) -> dict[str, Any]:
    """Start one configuration; its rate, CPU time per forward pass, CPU share and archive CRC."""
    out = HERE / "results" / f".ddp_scaling_{os.getpid()}"
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", case, str(processes), str(threads),
               str(warmup), str(out)]
    load = os.getloadavg()[0]
    subprocess.run(command, check=True, capture_output=True, text=True)
    ranks = []
    for rank in range(processes):
        path = Path(f"{out}.{rank}")
        ranks.append(json.loads(path.read_text()))
        path.unlink()
    zero = ranks[0]
    return {
        "forward_passes_per_second": zero["forward_passes"] / zero["wall"],
        "cpu_ms_per_forward_pass": 1e3 * sum(r["cpu"] for r in ranks) / zero["forward_passes"],
        "cpu_share": zero["cpu"] / zero["wall"],
        "archive_crc": zero["archive_crc"],
        "load": load,
    }


def measure(cases: list[str], repeats: int, warmup: int) -> list[dict[str, Any]]:
    """Best and median figures per (case, configuration) over `repeats` interleaved rounds."""
    runs: dict[tuple[str, int, int], list[dict[str, Any]]] = {}
    for round_ in range(repeats):
        for case in cases:
            for processes, threads in CONFIGS:
                result = run_worker(case, processes, threads, warmup)
                runs.setdefault((case, processes, threads), []).append(result)
                print(f"round {round_ + 1}: {case} {processes}x{threads}: "
                      f"{result['forward_passes_per_second']:.1f}/s, {result['cpu_ms_per_forward_pass']:.3f} CPU ms "
                      f"per forward pass (cpu share {result['cpu_share']:.2f}, load {result['load']:.2f})", flush=True)
    rows = []
    for (case, processes, threads), results in runs.items():
        best = max(results, key=lambda r: r["forward_passes_per_second"])
        rows.append({
            "case": case, "processes": processes, "threads": threads,
            "best": best["forward_passes_per_second"],
            "median": statistics.median(r["forward_passes_per_second"] for r in results),
            "cpu_share": best["cpu_share"],
            "cpu_ms": statistics.median(r["cpu_ms_per_forward_pass"] for r in results),
            "load": statistics.median(r["load"] for r in results),
            "archive_crcs": sorted({r["archive_crc"] for r in results}),
        })
    return rows


def markdown(rows: list[dict[str, Any]], command: str, repeats: int) -> str:
    lines = [
        SECTION, "",
        f"Produced by `{command}` on {time.strftime('%Y-%m-%d %H:%M')} ({os.cpu_count()} CPU cores, shared "
        f"with other work; {repeats} interleaved runs). M2N2 through `EvolutionModule` under a Lightning `Trainer`, "
        "MLP 64-256-10 (digits) or 784-256-10 (MNIST), k children per step, one block of resources per rank. "
        "Timed inside the fit after a warm-up, so process start-up is excluded.", "",
        "Cells: forward passes per second, best / median of the runs (rank zero's CPU share in the best run); "
        "CPU ms per forward pass summed over ranks and threads (median), and efficiency = the 1 x 1 CPU time / "
        "this one; speed-up of the best rate over the best 1 x 1 rate; whether the archive is bit-identical "
        "to the 1 x 1 run's. Per step every rank also asks and tells (the identical update, by design) and takes "
        "part in two collectives, the score all-gather and the SIGTERM-flag broadcast Lightning makes on every DDP "
        "step; each waits for the slower rank, so load from elsewhere costs the DDP rows more than the others. "
        "DDP pays where scoring dominates a step.", "",
        "| case | N | k | 1 x 1: fp/s | CPU ms/fp | 2 processes (DDP, gloo) x 1 thread: fp/s | CPU ms/fp (eff.) "
        "| speed-up | same archive | 1 process x 2 threads: fp/s | CPU ms/fp (eff.) | speed-up | same archive "
        "| load avg |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---|---:|",
    ]
    for case, (_, resources, k, _) in CASES.items():
        found = {(r["processes"], r["threads"]): r for r in rows if r["case"] == case}
        if len(found) < len(CONFIGS):
            continue
        one = found[(1, 1)]

        def rate(row: dict[str, Any]) -> str:
            best, median = (f"{row[key]:.0f}" if row[key] >= 100 else f"{row[key]:.1f}" for key in ("best", "median"))
            return f"{best} / {median} ({row['cpu_share']:.2f})"

        def cells(row: dict[str, Any]) -> str:
            same = row["archive_crcs"] == one["archive_crcs"] and len(one["archive_crcs"]) == 1
            return (f"{rate(row)} | {row['cpu_ms']:.3f} ({one['cpu_ms'] / row['cpu_ms']:.2f}) | "
                    f"{row['best'] / one['best']:.2f}x | {'yes' if same else 'no'}")

        lines.append(
            f"| {case} | {resources} | {k} | {rate(one)} | {one['cpu_ms']:.3f} | {cells(found[(2, 1)])} | "
            f"{cells(found[(1, 2)])} | {statistics.median(r['load'] for r in found.values()):.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:
        case, processes, threads, warmup, out = sys.argv[2:7]
        worker(case, int(processes), int(threads), int(warmup), Path(out))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=10, help="steps before the clock starts")
    parser.add_argument("--no-write", action="store_true", help="print, do not write JSON or RESULTS.md")
    args = parser.parse_args()
    rows = measure(args.cases, args.repeats, args.warmup)
    text = markdown(rows, "python benchmarks/ddp_scaling.py " + " ".join(sys.argv[1:]), args.repeats)
    print(text)
    if not args.no_write:
        (HERE / "results").mkdir(exist_ok=True)
        (HERE / "results" / "ddp_scaling.json").write_text(json.dumps(rows, indent=2))
        write_section(HERE / "RESULTS.md", text)


if __name__ == "__main__":
    main()
