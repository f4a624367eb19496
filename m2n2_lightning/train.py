"""Evolve a network with M2N2 (or a baseline) under Lightning, configured by Hydra (configs in conf/).

    m2n2-train                                       # the paper's digits setting (or python train.py,
                                                     # or python -m m2n2_lightning)
    python train.py experiment=mnist_mlp             # MNIST, 784-256-10
    python train.py -m strategy=m2n2,ga seed=0,1,2   # a sweep
    python train.py experiment=lm_merge              # merging two fine-tuned toy language models (m2n2_lightning/lm)
    python train.py experiment=merge ...             # merging your own models on your tasks (or m2n2-merge recipe.yaml)
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from m2n2_lightning import EvolutionModule, FlatParams
from m2n2_lightning.checkpointing import InterruptCheckpoint, load_checkpoint_file
from m2n2_lightning.checks import check_optimized_metric, report_in_one_line
from m2n2_lightning.config import register_schema, step_intervals
from m2n2_lightning.loggers import check_logger_installed, quiet_lightning
from m2n2_lightning.merge_run import build_merge, check_merge
from m2n2_lightning.progress import AccuracyCurve, EvolutionProgressBar
from m2n2_lightning.resume import check_evolution_state
from m2n2_lightning.run_lock import lock_run_directory
from m2n2_lightning.stopping import StopReport
from m2n2_lightning.strategies import M2N2Strategy
from m2n2_lightning.strategies.base import build_strategy
from m2n2_lightning.threads import auto_threads

register_schema()
log = logging.getLogger("m2n2_lightning.train")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
@report_in_one_line  # a bad value: its message alone (HYDRA_FULL_ERROR=1: the traceback)
def main(cfg: DictConfig) -> dict | float:
    """Build everything from the config (checks first), fit, test, and write the outputs."""
    # The state after the evolution step is the one to checkpoint: Lightning's advice for manual
    # optimization (save the pre-step state yourself) does not apply.
    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
    out = Path(HydraConfig.get().runtime.output_dir)
    lock_run_directory(out)  # a second run in this directory is refused
    route_lightning_logs_to_hydra()
    quiet_lightning()  # no tips or warnings that ask nothing of the user
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    # Every check before any data is read or step is run: the strategy config is a factory
    # (`_partial_: true`), called with the model's D; the data module's constructor reads nothing.
    if cfg.ckpt_path is not None:
        check_evolution_state(load_checkpoint_file(cfg.ckpt_path), cfg.ckpt_path)
    check_logger_installed(cfg.logger)
    check_optimized_metric(cfg.get("optimized_metric"))
    check_ablation(cfg.strategy, HydraConfig.get().runtime.choices)
    if cfg.merge is not None:  # experiment=merge, lm_merge: seed models scored by tasks (m2n2_lightning/merge_run.py)
        check_merge(cfg)
        return result_of(cfg, merge(cfg, out))
    check_evolution_keys(cfg)
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model, in_features=cfg.model.get("in_features") or datamodule.input_dim)
    flat = FlatParams(model, include_frozen=cfg.module.get("evolve_frozen", False))
    torch.set_num_threads(cfg.threads or auto_threads(flat.num_params, datamodule.num_train))
    strategy = build_strategy(instantiate(cfg.strategy), flat.num_params, layout=flat.layout)
    # forward passes per training step; step_intervals checks forward_passes, in the config's own terms
    steps = step_intervals(cfg, cfg.module.steps_per_batch * strategy.candidates_per_step)
    module = EvolutionModule(
        model, strategy, max_forward_passes=cfg.forward_passes, allow_resume_changes=cfg.allow_resume_changes,
        **cfg.module,
    )
    checkpoints = instantiate(cfg.checkpoint, every_n_train_steps=steps.pop("every_n_train_steps"))
    curve = AccuracyCurve()  # logs/accuracy.png for any logger, over the whole run after a resume
    trainer = make_trainer(cfg, checkpoints, [curve], **steps)

    start = time.perf_counter()
    # SIGINT / SIGTERM: SignalStop, exit 130 / 143, after `interrupted` has saved and said where
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path, weights_only=True)
    wall = time.perf_counter() - start
    trainer.save_checkpoint(Path(checkpoints.dirpath) / "last.ckpt", weights_only=False)  # the final state, whatever the interval
    test_acc = trainer.test(module, datamodule=datamodule, verbose=False)[0]["test/acc"]
    best_train = float(module.engine.metrics()["train/best_score"])
    if not trainer.is_global_zero:  # under DDP every rank holds the same result: rank zero writes it
        return {}

    torch.save(module.best_model().state_dict(), out / "best_model.pt")
    done = strategy.forward_passes - module.evolution.forward_passes_at_start
    summary = {
        "strategy": HydraConfig.get().runtime.choices.get("strategy"),
        "experiment": HydraConfig.get().runtime.choices.get("experiment"),
        "seed": strategy.seed,
        "forward_passes": strategy.forward_passes,
        "forward_passes_this_run": done,
        "resources": strategy.num_resources,
        "best_train_acc": best_train,
        "test_acc": test_acc,
        "wall_seconds": wall,
        "forward_passes_per_second": done / wall if done else None,  # a finished run resumed: no rate
        "precision": str(trainer.precision),
        "strategy_settings": strategy.settings(),
        "output_dir": str(out),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    curve.save(out / "logs" / "accuracy.png", test_acc, f"{summary['strategy']} on {summary['experiment']}, seed {strategy.seed}")
    OmegaConf.save(cfg, out / "config_resolved.yaml", resolve=True)
    log.info(
        "%s (seed %d): %d forward passes in %.1f s%s; best member: train accuracy %.4f, test accuracy %.4f.",
        summary["strategy"], strategy.seed, done, wall, f" ({done / wall:.0f}/s)" if done else "", best_train, test_acc,
    )
    log.info("Outputs in %s: summary.json, best_model.pt, checkpoints/, logs/ (metrics, plots).", out)
    return result_of(cfg, summary)


def check_ablation(strategy: DictConfig, choices: Any) -> None:
    """Refuse an `ablation=` over a strategy that has not M2N2's switches (it would fail later, in a TypeError)."""
    ablation = choices.get("ablation")
    if ablation in (None, "null"):
        return
    target = get_class(strategy._target_)
    if not issubclass(target, M2N2Strategy):
        raise ValueError(
            f"ablation={ablation} switches M2N2's operators (competition, matchmaker, split point, crossover); "
            f"strategy={choices.get('strategy')} ({target.__name__}) has none: use strategy=m2n2 (or m2n2_merge for "
            "a merge) with it, or drop the ablation"
        )


