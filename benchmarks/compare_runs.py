"""The runs of benchmarks/compare.py in the scratch and merge settings: one method and seed in a bare engine loop.

A method is a strategy config of m2n2_lightning/conf/strategy/, built by Hydra exactly as
`train.py` builds it (a factory called with the model's D by `build_strategy`) and run by
`EvolutionEngine` without a Trainer; `slerp_brute_force` is the paper's other merging baseline.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from compare_outputs import BRUTE_FORCE
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import Tensor, nn

from m2n2_lightning.config import register_schema, steps_for
from m2n2_lightning.engine import EvolutionEngine
from m2n2_lightning.evaluator import Evaluator
from m2n2_lightning.lm.baselines import best_slerp
from m2n2_lightning.params import FlatParams, flat_vector
from m2n2_lightning.specialists import SPECIALIST_CLASSES, train_specialists
from m2n2_lightning.strategies.base import build_strategy

CONF_DIR = Path(__file__).resolve().parents[1] / "m2n2_lightning" / "conf"
STRATEGY_METHODS = (
    "m2n2", "cmaes", "cmaes_diagonal", "ga", "ga_no_crossover", "m2n2_no_crossover",
    "m2n2_no_split_point", "m2n2_no_matchmaker", "map_elites",
)  # fmt: skip
#: Methods that cannot start from given models.
SCRATCH_ONLY = ("cmaes", "cmaes_diagonal")
EXPERIMENT = {"digits": "digits_mlp", "mnist": "mnist_mlp"}
#: --precision: the dtype candidates are scored in (as train.py's trainer.precision=bf16-mixed does).
PRECISIONS = {"32": None, "bf16": torch.bfloat16}
#: Candidates scored at once by the brute-force search.
BRUTE_FORCE_CHUNK = 100



@dataclass
class RunSpec:
    """Everything one (method, seed) run needs; picklable for worker processes."""

    method: str
    seed: int
    forward_passes: int
    eval_every: int
    device: str
    threads: int
    data: dict[str, Any]
    model: dict[str, Any]
    strategy: dict[str, Any] | None
    score_fn: str
    chunk_size: int | None
    init_models: list[Tensor] | None
    score_dtype: torch.dtype | None = None


def compose_config(method: str, seed: int, data: str, data_dir: str | None, extra: Sequence[str] = ()) -> Any:
    """The config `train.py` would build for this method, seed and data set, with `extra` Hydra overrides."""
    overrides = [f"seed={seed}", f"experiment={EXPERIMENT[data]}"]
    if method != BRUTE_FORCE:
        overrides.append(f"strategy={method}")
    if data_dir is not None:
        overrides.append(f"data.data_dir={data_dir}")
    return compose_train_config([*overrides, *extra])


def compose_train_config(overrides: Sequence[str]) -> Any:
    """train.py's config (m2n2_lightning/conf) with these Hydra overrides."""
    register_schema()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


ACCURACIES = ("best_train_acc", "test_acc")


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    return (model(x).argmax(dim=-1) == y).float().mean().item()


class Recorder:
    """Rows of one run: the best member's accuracies when it changes, or every `eval_every` forward passes.

    When the best member changes but its two accuracies do not (a GA often swaps
    one best member for another that is as good), no row is added: the curve is
    a step function, so the row would repeat the one before it.
    """

    def __init__(self, spec: RunSpec, model: nn.Module, train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor]) -> None:
        self.spec, self.model, self.train, self.test = spec, model, train, test
        self.rows: list[dict[str, Any]] = []
        self.start = time.perf_counter()
        self._best: Tensor | None = None
        self._reported_tenths = 0

    def after_step(self, forward_passes: int, best: Tensor) -> None:
        """Record if the best member `best` [D] (already in the model) is due for evaluation."""
        every = self.spec.eval_every
        if every > 0:
            due = not self.rows or forward_passes // every > self.rows[-1]["forward_passes"] // every
        else:
            due = self._best is None or not torch.equal(best, self._best)
        done = forward_passes >= self.spec.forward_passes
        if due or done:
            self._best = best.clone()
            self.record(forward_passes, keep_repeats=every > 0 or done)
        tenths = 10 * forward_passes // self.spec.forward_passes
        if tenths > self._reported_tenths:
            self._reported_tenths = tenths
            self.report(forward_passes)

    def record(self, forward_passes: int, keep_repeats: bool = True) -> None:
        row = dict(
            method=self.spec.method,
            seed=self.spec.seed,
            forward_passes=forward_passes,
            best_train_acc=accuracy(self.model, *self.train),
            test_acc=accuracy(self.model, *self.test),
            wall_seconds=time.perf_counter() - self.start,
        )
        if self.rows and self.rows[-1]["forward_passes"] == forward_passes:
            self.rows.pop()
        elif self.rows and not keep_repeats and all(self.rows[-1][key] == row[key] for key in ACCURACIES):
            return
        self.rows.append(row)

    def report(self, forward_passes: int) -> None:
        last, seconds = self.rows[-1], time.perf_counter() - self.start
        print(
            f"{self.spec.method} seed {self.spec.seed}: {forward_passes / self.spec.forward_passes:4.0%} "
            f"{forward_passes}/{self.spec.forward_passes} forward passes, best member train "
            f"{last['best_train_acc']:.3f} test {last['test_acc']:.3f}, {forward_passes / seconds:.0f}/s",
            flush=True,
        )


