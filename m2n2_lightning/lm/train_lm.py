"""`train.py experiment=lm_merge`: one language-model merge from the Hydra config, and its outputs.

Writes into the run directory: summary.json (the per-skill test accuracies, their mean
over `lm.skills` as `test_acc`, the training accuracy, time, settings), best_model/
(`save_pretrained` of the merge), curves.csv (niche coverage, fitness entropy and best
training score after every evolution step: the paper's figure 5), checkpoints/ (periodic,
last.ckpt, interrupted.ckpt after a stop), the logger's files and config_resolved.yaml.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import OmegaConf

from m2n2_lightning.checkpointing import InterruptCheckpoint
from m2n2_lightning.lm.experiment import load_experiment, search
from m2n2_lightning.lm.merge import MergeResult, write_curve
from m2n2_lightning.params import FlatParams
from m2n2_lightning.progress import EvolutionProgressBar
from m2n2_lightning.merging.output import save_merged
from m2n2_lightning.threads import auto_threads

log = logging.getLogger("m2n2_lightning.train")


def skill_mean(test: dict[str, float], skills: list[str]) -> float:
    """Mean test accuracy over the trained skills (the merge's target; the paper's Table 1 'average')."""
    return sum(test[name] for name in skills) / len(skills)


def summary_of(cfg: Any, result: MergeResult, resources: int, out: Path) -> dict[str, Any]:
    """summary.json's content: train.py's keys, plus `test` (every test set's accuracy) and the seeds."""
    choices = HydraConfig.get().runtime.choices
    skills = [name for name in cfg.lm.skills if name in result.test]
    return {
        "strategy": choices.get("strategy"),
        "experiment": choices.get("experiment"),
        "seed": cfg.seed,
        "forward_passes": result.forward_passes,
        "resources": resources,
        "best_train_acc": result.train,
        "test_acc": skill_mean(result.test, skills) if skills else None,
        "test": result.test,
        "score": cfg.lm.score,
        "wall_seconds": result.wall_seconds,
        "forward_passes_per_second": result.forward_passes / result.wall_seconds if result.wall_seconds else None,
        "strategy_settings": result.settings,
        "output_dir": str(out),
    }


def run(cfg: Any, out: Path) -> dict[str, Any]:
    """Merge as the config says, with train.py's checkpoints, logger and progress bar; write the outputs."""
    experiment = load_experiment(cfg.lm)
    num_params = FlatParams(experiment.model).num_params
    torch.set_num_threads(cfg.threads or auto_threads(num_params, len(experiment.resources)))
    checkpoints = instantiate(cfg.checkpoint, every_n_train_steps=max(1, cfg.checkpoint_every))
    interrupted = InterruptCheckpoint(checkpoints.dirpath)
    progress = [EvolutionProgressBar(cfg.forward_passes)] if cfg.trainer.get("enable_progress_bar", True) else []
    user_callbacks = [instantiate(c) for c in (cfg.callbacks or {}).values()]
    trainers: list[L.Trainer] = []

    def make_trainer(**options: Any) -> L.Trainer:
        trainer = instantiate(cfg.trainer, logger=instantiate(cfg.logger), log_every_n_steps=max(1, cfg.log_every),
                              limit_val_batches=0, **options)
        trainers.append(trainer)
        return trainer

    # SIGINT / SIGTERM: SignalStop (exit 130 / 143), after `interrupted` has saved and said where
    result = search(cfg, experiment, make_trainer, [checkpoints, interrupted, *progress, *user_callbacks], cfg.ckpt_path)
    trainers[0].save_checkpoint(Path(checkpoints.dirpath) / "last.ckpt", weights_only=False)
    summary = summary_of(cfg, result, len(experiment.resources), out)
    if not trainers[0].is_global_zero:  # under DDP every rank holds the same result: rank zero writes it
        return summary
    save_merged(experiment.model, out / "best_model")
    write_curve(result.curve, out / "curves.csv")
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    OmegaConf.save(cfg, out / "config_resolved.yaml", resolve=True)
    shown = ", ".join(f"{name} {acc:.3f}" for name, acc in result.test.items())
    log.info("%s (seed %d): %d evaluations in %.1f s; best member: train accuracy %.4f, test %s (mean of %s: %.4f).",
             summary["strategy"], cfg.seed, result.forward_passes, result.wall_seconds, result.train, shown,
             "/".join(cfg.lm.skills), summary["test_acc"])
    log.info("Outputs in %s: summary.json, best_model/, curves.csv, checkpoints/, logs/.", out)
    return summary
