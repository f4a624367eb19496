"""`M2N2Callback`: the one Lightning integration; evolves a LightningModule's parameters instead of its optimizer.

In `on_fit_start` the callback takes over the trainer's optimization
(`m2n2_lightning.takeover`): one `EvolutionOptimizer` over the module's
parameters, whose `step()` *is* the evolution step, and no learning-rate
schedulers. Lightning's optimizer step, hooks and step counter therefore work
unchanged: `global_step` advances by one per training step, so `max_steps`,
`val_check_interval` and `ModelCheckpoint(every_n_train_steps=...)` count
training steps, each of `steps_per_batch` evolution steps.

- Automatic optimization (any LightningModule): `training_step` still runs,
  as a monitor of the current best member (its loss and metrics are logged as
  usual), without a backward pass or an autograd graph.
- Manual optimization (`EvolutionModule`): `training_step` calls
  `self.optimizers().step()`.

`EvolutionModule` is a thin LightningModule that returns this callback from
`configure_callbacks`, so both entry points share this code: the evolution
step, the resources, the logging, the checkpoint state and DDP.
"""

from __future__ import annotations

import signal
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from m2n2_lightning.checkpointing import use_atomic_checkpoints
from m2n2_lightning.distributed import warn_if_wrapped
from m2n2_lightning.engine import (
    EvolutionEngine,
    collect_resources,
    log_evolution,
    precision_dtype,
    save_and_log_heatmap,
)
from m2n2_lightning.evaluator import EvaluateFn
from m2n2_lightning.optimizer import EvolutionOptimizer, check_precision
from m2n2_lightning.params import FlatParams
from m2n2_lightning.resume import ResumeRecord, dataset_hash, resource_hash, run_fingerprint
from m2n2_lightning.scoring import ScoreFn, get_score_fn
from m2n2_lightning.merging.seed_store import SEEDS_IN, load_seeds
from m2n2_lightning.merging.seeds import SeedSource
from m2n2_lightning.stopping import StopOnSignal
from m2n2_lightning.strategies import M2N2Strategy
from m2n2_lightning.strategies.base import (
    Strategy,
    StrategySpec,
    build_strategy,
)
from m2n2_lightning.checks import check_labels, check_positive_int, check_resources, low_precision_of
from m2n2_lightning.takeover import OptimizationTakeover