def run(spec: RunSpec) -> list[dict[str, Any]]:
    """One method, one seed: the recorded rows."""
    torch.set_num_threads(spec.threads)
    device = torch.device(spec.device)
    data = instantiate(spec.data)
    model = instantiate(spec.model, in_features=spec.model.get("in_features") or data.input_dim).to(device)
    train, test = (tuple(t.to(device) for t in pair) for pair in (data.train_tensors, data.test_tensors))
    if spec.method == BRUTE_FORCE:
        return brute_force(spec, model, train, test)
    flat = FlatParams(model)
    # The strategy config is a factory (`_partial_: true`): called with the model's D, as train.py does.
    strategy = build_strategy(instantiate(spec.strategy), flat.num_params, spec.init_models, flat.layout).to(device)
    engine = EvolutionEngine(model, strategy, spec.score_fn, spec.chunk_size, score_dtype=spec.score_dtype, flat=flat)
    engine.attach(*train)
    recorder = Recorder(spec, model, train, test)
    engine.start()
    recorder.after_step(0, strategy.best_params())
    try:
        for _ in range(steps_for(spec.forward_passes, strategy.candidates_per_step)):
            engine.step()
            recorder.after_step(strategy.forward_passes, strategy.best_params())
    except KeyboardInterrupt:
        print(f"{spec.method} seed {spec.seed}: stopped at {strategy.forward_passes} forward passes", flush=True)
        engine.load_best()
        recorder.record(strategy.forward_passes)
        raise RunInterrupted(recorder.rows) from None
    return recorder.rows


class RunInterrupted(Exception):
    """Ctrl-C during a run; carries the rows recorded up to then (the last at the stop)."""

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        super().__init__(f"interrupted after {len(rows)} rows")
        self.rows = rows


@torch.no_grad()
def brute_force(spec: RunSpec, model: nn.Module, train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor]) -> list[dict[str, Any]]:
    """The best of `forward_passes` SLERP weights w = linspace(0, 1) between the two
    specialists, by training accuracy (the first on ties); no split point."""
    if spec.init_models is None or len(spec.init_models) != 2:
        raise ValueError(f"{BRUTE_FORCE} merges two given models (--setting merge)")
    evaluator = Evaluator(model, *train, spec.score_fn, spec.chunk_size, dtype=spec.score_dtype)
    a, b = (m.to(evaluator.inputs.device) for m in spec.init_models)
    recorder = Recorder(spec, model, train, test)
    evaluator.flat.load_into(model, a)
    recorder.after_step(0, a)  # w = 0, the first specialist (scored again in the first chunk)

    def after_chunk(done: int, best: Tensor) -> None:
        evaluator.flat.load_into(model, best)
        recorder.after_step(done, best)

    best_slerp(evaluator, a, b, spec.forward_passes, BRUTE_FORCE_CHUNK, after_chunk)
    return recorder.rows


def build_specs(args: argparse.Namespace) -> list[RunSpec]:
    """Compose each run's config; in the merge setting train the specialists once per seed."""
    specs = []
    for seed in args.seeds:
        init_models = None
        for method in args.methods:
            cfg = compose_config(method, seed, args.data, args.data_dir, args.override)
            if args.setting == "merge" and init_models is None:
                init_models = specialist_vectors(cfg, seed)
            specs.append(
                RunSpec(
                    method=method,
                    seed=seed,
                    forward_passes=args.forward_passes,
                    eval_every=args.eval_every,
                    device=args.device,
                    threads=args.threads,
                    data=OmegaConf.to_container(cfg.data, resolve=True),
                    model=OmegaConf.to_container(cfg.model, resolve=True),
                    strategy=None if method == BRUTE_FORCE else OmegaConf.to_container(cfg.strategy, resolve=True),
                    score_fn=cfg.module.score_fn,
                    chunk_size=cfg.module.chunk_size,
                    init_models=init_models,
                    score_dtype=PRECISIONS[args.precision],
                )
            )
    return specs


def specialist_vectors(cfg: Any, seed: int) -> list[Tensor]:
    """Train the specialists for this seed (Lightning + Adam) and report their test accuracy."""
    data = instantiate(cfg.data)
    specialists = train_specialists(data, seed=seed, hidden=cfg.model.hidden)
    shown = ", ".join(
        f"digits {classes[0]}-{classes[-1]}: {accuracy(model, *data.test_tensors):.3f}"
        for classes, model in zip(SPECIALIST_CLASSES, specialists)
    )
    print(f"specialists of seed {seed} (test accuracy on all digits): {shown}", flush=True)
    return [flat_vector(model) for model in specialists]


def run_all(specs: Sequence[Any], jobs: int, on_done: Callable[[Any], None], worker: Callable[[Any], Any] = run) -> None:
    """Run `worker` on the specs, `jobs` processes at a time (in this process when 1). With one job,
    Ctrl-C ends the current run, keeps its rows so far (`RunInterrupted`) and skips the rest."""
    if jobs == 1:
        for spec in specs:
            try:
                on_done(worker(spec))
            except RunInterrupted as stop:
                on_done(stop.rows)
                return
        return
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=quiet) as pool:
        for future in as_completed([pool.submit(worker, spec) for spec in specs]):
            on_done(future.result())


def quiet() -> None:
    """Silence Lightning's per-Trainer banners and warnings about data loader workers."""
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
    # The LM setting's Trainer: its module holds a model in eval mode, and its training_step only monitors.
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
    warnings.filterwarnings("ignore", message=".*`training_step` returned `None`.*")

