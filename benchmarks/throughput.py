"""Forward passes per second of M2N2, end to end and scoring alone, beside the GEMM roofline.

One forward pass is one candidate scored on all N training examples (M2N2.md).
For each dataset (digits, MNIST), device (CPU; CUDA when present) and k (the
children made and scored per step) it measures:

- end to end: `EvolutionEngine.step()` (ask -> score -> tell -> best member
  copied into the model) with the logging a normal run does: `engine.metrics()`
  read back every `--log-every` steps, and the best member's test accuracy
  recomputed at those steps when the best member has changed;
- scoring alone: `Evaluator(candidates [k, D])`;
- the roofline: the same machine's GEMM time at the same shapes, torch.matmul
  of [k*N, in] x [in, hidden] plus [k*N, hidden] x [hidden, out], as forward
  passes per second, and on the CPU the same shapes through oneDNN (the
  fastest float32 GEMM torch reaches there), with the ratios.

Every figure is the median of `--repeats` sweeps; each sweep runs in a fresh
worker process, and with `--before DIR` (a checkout of older code) the sweeps
of both versions alternate, so machine load hits both alike. Beside each
figure: the load average and the share of wall time the worker had the CPU
(cpu/wall < 1 means it was waiting for a core).

    python benchmarks/throughput.py --mnist-train-size 10000 --before /tmp/m2n2_before
    python benchmarks/throughput.py --precision-experiment   # bf16 vs fp32 accuracy curves (3 seeds)

Writes benchmarks/results/throughput_<device>.json and the "## Throughput"
section of benchmarks/RESULTS.md (other sections are left as they are).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SECTION = "## Throughput"
HIDDEN, CLASSES = 256, 10
DATASETS = ("digits", "mnist")


# --------------------------------------------------------------------------------- measuring
def load_average() -> float:
    return os.getloadavg()[0]


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def timed(run: Callable[[], int], device: str, seconds: float, min_calls: int = 3) -> dict[str, float]:
    """Call `run` (returns forward passes done) until `seconds` and `min_calls` are reached: the rate."""
    load = load_average()
    synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    done = calls = 0
    while calls < min_calls or time.perf_counter() - wall < seconds:
        done += run()
        calls += 1
    synchronize(device)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"rate": done / wall, "cpu_rate": done / cpu, "cpu_per_wall": cpu / wall, "load": load, "calls": calls}


def per_call(fn: Callable[[], Any], device: str, seconds: float) -> float:
    """Seconds per call of `fn`, over at least `seconds` (after one warm-up call)."""
    fn()
    result = timed(lambda: (fn(), 1)[1], device, seconds)
    return 1.0 / result["rate"]


# -------------------------------------------------------------------------------------- data
def load_data(name: str, args: argparse.Namespace) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    from m2n2_lightning.data import DigitsDataModule, MNISTDataModule

    if name == "digits":
        data = DigitsDataModule()
    else:
        data_dir = args.data_dir or os.environ.get("M2N2_DATA_DIR") or str(REPO.parent / "shared" / "data" / "mnist")
        data = MNISTDataModule(data_dir=data_dir, train_size=args.mnist_train_size)
    data.setup()
    return data.train_tensors, data.test_tensors


def build_engine(in_features: int, k: int, device: str, train: tuple[torch.Tensor, torch.Tensor], **strategy_kwargs: Any):
    from m2n2_lightning import MLP, M2N2Strategy
    from m2n2_lightning.engine import EvolutionEngine

    model = MLP(in_features, HIDDEN, CLASSES).to(device)
    strategy = M2N2Strategy(children_per_step=k, seed=0, **strategy_kwargs).to(device)
    engine = EvolutionEngine(model, strategy)
    engine.attach(*train)
    engine.initialize()
    return engine


# ---------------------------------------------------------------------------------- one sweep
def end_to_end(engine: Any, test: tuple[torch.Tensor, torch.Tensor], k: int, device: str, seconds: float, log_every: int) -> dict[str, float]:
    """Steps with a normal run's logging: metrics read back every `log_every` steps, test accuracy when the best changed."""
    x_test, y_test = (t.to(device) for t in test)
    state = {"step": 0, "best": None}

    def log() -> None:
        [float(value) for value in engine.metrics().values()]  # what a logger reads back
        best = engine.flat.flatten(engine.model)
        if state["best"] is None or not torch.equal(best, state["best"]):
            state["best"] = best
            with torch.no_grad():
                float((engine.model(x_test).argmax(-1) == y_test).float().mean())

    def run() -> int:
        engine.step()
        state["step"] += 1
        if state["step"] % log_every == 0:
            log()
        return k

    timed(run, device, min(0.5, seconds))  # warm-up
    return timed(run, device, seconds)