class M2N2Callback(Callback):
    """Evolve the LightningModule's parameters with M2N2 (or any strategy); its optimizer is never stepped.

    Args:
        strategy: a strategy factory called with `num_params=D` (and
            `init_models=[...]` with `init_from`), e.g.
            `functools.partial(M2N2Strategy, pop_size=10)`, or a built strategy
            of the module's D. Default: `M2N2Strategy`, the paper's settings.
        init_from: two or more seed models to merge: Lightning `.ckpt` files,
            `torch.save(state_dict)` files, `.safetensors` files or sharded
            indexes, Hugging Face directories or hub ids, or modules
            (`m2n2_lightning.merging.seeds`). A seed that does not match the module
            is a ValueError naming the tensors and the source, in `setup`.
        score_fn: per-example scores of the vectorised forward pass: a name from
            `m2n2_lightning.scoring` (default "correctness", the paper's) or a
            callable `(outputs, batch) -> [k, N]` in [0, 1], where `outputs` is
            the module's output for k candidates (leading dimension k) and
            `batch` the resources `(x, y)` on the device.
        evaluate: score by user code instead: `evaluate(module, batch) -> [B]`
            in [0, 1], called with each candidate's weights loaded into the
            module (in eval mode, under no_grad), so it may call `generate`,
            run a tokenizer, an environment, a CLIP model: anything. Needs
            `resources`, a fixed-order dataset or DataLoader (e.g. prompts with
            answers as strings); under DDP each rank scores its contiguous shard.
        resources: what the candidates are scored on: `(x, y)` tensors, or with
            `evaluate` a Dataset / DataLoader; default: the datamodule's
            `train_tensors` when it has them, else up to `max_resources`
            examples collected once from the train dataloader.
        resource_batch_size: batch size over a `resources` Dataset (a DataLoader keeps its own).
        max_resources: cap on the collected examples (None: all).
        chunk_size: candidates scored at once (None: all k together).
        block_size: examples scored per forward call (None: all of a rank's
            shard at once). Under DDP, a fixed value gives bit-identical results
            for any number of ranks (see `m2n2_lightning.distributed`).
        steps_per_batch: evolution steps per Lightning training step; more
            amortise Lightning's per-step cost, the results are the same.
        max_forward_passes: stop evolving once this many candidates are scored
            (the last training step then runs fewer evolution steps, and fit
            ends after it); None: no cap.
        evolve_frozen: also evolve parameters with `requires_grad=False`
            (default: they stay fixed and out of the flat vector).
        model: the submodule to evolve (default: the LightningModule itself).
        heatmap: at the end of fit, save the member-by-class accuracy heatmap.
        allow_resume_changes: resume from a checkpoint even when the strategy's
            class or settings, the parameter layout, the seeds or the resources
            differ from the checkpoint's (refused by default, naming every difference).
        seeds_in: where the seeds of `init_from` live during the search: "memory"
            (read once into one [K, D] stack in their dtype; the strategy moves
            it with itself) or "files" (left in their safetensors files and read
            through the OS page cache each time a child is written: the merge
            then holds the module alone, at the cost of reading the seeds again
            per child; `merging.seed_store`). Both give the same merge.
        best_in_training_step: load the best member into the module before each
            training step, so that `training_step` monitors it. With `evaluate`,
            the module holds each child while it is scored; False spares that
            reload (a whole model written per step) where `training_step` does
            not read the weights; the best member is then loaded only for
            validation, checkpoints and the end of fit.

    Stopping: SIGINT (Ctrl-C) and SIGTERM during fit stop the run once the
    current training step's evolution steps are done (a second Ctrl-C stops at
    once, rolling the evolution step back) by raising
    `m2n2_lightning.stopping.SignalStop`, a `SystemExit` with code 130 / 143,
    through Lightning's exception handling: an `InterruptCheckpoint` (or
    `OnExceptionCheckpoint`) then holds a consistent state that resumes
    exactly, and a script that does not catch it exits 130 / 143.
    `stop_signal` names the signal.

    After `fit`, the module's parameters hold the strategy's best member. The
    strategy's state (archive, scores, generator, counters) is the callback's
    checkpoint state, and `trainer.fit(..., ckpt_path=...)` resumes exactly.
    """

    def __init__(
        self,
        strategy: StrategySpec | None = None,
        init_from: Sequence[SeedSource] | None = None,
        score_fn: str | ScoreFn = "correctness",
        evaluate: EvaluateFn | None = None,
        resources: tuple[Tensor, Tensor] | Dataset | DataLoader | None = None,
        resource_batch_size: int = 32,
        max_resources: int | None = 10_000,
        chunk_size: int | None = None,
        block_size: int | None = None,
        steps_per_batch: int = 1,
        max_forward_passes: int | None = None,
        evolve_frozen: bool = False,
        model: nn.Module | None = None,
        heatmap: bool = True,
        allow_resume_changes: bool = False,
        best_in_training_step: bool = True,
        seeds_in: str = "memory",
    ) -> None:
        super().__init__()
        if init_from is not None and not isinstance(init_from, (str, Path, Mapping)) and isinstance(init_from, Iterable):
            init_from = list(init_from)  # a generator is read once, here
        if init_from is not None and (not isinstance(init_from, list | tuple) or len(init_from) < 2):
            raise ValueError(f"init_from must be a list of two or more seed models, got {init_from!r}")
        if init_from is not None and isinstance(strategy, Strategy):
            # here, not in setup: build_strategy refuses seeds for a built strategy (a ValueError naming the fix)
            build_strategy(strategy, strategy.num_params, init_models=[])
        get_score_fn(score_fn)  # a bad name fails here, before any data is read
        for name, value in (("max_resources", max_resources), ("chunk_size", chunk_size), ("block_size", block_size)):
            if value is not None:
                check_positive_int(name, value, 1)
        resources = check_resources(resources, evaluate)
        self.evaluate = evaluate
        self.resource_batch_size = check_positive_int("resource_batch_size", resource_batch_size, 1)
        self.strategy_spec = strategy if strategy is not None else M2N2Strategy
        self.init_from = list(init_from) if init_from is not None else None
        self.score_fn = score_fn
        self.resources = resources
        self.max_resources = max_resources
        self.chunk_size = chunk_size
        self.block_size = block_size
        self.steps_per_batch = check_positive_int("steps_per_batch", steps_per_batch, 1)
        self.max_forward_passes = None if max_forward_passes is None else check_positive_int(
            "max_forward_passes", max_forward_passes, 1
        )
        self.evolve_frozen = bool(evolve_frozen)
        self.best_in_training_step = bool(best_in_training_step)
        if seeds_in not in SEEDS_IN:
            raise ValueError(f"seeds_in must be one of {SEEDS_IN}, got {seeds_in!r}")
        if seeds_in == "files" and init_from is None:
            raise ValueError("seeds_in='files' reads the seed models of init_from from their files: give init_from")
        self.seeds_in = seeds_in
        #: SHA-256 of each seed's tensors, computed while they were read (with `init_from`, after `setup`).
        self.seed_digests: list[str] | None = None
        self.model = model
        self.heatmap = heatmap
        self.heatmap_path: Path | None = None
        self._resume = ResumeRecord(allow_resume_changes, evaluate)
        self.engine: EvolutionEngine | None = None
        #: Forward passes done before this run (a resumed run starts above 0).
        self.forward_passes_at_start = 0
        self._stop = StopOnSignal()
        self._takeover = OptimizationTakeover()

    @property
    def strategy(self) -> Strategy | None:
        """The strategy being run (built in `setup`)."""
        return None if self.engine is None else self.engine.strategy

    @property
    def stop_signal(self) -> int | None:
        """The signal that stopped the run (signal.SIGINT / SIGTERM), else None."""
        return self._stop.signal

    # ----------------------------------------------------------------- set-up
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Check the trainer, read the seeds, build the strategy and the engine (before any data is read)."""
        if stage != "fit" or self.engine is not None:
            return
        check_precision(trainer)
        warn_if_wrapped(trainer)
        use_atomic_checkpoints(trainer)
        target = self.model if self.model is not None else pl_module
        flat = FlatParams(target, include_frozen=self.evolve_frozen)
        seeds = None
        if self.init_from is not None:
            seeds = load_seeds(target, flat, self.init_from, self.seeds_in)
            self.seed_digests = seeds.digests
        strategy = build_strategy(self.strategy_spec, flat.num_params, seeds, flat.layout)
        self.engine = EvolutionEngine(
            target, strategy, self.score_fn, self.chunk_size, self.block_size,
            precision_dtype(trainer) or low_precision_of(target), flat,
        )
        self.engine.seed_digests = self.seed_digests

    def optimizer(self, pl_module: L.LightningModule) -> EvolutionOptimizer:
        """The optimizer whose step is `steps_per_batch` evolution steps (what `on_fit_start` installs)."""
        return EvolutionOptimizer(pl_module.parameters(), self.evolution_step)

    @torch.no_grad()
    def evolution_step(self) -> None:
        """`steps_per_batch` ask -> score -> tell steps, fewer where `max_forward_passes` is reached."""
        for _ in range(self.steps_per_batch):
            if self.max_forward_passes is not None and self.engine.forward_passes >= self.max_forward_passes:
                return
            self.engine.step()

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Attach the resources, insert the first members, take over the optimizer."""
        self._resume.check_restored(trainer.ckpt_path)
        self.engine.strategy.to(pl_module.device)
        if self.evaluate is not None:
            self._resume.set_resources(dataset_hash(self.resources))
            self.engine.attach_evaluate(self.resources, self.evaluate, self.resource_batch_size)
        else:
            inputs, targets = self._resources(trainer)
            check_labels(targets, getattr(trainer.datamodule, "num_classes", None))
            self.engine.attach(inputs, targets)
            self._resume.set_resources(resource_hash(inputs, targets))
        self.engine.start()
        for logger in trainer.loggers:  # hparams.yaml then holds the strategy's settings too
            logger.log_hyperparams({"evolution": run_fingerprint(self.engine)})
        self._takeover.take_over(trainer, pl_module, self.optimizer(pl_module))

    def _resources(self, trainer: L.Trainer) -> tuple[Tensor, Tensor]:
        if self.resources is not None:
            return self.resources
        datamodule = trainer.datamodule
        if datamodule is not None and hasattr(datamodule, "train_tensors"):
            inputs, targets = datamodule.train_tensors
            return inputs[: self.max_resources], targets[: self.max_resources]
        return collect_resources(trainer.fit_loop._data_source.dataloader(), self.max_resources)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.best_in_training_step:  # `training_step` monitors the best member
            self.engine.load_best()

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._load_best()

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # The checkpoint's module weights are views of the parameters: the best member is written into them here.
        self._load_best()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._load_best()

    def _load_best(self) -> None:
        """Write the best member into the module, unless it holds it (after `start`; nothing before)."""
        if self.engine is not None and self.engine.strategy.started:
            self.engine.load_best()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.forward_passes_at_start = self.engine.forward_passes
        # a SIGTERM caught by Lightning's own handler since it installed it (just before the fit loop): stop now
        self._stop.install(signal.SIGTERM if trainer.received_sigterm else None)
        self._stop.check()

    # ---------------------------------------------------------------- logging
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        log_evolution(pl_module, self.engine)
        self._stop.check()
        if self.max_forward_passes is not None and self.engine.forward_passes >= self.max_forward_passes:
            trainer.should_stop = True  # the budget is spent: every rank stops after this step

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        targets = self.engine.targets
        if self.heatmap and targets is not None and targets.dim() == 1 and not targets.is_floating_point():
            num_classes = getattr(trainer.datamodule, "num_classes", None) or int(targets.max()) + 1
            self.heatmap_path = save_and_log_heatmap(trainer, self.engine, num_classes)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._restore(trainer, pl_module)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore(trainer, pl_module)

    def _restore(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Undo what fit switched: the signal handlers, the backward pass, `requires_grad`."""
        self._stop.restore()
        self._takeover.hand_back(trainer, pl_module)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The strategy's state (archive, scores, generator, counters) and what it was run with."""
        return {} if self.engine is None else self._resume.state_dict(self.engine)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the strategy (Lightning calls this after `setup`), after checking that the checkpoint was
        made by the same strategy, settings and model; the resources are checked in `on_fit_start`."""
        if state_dict:
            self._resume.load_state_dict(self.engine, state_dict)
            self.forward_passes_at_start = self.engine.forward_passes  # a finished run resumed: nothing this run
