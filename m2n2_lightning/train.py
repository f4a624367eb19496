"""Evolve a network with M2N2 (or a baseline) under Lightning, configured by Hydra (configs in conf/).

    m2n2-train                                       # the paper's digits setting (or python train.py,
                                                     # or python -m m2n2_lightning)
    python train.py experiment=mnist_mlp             # MNIST, 784-256-10
    python train.py -m strategy=m2n2,ga seed=0,1,2   # a sweep
    python train.py experiment=lm_merge              # merging two fine-tuned language models (m2n2_lightning/lm)
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from m2n2_lightning import EvolutionModule, FlatParams
from m2n2_lightning.checkpointing import InterruptCheckpoint, load_checkpoint_file
from m2n2_lightning.checks import check_optimized_metric, report_in_one_line
from m2n2_lightning.config import register_schema, steps_for
from m2n2_lightning.loggers import check_logger_installed
from m2n2_lightning.progress import AccuracyCurve, EvolutionProgressBar
from m2n2_lightning.resume import check_evolution_state
from m2n2_lightning.run_lock import lock_run_directory
from m2n2_lightning.stopping import StopReport
from m2n2_lightning.strategies.base import build_strategy
from m2n2_lightning.threads import auto_threads

register_schema()
log = logging.getLogger("m2n2_lightning.train")


def every(forward_passes: int, per_step: int) -> int:
    """An interval in forward passes as a number of Lightning training steps (at least 1)."""
    return max(1, forward_passes // per_step)


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
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    # Every check before any data is read or step is run: the strategy config is a factory
    # (`_partial_: true`), called with the model's D; the data module's constructor reads nothing.
    if cfg.ckpt_path is not None:
        check_evolution_state(load_checkpoint_file(cfg.ckpt_path), cfg.ckpt_path)
    check_logger_installed(cfg.logger)
    check_optimized_metric(cfg.get("optimized_metric"))
    if cfg.lm is not None:  # experiment=lm_merge: merging language models by generation (m2n2_lightning/lm)
        from m2n2_lightning.lm.train_lm import run

        return result_of(cfg, run(cfg, out))
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model, in_features=cfg.model.get("in_features") or datamodule.input_dim)
    flat = FlatParams(model, include_frozen=cfg.module.get("evolve_frozen", False))
    torch.set_num_threads(cfg.threads or auto_threads(flat.num_params, datamodule.num_train))
    strategy = build_strategy(instantiate(cfg.strategy), flat.num_params, layout=flat.layout)
    per_step = cfg.module.steps_per_batch * strategy.candidates_per_step  # forward passes per training step
    max_steps = steps_for(cfg.forward_passes, per_step)  # checks forward_passes, in the config's own terms
    module = EvolutionModule(
        model, strategy, max_forward_passes=cfg.forward_passes, allow_resume_changes=cfg.allow_resume_changes,
        **cfg.module,
    )
    checkpoints = instantiate(cfg.checkpoint, every_n_train_steps=every(cfg.checkpoint_every, per_step))
    interrupted = InterruptCheckpoint(checkpoints.dirpath)
    curve = AccuracyCurve()  # logs/accuracy.png for any logger, over the whole run after a resume
    progress_bar = [EvolutionProgressBar(cfg.forward_passes)] if cfg.trainer.get("enable_progress_bar", True) else []
    user_callbacks = [instantiate(c) for c in (cfg.callbacks or {}).values()]
    trainer: L.Trainer = instantiate(
        cfg.trainer,
        max_steps=max_steps,
        log_every_n_steps=every(cfg.log_every, per_step),
        val_check_interval=every(cfg.val_every, per_step),
        logger=instantiate(cfg.logger),
        callbacks=[curve, checkpoints, interrupted, StopReport(Path(checkpoints.dirpath) / "last.ckpt"), *progress_bar,
                   *user_callbacks],
    )

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