def scoring(evaluator: Any, k: int, num_params: int, device: str, seconds: float) -> dict[str, float]:
    candidates = 0.05 * torch.randn(k, num_params, device=device)

    def run() -> int:
        evaluator(candidates)
        return k

    timed(run, device, min(0.5, seconds), min_calls=1)
    return timed(run, device, seconds)


def roofline(rows: int, in_features: int, k: int, device: str, seconds: float, backend: str) -> dict[str, float]:
    """Forward passes per second if the two GEMMs at [k*N, ...] shapes were all the work.

    Shapes above `max_elements` are timed at [N, ...] and the time multiplied by k ("scaled").
    """
    max_elements = 2**27  # 512 MiB of float32 per operand
    stacked = k * rows * max(in_features, HIDDEN) <= max_elements
    m = k * rows if stacked else rows
    gemm = {
        "matmul": lambda a, w: torch.matmul(a, w),
        "onednn": lambda a, w: torch.ops.mkldnn._linear_pointwise(a, w.t(), None, "none", [], ""),
    }[backend]
    seconds_per_forward = 0.0
    for fan_in, fan_out in ((in_features, HIDDEN), (HIDDEN, CLASSES)):
        a = torch.randn(m, fan_in, device=device)
        w = torch.randn(fan_in, fan_out, device=device)
        seconds_per_forward += per_call(lambda: gemm(a, w), device, seconds / 4) * (1 if stacked else k) / k
        del a
    flops = 2 * rows * (in_features * HIDDEN + HIDDEN * CLASSES)
    return {"rate": 1 / seconds_per_forward, "gflops": flops / seconds_per_forward / 1e9, "scaled": not stacked}


def breakdown(engine: Any, device: str, seconds: float) -> dict[str, float]:
    """Microseconds per call of each part of a k = 1 step (public calls only, so older code runs it too)."""
    from m2n2_lightning import Evaluator

    strategy = engine.strategy
    evaluator = Evaluator(engine.model, *engine_resources(engine))
    candidates = strategy.ask()
    scores = evaluator(candidates)
    parts = {
        "ask": lambda: strategy.ask(),
        "score": lambda: evaluator(candidates),
        "tell": lambda: strategy.tell(candidates, scores),
        "load_best": engine.load_best,
        "step": engine.step,
    }
    return {name: 1e6 * per_call(fn, device, seconds / len(parts)) for name, fn in parts.items()}


