"""Forward passes per second of M2N2 through the library's engine, beside the GEMM roofline.

One forward pass = one candidate scored on all N training examples (docs/ALGORITHM.md).
For each device, dataset, precision and k (children made and scored per step):

- end to end: `EvolutionEngine.step()` (ask -> score -> tell -> best member
  copied into the model) of `M2N2Strategy(num_params=D, children_per_step=k,
  seed=0)`, after `engine.start()`;
- scoring alone: `engine.score(children)` of k children the strategy asked for;
- the roofline: the fastest kernel this machine has for the MLP's two GEMMs
  at the shapes the scoring runs them, in the same precision, bias and ReLU
  left out: x [N, in] @ W1 [in, 256], then [N, 256] @ W2 [256, 10], once per
  candidate on the CPU (as `MLP.forward_population` does there) and batched
  over the k candidates elsewhere. The kernels tried are oneDNN's linear
  (`m2n2_lightning.kernels.onednn_linear`, where `onednn_applies`) and
  `torch.matmul`; each layer takes the faster. Reported as GFLOP/s, and the
  share of the roofline the scoring reaches.

Precision bf16 is the engine's `score_dtype=torch.bfloat16`, what a Trainer
with bf16 precision sets (`engine.precision_dtype`); the roofline then times
bfloat16 GEMMs. Timings are medians of `torch.utils.benchmark.Timer
.blocked_autorange` (at least `--seconds` of timed calls each), with the
interquartile range beside them.

    python benchmarks/throughput.py --mnist-train-size 10000
    python benchmarks/throughput.py --datasets digits --ks 1,32 --precisions fp32 --write

`--write` writes benchmarks/results/throughput_harness.json and the section
"## Throughput (torch.utils.benchmark harness)" of benchmarks/RESULTS.md
(after "## Throughput"; other sections are left as they are), through
`benchmarks/report.py`.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.utils import benchmark

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import RESULTS_DIR, RESULTS_MD, write_json, write_section

from m2n2_lightning import MLP, FlatParams, M2N2Strategy
from m2n2_lightning.data import DigitsDataModule, MNISTDataModule
from m2n2_lightning.engine import EvolutionEngine
from m2n2_lightning.kernels import onednn_applies, onednn_linear

TITLE = "## Throughput (torch.utils.benchmark harness)"
HIDDEN, CLASSES = 256, 10
DATASETS = ("digits", "mnist")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}
DEFAULT_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


def resources(dataset: str, args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """The training examples, flattened: digits, or MNIST from --data-dir / $M2N2_DATA_DIR."""
    if dataset == "digits":
        data = DigitsDataModule()
    else:
        data_dir = args.data_dir or os.environ.get("M2N2_DATA_DIR") or DEFAULT_MNIST
        data = MNISTDataModule(data_dir=data_dir, train_size=args.mnist_train_size)
    data.setup()
    x, y = data.train_tensors
    return x.flatten(1), y


def measure(fn: Callable[[], Any], args: argparse.Namespace, label: str, device: str) -> benchmark.Measurement:
    """`fn()` timed by torch.utils.benchmark on `--threads` threads: by its default clock (which
    synchronises CUDA), or on the CPU with `--clock cpu` by the process's CPU time."""
    clock = {"timer": time.process_time} if args.clock == "cpu" and device == "cpu" else {}
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=args.threads, label=label, **clock)
    return timer.blocked_autorange(min_run_time=args.seconds)


def build_engine(x: torch.Tensor, y: torch.Tensor, k: int, device: str, dtype: torch.dtype | None) -> EvolutionEngine:
    """The library's engine on the MLP, the default M2N2 strategy with k children per step, started."""
    model = MLP(x.shape[1], HIDDEN, CLASSES).to(device)
    strategy = M2N2Strategy(num_params=FlatParams(model).num_params, children_per_step=k, seed=0).to(device)
    engine = EvolutionEngine(model, strategy, score_dtype=dtype)
    engine.attach(x, y)
    engine.start()
    return engine