def check_evolution_keys(cfg: DictConfig) -> None:
    """Refuse the keys of a merge in an experiment that evolves a model on data (they would be ignored)."""
    if cfg.get("lm") is not None:
        raise ValueError("lm.* belongs to experiment=lm_merge (the toy seeds): remove it, or add experiment=lm_merge")
    for key in ("data", "model", "val_every", "module.score_fn"):
        if OmegaConf.select(cfg, key) is None:
            raise ValueError(f"{key} must be set for experiment={HydraConfig.get().runtime.choices.get('experiment')}")


def make_trainer(cfg: DictConfig, checkpoints: Any, callbacks: list[Any], **steps: int) -> L.Trainer:
    """The config's Trainer with the run's callbacks first, then the checkpoints, the interrupt checkpoint,
    the progress bar in forward passes and the user's callbacks; `steps` from `config.step_intervals`."""
    interrupted = InterruptCheckpoint(checkpoints.dirpath)
    progress_bar = [EvolutionProgressBar(cfg.forward_passes)] if cfg.trainer.get("enable_progress_bar", True) else []
    user_callbacks = [instantiate(c) for c in (cfg.callbacks or {}).values()]
    return instantiate(
        cfg.trainer, logger=instantiate(cfg.logger),
        callbacks=[*callbacks, checkpoints, interrupted, StopReport(Path(checkpoints.dirpath) / "last.ckpt"), *progress_bar,
                   *user_callbacks], **steps,
    )


def merge(cfg: DictConfig, out: Path) -> dict[str, Any]:
    """A merge (checked by `check_merge`): tasks read, base model loaded, seeds merged, best member tested and saved."""
    checkpoints = instantiate(cfg.checkpoint)  # its interval is set once the strategy is built (StepIntervals)
    run = build_merge(cfg, checkpoints)
    # at most one training step per evaluation; StepIntervals sets the exact count from the strategy
    trainer = make_trainer(cfg, checkpoints, run.callbacks, max_steps=cfg.forward_passes)
    # SIGINT / SIGTERM: SignalStop, exit 130 / 143, after the interrupt checkpoint has saved and said where
    trainer.fit(run.module, ckpt_path=cfg.ckpt_path, weights_only=True)
    trainer.save_checkpoint(Path(checkpoints.dirpath) / "last.ckpt", weights_only=False)
    summary = run.finish(trainer, out)
    if trainer.is_global_zero:
        OmegaConf.save(cfg, out / "config_resolved.yaml", resolve=True)
    return summary


def result_of(cfg: DictConfig, summary: dict) -> dict | float:
    """What `main` returns: the summary, or its `optimized_metric` entry for a sweeper."""
    metric = cfg.get("optimized_metric")
    return float(summary[metric]) if metric else summary


def route_lightning_logs_to_hydra() -> None:
    """Send Lightning's log records through the root logger, so Hydra's train.log holds them too."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.propagate = True


if __name__ == "__main__":
    main()