def engine_resources(engine: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The resources an engine holds (the attribute moved when DDP sharding came in)."""
    if getattr(engine, "evaluator", None) is not None:
        return engine.evaluator.inputs, engine.evaluator.targets
    return torch.cat([e.inputs for e in engine.evaluators]), torch.cat([e.targets for e in engine.evaluators])


def generic_mlp(in_features: int) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(in_features, HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, CLASSES))


def sweep(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One measurement of every configuration with the m2n2_lightning on sys.path."""
    from m2n2_lightning import MLP, Evaluator, FlatParams

    torch.set_num_threads(args.threads)
    rows: list[dict[str, Any]] = []
    for device in args.devices:
        for dataset in args.datasets:
            train, test = load_data(dataset, args)
            n, in_features = train[0].shape[0], train[0][0].numel()
            num_params = FlatParams(MLP(in_features, HIDDEN, CLASSES)).num_params
            base = {"device": device, "dataset": dataset, "N": n, "in": in_features}
            for k in args.ks:
                engine = build_engine(in_features, k, device, train)
                row = {**base, "k": k, "measure": "end_to_end"}
                rows.append({**row, **end_to_end(engine, test, k, device, args.seconds, args.log_every)})
                evaluator = Evaluator(engine.model, *engine_resources(engine))
                rows.append({**base, "k": k, "measure": "scoring", **scoring(evaluator, k, num_params, device, args.seconds)})
                for backend in ("matmul", "onednn") if device == "cpu" else ("matmul",):
                    rows.append({**base, "k": k, "measure": f"roofline_{backend}", **roofline(n, in_features, k, device, args.seconds, backend)})
                if k == 1:
                    rows.append({**base, "k": k, "measure": "breakdown_us", **breakdown(engine, device, args.seconds)})
                if args.worker_extras:
                    rows += extras(engine, base, k, num_params, in_features, device, args, test)
            if args.worker_extras and dataset == "digits":
                rows += [{**base, "k": 1, **row} for row in seed_batch_rates(train, device, args.seed_batches, args.seconds)]
    return rows


class BareLoop:
    """`EvolutionEngine.step` written out (ask -> score -> tell -> best member into the model) with any Evaluator."""

    def __init__(self, engine: Any, evaluator: Any) -> None:
        self.engine, self.evaluator, self.flat, self.model = engine, evaluator, engine.flat, engine.model

    def step(self) -> None:
        children = self.engine.strategy.ask()
        self.engine.strategy.tell(children, self.evaluator(children))
        self.engine.load_best()

    def metrics(self) -> dict[str, Any]:
        return self.engine.metrics()


def forward_variants(model: Any, x: torch.Tensor, k: int, device: str, seconds: float) -> dict[str, dict[str, float]]:
    """Logits of k MLP candidates three ways: vmap over functional_call, per candidate (the MLP's
    path), and the first layer of all k as one GEMM over the stacked [in, k * hidden] weights
    (the second layer then per candidate, as in the MLP's path)."""
    from m2n2_lightning import FlatParams
    from m2n2_lightning.params import fused_linear

    flat = FlatParams(model)
    params = flat.unflatten(0.05 * torch.randn(k, flat.num_params, device=device))
    w1, b1, w2, b2 = params["w1"], params["b1"], params["w2"], params["b2"]

    def vmapped() -> torch.Tensor:
        return torch.func.vmap(lambda p: torch.func.functional_call(model, p, (x,)))(params)

    def stacked() -> torch.Tensor:
        hidden = fused_linear(x, w1.permute(1, 0, 2).reshape(x.shape[1], -1), b1.reshape(-1), relu=True)
        return torch.stack([fused_linear(part, w2[i], b2[i]) for i, part in enumerate(hidden.split(HIDDEN, dim=1))])

    variants = {"forward_vmap": vmapped, "forward_per_candidate": lambda: model.forward_population(params, x), "forward_stacked_first_layer": stacked}
    results = {}
    with torch.no_grad():
        for name, fn in variants.items():
            fn()
            results[name] = timed(lambda: (fn(), k)[1], device, seconds)
    return results


def extras(engine: Any, base: dict[str, Any], k: int, num_params: int, in_features: int, device: str, args: argparse.Namespace, test: Any) -> list[dict[str, Any]]:
    """Options and variants of the current code: bf16, deferred score checks, torch.compile, generic modules, forward layouts."""
    from m2n2_lightning import Evaluator, FlatParams

    x, y = engine_resources(engine)
    row = {**base, "k": k}
    rows = [{**row, "measure": "scoring_bf16", **scoring(Evaluator(engine.model, x, y, dtype=torch.bfloat16), k, num_params, device, args.seconds)}]
    if k == 1:
        deferred = build_engine(in_features, k, device, (x, y), validate_scores="deferred")
        rows.append({**row, "measure": "end_to_end_deferred_check", **end_to_end(deferred, test, k, device, args.seconds, args.log_every)})
        for name, dtype in (("end_to_end_bare_loop", None), ("end_to_end_bare_loop_bf16", torch.bfloat16)):
            loop = BareLoop(build_engine(in_features, k, device, (x, y)), Evaluator(engine.model, x, y, dtype=dtype))
            rows.append({**row, "measure": name, **end_to_end(loop, test, k, device, args.seconds, args.log_every)})
    if base["dataset"] == "digits":
        rows += [{**row, "measure": name, **result} for name, result in forward_variants(engine.model, x, k, device, args.seconds).items()]
    if base["dataset"] == "digits" and k <= 8:
        generic = generic_mlp(in_features).to(device)
        generic_params = FlatParams(generic).num_params
        for name, evaluator in (
            ("scoring_generic_vmap", Evaluator(generic, x, y)),
            ("scoring_generic_vmap_compiled", Evaluator(generic, x, y, compile=True)),
            ("scoring_compiled", Evaluator(engine.model, x, y, compile=True)),
        ):
            rows.append({**row, "measure": name, **scoring(evaluator, k, generic_params if "generic" in name else num_params, device, args.seconds)})
    return rows


# ------------------------------------------------------------------------- seeds in one batch
class SeedBatch:
    """S independent M2N2 runs (paper settings, k = 1) stepped together, one batched kernel per operator.

    Run s draws from its own generator in M2N2Strategy's order (parents, split,
    ratio, noise), so it is the run of `M2N2Strategy(seed=seeds[s])`: the
    archives agree (tests/test_speed_paths.py). For benchmarks with many seeds.
    """

    def __init__(self, seeds: list[int], num_params: int, evaluator: Any, pop_size: int = 20, sigma: float = 0.01) -> None:
        from m2n2_lightning import M2N2Strategy

        self.evaluator, self.sigma, self.num_params = evaluator, sigma, num_params
        device = evaluator.targets.device
        self.generators = []
        runs = []
        for seed in seeds:  # initial members exactly as M2N2Strategy makes and inserts them
            run = M2N2Strategy(pop_size=pop_size, seed=seed, num_params=num_params).to(device)
            run.tell(initial := run.ask(), evaluator(initial))
            runs.append(run)
            self.generators.append(run.generator)
        self.archive = torch.stack([r.archive for r in runs])  # [S, P, D]
        self.scores = torch.stack([r.scores for r in runs])  # [S, P, N]
        self.occupied = torch.stack([r.occupied for r in runs])  # [S, P]
        self.forward_passes = 0

    @torch.no_grad()
    def step(self) -> None:
        from m2n2_lightning.strategies import operators as ops

        seeds, device = len(self.generators), self.archive.device
        rows = torch.arange(seeds, device=device)
        taken = self.scores.sum(dim=1, keepdim=True)
        shares = self.scores / torch.where(taken > 0, taken, 1.0)
        fitness = shares.sum(dim=-1)
        draws = [(torch.rand(1, 2, generator=g, device=device), torch.randint(0, self.num_params, (1,), generator=g, device=device),
                  torch.rand(1, generator=g, device=device), torch.empty(1, self.num_params, device=device).normal_(0.0, self.sigma, generator=g))
                 for g in self.generators]
        uniforms, split, weight, noise = (torch.cat(column) for column in zip(*draws))
        by_fitness = torch.where(fitness.sum(-1, keepdim=True) <= 0, self.occupied.to(fitness.dtype), fitness)
        first = ops.sample_categorical(by_fitness, uniforms[:, 0])
        gain = (shares - shares[rows, first].unsqueeze(1)).clamp_min_(0).sum(dim=-1)
        second = ops.sample_categorical(torch.where(gain.sum(-1, keepdim=True) <= 0, by_fitness, gain), uniforms[:, 1])
        a, b = self.archive[rows, first], self.archive[rows, second]
        weight = weight.unsqueeze(-1)
        coef_a, coef_b = ops.slerp_coefficients(a, b, torch.cat([weight, 1 - weight], dim=-1))
        if device.type == "cpu":
            children = ops.children_by_slices(a, b, coef_a, coef_b, split.tolist())
        else:
            children = ops.children_by_mask(a, b, coef_a, coef_b, split)
        children = noise.add_(children)
        child_scores = self.evaluator(children)
        extended = torch.cat([self.scores, child_scores.unsqueeze(1)], dim=1)
        total = extended.sum(dim=1, keepdim=True)
        worst = (extended / torch.where(total > 0, total, 1.0)).sum(dim=-1).argmin(dim=-1)
        keep = worst < self.archive.shape[1]
        slot = worst.clamp(max=self.archive.shape[1] - 1)
        self.archive[rows, slot] = torch.where(keep.unsqueeze(-1), children, self.archive[rows, slot])
        self.scores[rows, slot] = torch.where(keep.unsqueeze(-1), child_scores, self.scores[rows, slot])
        self.occupied[rows, slot] |= keep
        self.forward_passes += seeds


def seed_batch_rates(train: tuple[torch.Tensor, torch.Tensor], device: str, sizes: list[int], seconds: float) -> list[dict[str, Any]]:
    """Forward passes per second of S runs in one batch against the same S runs one after the other."""
    from m2n2_lightning import MLP, Evaluator, FlatParams, M2N2Strategy

    model = MLP(train[0].shape[1], HIDDEN, CLASSES).to(device)
    evaluator = Evaluator(model, *train)
    num_params = FlatParams(model).num_params
    rows = []
    for size in sizes:
        batch = SeedBatch(list(range(size)), num_params, evaluator)
        runs = [M2N2Strategy(seed=s, num_params=num_params).to(device) for s in range(size)]
        for run in runs:
            run.tell(initial := run.ask(), evaluator(initial))

        def one_by_one() -> int:
            for run in runs:
                children = run.ask()
                run.tell(children, evaluator(children))
            return size

        def batched() -> int:
            batch.step()
            return size

        for name, fn in (("seeds_one_by_one", one_by_one), ("seeds_batched", batched)):
            timed(fn, device, min(0.5, seconds))
            rows.append({"seeds": size, "measure": f"{name}_{size}", **timed(fn, device, seconds)})
    return rows


# -------------------------------------------------------------------------------- the driver
def run_worker(code: Path, args: argparse.Namespace, extras: bool) -> list[dict[str, Any]]:
    """One sweep in a fresh process importing m2n2_lightning from `code`."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--threads", str(args.threads),
               "--seconds", str(args.seconds), "--log-every", str(args.log_every),
               "--datasets", ",".join(args.datasets), "--ks", ",".join(map(str, args.ks)),
               "--devices", ",".join(args.devices), "--seed-batches", ",".join(map(str, args.seed_batches))]
    if args.mnist_train_size:
        command += ["--mnist-train-size", str(args.mnist_train_size)]
    if args.data_dir:
        command += ["--data-dir", args.data_dir]
    if extras:
        command.append("--worker-extras")
    env = {**os.environ, "PYTHONPATH": str(code)}
    result = subprocess.run(command, env=env, cwd=str(code), capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"worker for {code} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def median_rows(sweeps: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per configuration: the median of every numeric field over the sweeps, and all the rates."""
    keys = ("device", "dataset", "N", "in", "k", "measure")
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for rows in sweeps:
        for row in rows:
            groups.setdefault(tuple(row[key] for key in keys), []).append(row)
    out = []
    for key, rows in groups.items():
        merged: dict[str, Any] = dict(zip(keys, key))
        for field in rows[0]:
            if field not in keys and isinstance(rows[0][field], (int, float)) and not isinstance(rows[0][field], bool):
                merged[field] = statistics.median(row[field] for row in rows)
            elif field not in keys:
                merged[field] = rows[0][field]
        if "rate" in rows[0]:
            merged["rates"] = [round(row["rate"], 1) for row in rows]
        out.append(merged)
    return out


def find(rows: list[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    return next((row for row in rows if all(row.get(k) == v for k, v in match.items())), None)


def fmt(value: float | None, digits: int = 0) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def markdown(after: list[dict[str, Any]], before: list[dict[str, Any]] | None, command: str, args: argparse.Namespace, notes: str) -> str:
    old = before or []
    lines = [SECTION, "", f"Produced by `{command}` ({args.measured}; {args.threads} thread(s); "
             f"median of {args.repeats} sweeps, each figure at least {args.seconds:g} s). Forward passes per second, one "
             "forward pass = one candidate on all N training examples. Roofline = the two GEMMs of the same shapes "
             "alone ([k*N, in] x [in, 256] and [k*N, 256] x [256, 10]); `s` = timed at [N, ...] and scaled by k (the "
             "[k*N, ...] operands would not fit in memory). load = 1-minute load average of this shared 2-core machine; "
             "cpu/wall = the share of the wall time the process had a core"
             + ("; before = the code in `--before`, measured in alternating sweeps." if before else "."), ""]
    for device in args.devices:
        lines += [f"### {device}", "", "| dataset | N | k | end to end" + (" before / after" if before else "")
                  + " | scoring" + (" before / after" if before else "")
                  + " | roofline torch.matmul | scoring / it | roofline oneDNN | scoring / it | load | cpu/wall |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        per_cpu = ["", "The same per CPU second of the process (robust to waiting for a core, not to sharing caches):", "",
                   "| dataset | k | end to end" + (" before / after" if before else "") + " | scoring" + (" before / after" if before else "") + " |",
                   "|---|---:|---:|---:|"]
        for row in (r for r in after if r["device"] == device and r["measure"] == "end_to_end"):
            key = {k: row[k] for k in ("device", "dataset", "k")}
            score, mm, dnn = (find(after, **key, measure=m) for m in ("scoring", "roofline_matmul", "roofline_onednn"))
            old_e2e, old_score = find(old, **key, measure="end_to_end"), find(old, **key, measure="scoring")

            def pair(field: str, new: dict[str, Any], previous: dict[str, Any] | None) -> str:
                return (f"{fmt(previous[field])} / " if previous else "") + fmt(new[field])

            def roof(r: dict[str, Any] | None) -> tuple[str, str]:
                if r is None:
                    return "n/a", "n/a"
                return fmt(r["rate"]) + (" s" if r["scaled"] else ""), f"{score['rate'] / r['rate']:.0%}"

            (mm_txt, mm_ratio), (dnn_txt, dnn_ratio) = roof(mm), roof(dnn)
            lines.append(f"| {row['dataset']} | {row['N']:,} | {row['k']} | {pair('rate', row, old_e2e)} | {pair('rate', score, old_score)} "
                         f"| {mm_txt} | {mm_ratio} | {dnn_txt} | {dnn_ratio} | {row['load']:.1f} | {row['cpu_per_wall']:.2f} |")
            per_cpu.append(f"| {row['dataset']} | {row['k']} | {pair('cpu_rate', row, old_e2e)} | {pair('cpu_rate', score, old_score)} |")
        lines += per_cpu + [""]
        for dataset in args.datasets:
            new, previous = (find(rows, device=device, dataset=dataset, k=1, measure="breakdown_us") for rows in (after, old))
            if new is None:
                continue
            lines += [f"Parts of one k = 1 step on {dataset}, microseconds per call, each part called on its own, "
                      "over and over (inside real steps each part runs 10-30% slower, see the notes below):", "",
                      "| part | " + ("before | after | saved |" if previous else "after |"), "|---|" + ("---:|" * (3 if previous else 1))]
            for part in ("ask", "score", "tell", "load_best", "step"):
                lines.append(f"| {part} | " + (f"{previous[part]:.0f} | {new[part]:.0f} | {previous[part] - new[part]:.0f} |" if previous else f"{new[part]:.0f} |"))
            lines.append("")
        options = [r for r in after if r["device"] == device and r["measure"].startswith(("scoring_", "end_to_end_", "forward_"))]
        if options:
            lines += ["Options and variants of the current code. vs = per CPU-s against: the default end to end "
                      "(engine) or scoring; the bf16 bare loop against the float32 bare loop; the compiled generic "
                      "module against its eager self; forward_* (logits only, MLP) against forward_vmap.", "",
                      "| dataset | k | what | forward passes/s | per CPU-s | vs |", "|---|---:|---|---:|---:|---:|"]
            for row in options:
                base_measure = {"end": "end_to_end", "sco": "scoring", "for": "forward_vmap"}[row["measure"][:3]]
                base_measure = {"scoring_generic_vmap_compiled": "scoring_generic_vmap",
                                "end_to_end_bare_loop_bf16": "end_to_end_bare_loop"}.get(row["measure"], base_measure)
                reference = find(after, device=device, dataset=row["dataset"], k=row["k"], measure=base_measure)
                lines.append(f"| {row['dataset']} | {row['k']} | {row['measure']} | {fmt(row['rate'])} | {fmt(row['cpu_rate'])} "
                             f"| {row['cpu_rate'] / reference['cpu_rate']:.2f}x |")
            lines += ["", "scoring_generic_* = an `nn.Sequential` of the same MLP, scored through `vmap` (no model-specific "
                      "fast path). end_to_end_bare_loop = `EvolutionEngine.step` written out around an `Evaluator` of "
                      "one's own (the engine takes no dtype). forward_stacked_first_layer = x [N, in] @ W1 of all k "
                      "candidates stacked [in, k * 256] as one oneDNN GEMM, layer 2 per candidate as in the MLP's path.", ""]
        seeds = [r for r in after if r["device"] == device and r["measure"].startswith("seeds_batched_")]
        if seeds:
            lines += ["Independent runs (seeds) in one process, digits, k = 1: `SeedBatch` (this file) steps S runs with one "
                      "batched kernel per operator, against the same S runs stepped one after the other (per CPU-s):", "",
                      "| S | one by one | batched | speed-up |", "|---:|---:|---:|---:|"]
            for row in seeds:
                single = find(after, device=device, dataset="digits", measure=row["measure"].replace("batched", "one_by_one"))
                lines.append(f"| {row['seeds']} | {fmt(single['cpu_rate'])} | {fmt(row['cpu_rate'])} | {row['cpu_rate'] / single['cpu_rate']:.2f}x |")
            lines.append("")
    if notes:
        lines += [notes.strip(), ""]
    return "\n".join(lines)


def write_section(path: Path, text: str) -> None:
    """Replace (or append) the "## Throughput" section, re-reading the file right before writing."""
    current = path.read_text() if path.exists() else "# Benchmark results\n"
    lines = current.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == SECTION), None)
    if start is None:
        new = current.rstrip("\n") + "\n\n" + text.rstrip("\n") + "\n"
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        new = "\n".join(lines[:start] + text.rstrip("\n").splitlines() + ([""] + lines[end:] if end < len(lines) else [])) + "\n"
    path.write_text(new)


def precision_experiment(args: argparse.Namespace) -> str:
    """Best member's test accuracy, float32 vs bfloat16 scoring, digits, 3 seeds x `budget` forward passes."""
    from m2n2_lightning import MLP, Evaluator, FlatParams, M2N2Strategy
    from m2n2_lightning.data import DigitsDataModule

    torch.set_num_threads(args.threads)
    data = DigitsDataModule()
    (x, y), (x_test, y_test) = data.train_tensors, data.test_tensors
    budget, every, seeds = args.precision_budget, args.precision_budget // 10, tuple(range(args.precision_seeds))
    curves: dict[str, list[list[float]]] = {"float32": [], "bfloat16": []}
    agreement = []
    for seed in seeds:
        for name, dtype in (("float32", None), ("bfloat16", torch.bfloat16)):
            model = MLP()
            flat = FlatParams(model)
            evaluator = Evaluator(model, x, y, dtype=dtype)
            exact = Evaluator(model, x, y)
            strategy = M2N2Strategy(seed=seed, num_params=flat.num_params)
            strategy.tell(initial := strategy.ask(), evaluator(initial))
            curve = []
            while strategy.forward_passes < budget:
                children = strategy.ask()
                scores = evaluator(children)
                if dtype is not None and strategy.forward_passes % every == 0:
                    agreement.append(float((scores == exact(children)).float().mean()))
                strategy.tell(children, scores)
                if strategy.forward_passes % every == 0:
                    flat.load_into(model, strategy.best_params())
                    with torch.no_grad():
                        curve.append(float((model(x_test).argmax(-1) == y_test).float().mean()))
            curves[name].append(curve)
    grid = [every * (i + 1) for i in range(len(curves["float32"][0]))]
    lines = ["#### Scoring in bfloat16: the accuracy curves", "",
             f"`python benchmarks/throughput.py --precision-experiment --precision-seeds {len(seeds)}`: "
             f"best member's test accuracy on digits, M2N2 paper settings, k = 1, seeds 0-{len(seeds) - 1}: mean ± standard "
             "error over seeds (lowest and highest seed in brackets). The "
             f"bf16 run scores in bfloat16 (`Evaluator(dtype=torch.bfloat16)`); the test accuracy is always float32. "
             f"Per-example bf16 scores equal the float32 ones for {statistics.mean(agreement):.2%} of (child, example) "
             "pairs sampled along the bf16 runs.", "",
             "| forward passes | float32 | bfloat16 |", "|---:|---|---|"]
    for i, fp in enumerate(grid):
        cells = []
        for name in ("float32", "bfloat16"):
            values = [c[i] for c in curves[name]]
            error = statistics.stdev(values) / len(values) ** 0.5
            cells.append(f"{statistics.mean(values):.3f} ± {error:.3f} ({min(values):.3f}-{max(values):.3f})")
        lines.append(f"| {fp:,} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="digits,mnist", help="comma-separated: digits, mnist")
    parser.add_argument("--ks", default="1,8,32", help="children scored per step, comma-separated")
    parser.add_argument("--devices", default=None, help="comma-separated (default: cpu, and cuda when present)")
    parser.add_argument("--mnist-train-size", type=int, default=None, help="MNIST resources N (default: all 60,000)")
    parser.add_argument("--data-dir", default=None, help="MNIST IDX folder (default: $M2N2_DATA_DIR, else ../shared/data/mnist)")
    parser.add_argument("--seconds", type=float, default=2.0, help="minimum time per figure and sweep")
    parser.add_argument("--repeats", type=int, default=3, help="sweeps (the median is reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--log-every", type=int, default=50, help="steps between metric read-backs, as a normal run")
    parser.add_argument("--before", type=Path, default=None, help="a checkout of older code to measure beside this one")
    parser.add_argument("--no-extras", dest="extras", action="store_false", help="skip bf16 / deferred / compile / seed rows")
    parser.add_argument("--seed-batches", default="1,8,32", help="S of the seeds-in-one-batch measurement")
    parser.add_argument("--notes", type=Path, default=None,
                        help="markdown appended to the section (default: results/throughput_notes.md, when present)")
    parser.add_argument("--no-write", action="store_true", help="print, do not write JSON or RESULTS.md")
    parser.add_argument("--render-only", action="store_true", help="rewrite the RESULTS.md section from the saved JSON (e.g. with new --notes)")
    parser.add_argument("--precision-experiment", action="store_true", help="only the fp32 vs bf16 accuracy curves")
    parser.add_argument("--precision-budget", type=int, default=5000, help="forward passes per run of that experiment")
    parser.add_argument("--precision-seeds", type=int, default=3, help="seeds of that experiment (0, 1, ...)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker-extras", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.datasets = [d for d in args.datasets.split(",") if d]
    if any(d not in DATASETS for d in args.datasets):
        parser.error(f"--datasets takes {', '.join(DATASETS)}")
    args.ks = [int(k) for k in args.ks.split(",")]
    args.seed_batches = [int(size) for size in args.seed_batches.split(",")]
    args.devices = args.devices.split(",") if args.devices else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return args


def render(payloads: list[dict[str, Any]], notes_path: Path | None) -> str:
    """The markdown section from measurement payloads (one per device), with the notes appended."""
    settings = argparse.Namespace(**payloads[0]["settings"])
    settings.devices = [p["settings"]["devices"][0] for p in payloads]
    after = [row for p in payloads for row in p["after"]]
    before = [row for p in payloads for row in p["before"]] or None
    parts = [HERE / "results" / "throughput_precision.md", notes_path or HERE / "results" / "throughput_notes.md"]
    notes = "\n".join(part.read_text() for part in parts if part.exists())
    return markdown(after, before, payloads[0]["command"], settings, notes)


def main() -> None:
    args = parse_args()
    if args.worker:
        print(json.dumps(sweep(args)))
        return
    command = "python benchmarks/throughput.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    results = HERE / "results"
    if args.precision_experiment:
        text = precision_experiment(args)
        print(text)
        if not args.no_write:
            results.mkdir(exist_ok=True)
            (results / "throughput_precision.md").write_text(text + "\n")
        return
    if args.render_only:
        payloads = [json.loads((results / f"throughput_{device}.json").read_text()) for device in args.devices]
        write_section(HERE / "RESULTS.md", render(payloads, args.notes))
        return
    sweeps: dict[str, list[list[dict[str, Any]]]] = {"after": [], "before": []}
    for repeat in range(args.repeats):
        for version, code in (("before", args.before), ("after", REPO)):
            if code is not None:
                sweeps[version].append(run_worker(code, args, extras=args.extras and version == "after"))
                print(f"sweep {repeat + 1}/{args.repeats} of {version} done (load {load_average():.1f})", file=sys.stderr)
    after, before = median_rows(sweeps["after"]), median_rows(sweeps["before"])
    payloads = []
    for device in args.devices:
        settings = {"threads": args.threads, "repeats": args.repeats, "seconds": args.seconds, "datasets": args.datasets,
                    "devices": [device], "measured": time.strftime("%Y-%m-%d %H:%M")}
        payloads.append({"command": command, "settings": settings,
                         "after": [r for r in after if r["device"] == device],
                         "before": [r for r in before if r["device"] == device],
                         "sweeps": {v: [[r for r in s if r["device"] == device] for s in sweeps[v]] for v in sweeps}})
    text = render(payloads, args.notes)
    print(text)
    if args.no_write:
        return
    results.mkdir(exist_ok=True)
    for device, payload in zip(args.devices, payloads):
        (results / f"throughput_{device}.json").write_text(json.dumps(payload, indent=1))
    write_section(HERE / "RESULTS.md", text)


if __name__ == "__main__":
    main()