def roofline(n: int, fan_in: int, k: int, device: str, dtype: torch.dtype | None, args: argparse.Namespace) -> dict[str, Any]:
    """Seconds of the two GEMMs of k forward passes with the fastest kernel per layer, and the kernels."""
    dtype = dtype or torch.float32
    seconds, kernels, all_times = 0.0, [], []
    for rows, cols in ((fan_in, HIDDEN), (HIDDEN, CLASSES)):
        a = torch.randn(n, rows, device=device).to(dtype)
        w = torch.randn(rows, cols, device=device).to(dtype)
        if device == "cpu":  # k calls at [N, ...], one per candidate: time one
            options = {"torch.matmul": (partial(torch.matmul, a, w), k)}
            if onednn_applies(a, w):
                options["onednn_linear"] = (partial(onednn_linear, a, w), k)
        else:  # one batched call over the k candidates, as the MLP's baddbmm
            a_k, w_k = a.expand(k, n, rows), w.expand(k, rows, cols).contiguous()
            options = {"torch.matmul": (partial(torch.matmul, a_k, w_k), 1)}
        with torch.no_grad():
            times = {name: measure(fn, args, name, device).median * calls for name, (fn, calls) in options.items()}
        best = min(times, key=times.get)
        seconds += times[best]
        kernels.append(best)
        all_times.append(times)
    return {"seconds": seconds, "kernels": kernels, "kernel_seconds": all_times}


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for device in args.devices:
        for dataset in args.datasets:
            x, y = resources(dataset, args)
            n, fan_in = x.shape
            flops = 2 * n * (fan_in * HIDDEN + HIDDEN * CLASSES)  # one forward pass, the GEMMs alone
            for precision in args.precisions:
                dtype = PRECISIONS[precision]
                roofs: dict[int, dict[str, Any]] = {}
                for k in args.ks:
                    engine = build_engine(x, y, k, device, dtype)
                    children = engine.strategy.ask(k)
                    step = measure(engine.step, args, "end to end", device)
                    score = measure(partial(engine.score, children), args, "scoring", device)
                    shape_k = 1 if device == "cpu" else k  # the CPU's shapes do not depend on k
                    if shape_k not in roofs:
                        roofs[shape_k] = roofline(n, fan_in, shape_k, device, dtype, args)
                    roof = roofs[shape_k]
                    roof_rate = shape_k / roof["seconds"]
                    row = {
                        "device": device, "dataset": dataset, "N": n, "in": fan_in, "precision": precision, "k": k,
                        "end_to_end": k / step.median, "end_to_end_iqr": step.iqr / step.median,
                        "scoring": k / score.median, "scoring_iqr": score.iqr / score.median,
                        "roofline": roof_rate, "roofline_kernels": roof["kernels"], "kernel_seconds": roof["kernel_seconds"],
                        "scoring_gflops": k / score.median * flops / 1e9, "roofline_gflops": roof_rate * flops / 1e9,
                        "step_times": step.times, "score_times": score.times, "forward_passes": engine.forward_passes,
                    }
                    row["of_roofline"] = row["scoring"] / roof_rate
                    rows.append(row)
                    print(f"{device} {dataset} {precision} k={k}: end to end {row['end_to_end']:,.0f}/s, scoring "
                          f"{row['scoring']:,.0f}/s = {row['of_roofline']:.0%} of the roofline", file=sys.stderr)
    return rows


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            names = [line.split(":", 1)[1].strip() for line in info if line.startswith("model name")]
        return f"{names[0]}, {len(names)} cores" if names else platform.processor()
    except OSError:
        return platform.processor() or "unknown CPU"


