"""Wall time of the Lightning loop against a bare Python loop driving the same strategy.

Both run M2N2 (paper settings, k = 1) on the embedded digits for the same number
of forward passes from the same seed, and must end with the same archive. Both
do the same side work: the Lightning run logs like a normal `train.py` run (CSV
logger, metrics every `--log-every` steps, validation every `--val-every`); the
bare loop computes the same metrics and validation at the same steps and writes
them to a CSV. Checkpoints and progress bars are off in both.

    python benchmarks/lightning_overhead.py --forward-passes 5000 --repeats 3

It also times Lightning's own per-step work alone (the floor): the same Trainer
and data driving a module whose optimizer step does nothing and which logs
nothing. Divided by the bare loop's time per step, that floor is the least
overhead any evolution step of that length can have under Lightning. And it
times the evolution step itself (`engine.step`) inside each loop: the same
work, so a difference is the step running slower between Lightning's work.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import tempfile
import time
from functools import partial

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger

from m2n2_lightning import MLP, FlatParams, M2N2Strategy
from m2n2_lightning.data import DigitsDataModule
from m2n2_lightning.engine import EvolutionEngine
from m2n2_lightning.module import EvolutionModule
from m2n2_lightning.optimizer import EvolutionOptimizer


class StepTimer:
    """Stands in for an engine's `step` and adds up the wall time spent inside it."""

    def __init__(self, engine: EvolutionEngine) -> None:
        self.seconds, self.calls, self._step = 0.0, 0, engine.step
        engine.step = self

    def __call__(self, k: int | None = None) -> None:
        start = time.perf_counter()
        self._step(k)
        self.seconds += time.perf_counter() - start
        self.calls += 1

    @property
    def per_call(self) -> float:
        return self.seconds / self.calls


class TimeSteps(L.Callback):
    """Puts a `StepTimer` on the module's engine once fit has built it (the callback's `setup`)."""

    def __init__(self) -> None:
        self.timer: StepTimer | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.timer = StepTimer(pl_module.engine)


class EmptyStep(L.LightningModule):
    """Lightning's per-step machinery alone: manual optimization, one optimizer step that does nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def configure_optimizers(self) -> EvolutionOptimizer:
        return EvolutionOptimizer(self.parameters(), lambda: None)

    def training_step(self, batch: object, batch_idx: int) -> None:
        self.optimizers().step()


def bare_loop(steps: int, seed: int, k: int, val_every: int, log_every: int, folder: str) -> tuple[float, torch.Tensor, float]:
    """The same work by hand: steps, the same metrics every `log_every` steps, validation, a CSV.

    Returns the wall time, the final archive and the mean time of one evolution step.
    """
    data = DigitsDataModule()
    start = time.perf_counter()
    model = MLP()
    engine = EvolutionEngine(model, M2N2Strategy(FlatParams(model).num_params, seed=seed, children_per_step=k))
    timer = StepTimer(engine)
    engine.attach(*data.train_tensors)
    engine.start()
    val_x, val_y = data.val_tensors
    rows = []
    for step in range(1, steps + 1):
        engine.step()
        if step % log_every == 0:
            rows.append({"step": step, **{k: float(v) for k, v in engine.metrics().items()}})
        if data.val_size and step % val_every == 0:  # as Lightning: no validation split, no validation
            accuracy = (engine.model(val_x).argmax(-1) == val_y).float().mean()
            rows.append({"step": step, "val/acc": float(accuracy)})
    with open(f"{folder}/bare.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=sorted({k for row in rows for k in row}))
        writer.writeheader()
        writer.writerows(rows)
    return time.perf_counter() - start, engine.strategy.archive.members.clone(), timer.per_call


def timed_fit(
    module: L.LightningModule, steps: int, val_every: int, log_every: int, callbacks: list[L.Callback] | None = None
) -> float:
    """Seconds of `trainer.fit` for `steps` steps on the digits, CSV logger, no checkpoints or progress bar."""
    with tempfile.TemporaryDirectory() as folder:
        trainer = L.Trainer(
            max_steps=steps,
            logger=CSVLogger(folder),
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            val_check_interval=val_every,
            check_val_every_n_epoch=None,
            log_every_n_steps=log_every,
            callbacks=callbacks,
        )
        start = time.perf_counter()
        trainer.fit(module, datamodule=DigitsDataModule(steps_per_epoch=1000))
        return time.perf_counter() - start


def lightning_loop(steps: int, seed: int, k: int, val_every: int, log_every: int) -> tuple[float, torch.Tensor, float]:
    """`bare_loop`'s work under a Trainer; the same three results."""
    module = EvolutionModule(MLP(), partial(M2N2Strategy, seed=seed, children_per_step=k), heatmap=False)
    timing = TimeSteps()
    seconds = timed_fit(module, steps, val_every, log_every, [timing])
    return seconds, module.strategy.archive.members.clone(), timing.timer.per_call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--forward-passes", type=int, default=5000)
    parser.add_argument("--children-per-step", "-k", type=int, default=1, help="k (1 = the paper)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val-every", type=int, default=1000)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    k = args.children_per_step
    steps = -(-args.forward_passes // k)
    bare, lit, floor, bare_step, lit_step = [], [], [], [], []
    for _ in range(args.repeats):  # interleaved, so drift in machine load hits both alike
        with tempfile.TemporaryDirectory() as folder:
            seconds, bare_archive, step = bare_loop(steps, args.seed, k, args.val_every, args.log_every, folder)
        bare.append(seconds)
        bare_step.append(step)
        seconds, lit_archive, step = lightning_loop(steps, args.seed, k, args.val_every, args.log_every)
        lit.append(seconds)
        lit_step.append(step)
        floor.append(timed_fit(EmptyStep(), steps, 10**9, 10**9))
        if not torch.equal(bare_archive, lit_archive):
            raise SystemExit("the two loops ended with different archives: not the same computation")
    b, t = statistics.median(bare), statistics.median(lit)
    print(f"forward passes: {steps * k} (k = {k}, {steps} steps), repeats: {args.repeats}, threads: {torch.get_num_threads()}")
    print(f"bare loop:      median {b:.2f} s  ({steps * k / b:.0f} forward passes/s)  all {[round(x, 2) for x in bare]}")
    print(f"Lightning loop: median {t:.2f} s  ({steps * k / t:.0f} forward passes/s)  all {[round(x, 2) for x in lit]}")
    print(f"overhead: {100 * (t / b - 1):+.1f}%  (same final archive: yes)")
    inside, outside = statistics.median(lit_step), statistics.median(bare_step)
    print(f"the evolution step itself: {1e3 * outside:.3f} ms in the bare loop, {1e3 * inside:.3f} ms inside Lightning "
          f"({1e3 * (inside - outside):+.3f} ms)")
    f = statistics.median(floor)
    print(f"Lightning's own work per step (empty step, no logging or validation): {1e3 * f / steps:.3f} ms "
          f"= {100 * f / b:.0f}% of a bare-loop step ({1e3 * b / steps:.3f} ms)  all {[round(x, 2) for x in floor]}")


if __name__ == "__main__":
    main()