def markdown(rows: list[dict[str, Any]], context: dict[str, Any]) -> str:
    kernel = {"onednn_linear": "oneDNN", "torch.matmul": "matmul"}
    clock = ("timed by the process's CPU time on the CPU (`--clock cpu`: waiting for a core is not counted, "
             "sharing caches with other work is)" if context["clock"] == "cpu" else "timed by the wall clock")
    intro = (
        f"Produced by `{context['command']}` ({context['measured']}; torch {context['torch']}; {context['cpu']}; "
        f"{context['threads']} thread(s); load average {context['load'][0]:.1f} before, {context['load'][1]:.1f} "
        "after). Forward passes per second (one = one candidate on all N examples): medians of "
        f"`torch.utils.benchmark.Timer.blocked_autorange`, at least {context['seconds']:g} s of calls each, {clock}, "
        "± the interquartile range over the median. End to end = `EvolutionEngine.step()` of the default "
        "`M2N2Strategy` with k children per step; scoring = `engine.score` of k children. Roofline = the MLP's "
        "two GEMMs alone at the scoring's shapes and precision with the faster of oneDNN's linear and "
        "torch.matmul per layer (the kernels named layer 1 / layer 2); GFLOP/s count those GEMMs' FLOPs."
    )
    lines = [
        TITLE, "", intro, "",
        ("| device | dataset | N | precision | k | end to end | scoring | scoring GFLOP/s "
        "| roofline GFLOP/s (kernels) | scoring / roofline |"),
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        kernels = " / ".join(kernel[name] for name in r["roofline_kernels"])
        lines.append(
            f"| {r['device']} | {r['dataset']} | {r['N']:,} | {r['precision']} | {r['k']} "
            f"| {r['end_to_end']:,.0f} ± {r['end_to_end_iqr']:.0%} | {r['scoring']:,.0f} ± {r['scoring_iqr']:.0%} "
            f"| {r['scoring_gflops']:.0f} | {r['roofline_gflops']:.0f} ({kernels}) | {r['of_roofline']:.0%} |"
        )
    if context["note"]:
        lines += ["", context["note"]]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="digits,mnist", help="comma-separated: digits, mnist")
    parser.add_argument("--ks", default="1,8,32", help="children scored per step, comma-separated")
    parser.add_argument("--devices", default=None, help="comma-separated (default: cpu, and cuda when present)")
    parser.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16")
    parser.add_argument("--threads", type=int, default=1, help="torch threads while timing")
    parser.add_argument("--seconds", type=float, default=1.0, help="least timed run time per figure")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: time CPU work by the process's CPU time, robust to waiting for a core on a shared machine")
    parser.add_argument("--mnist-train-size", type=int, default=None, help="MNIST resources N (default: all 60,000)")
    parser.add_argument("--data-dir", default=None, help="MNIST IDX folder (default: $M2N2_DATA_DIR, else ../shared/data/mnist)")
    parser.add_argument("--note", default="", help="a paragraph of context added under the table (e.g. machine load)")
    parser.add_argument("--write", action="store_true", help="write the JSON and the RESULTS.md section")
    args = parser.parse_args(argv)
    args.datasets = [d for d in args.datasets.split(",") if d]
    args.precisions = [p for p in args.precisions.split(",") if p]
    args.ks = [int(k) for k in args.ks.split(",") if k]
    args.devices = args.devices.split(",") if args.devices else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if set(args.datasets) - set(DATASETS) or set(args.precisions) - set(PRECISIONS) or min(args.ks, default=0) < 1:
        parser.error(f"--datasets takes {', '.join(DATASETS)}, --precisions {', '.join(PRECISIONS)}, --ks integers >= 1")
    return args


def argv_shown(argv: list[str]) -> list[str]:
    """The command line as the report shows it: the --note text (printed under the table) elided."""
    return [("--note=..." if a.startswith("--note=") else "..." if i and argv[i - 1] == "--note" else a)
            for i, a in enumerate(argv)]


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    rows = run(args)
    context = {
        "command": "python benchmarks/throughput.py " + " ".join(shlex.quote(a) for a in argv_shown(sys.argv[1:])),
        "measured": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__, "cpu": cpu_name(),
        "threads": args.threads, "seconds": args.seconds, "clock": args.clock, "load": (load, os.getloadavg()[0]), "note": args.note,
    }
    text = markdown(rows, context)
    print(text)
    if args.write:
        write_json(RESULTS_DIR / "throughput_harness.json", {**context, "rows": rows})
        write_section(RESULTS_MD, text, after="## Throughput")


if __name__ == "__main__":
    main()
