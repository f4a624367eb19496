"""Evolve a network with M2N2 (or a baseline) under Lightning, configured by Hydra.

    python train.py                                  # the paper's digits setting
    python train.py experiment=mnist_mlp             # MNIST, 784-256-10
    python train.py -m strategy=m2n2,ga seed=0,1,2   # a sweep
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.callbacks import OnExceptionCheckpoint
from omegaconf import DictConfig, OmegaConf

from m2n2_lightning import EvolutionModule, FlatParams
from m2n2_lightning.config import register_schema, steps_for
from m2n2_lightning.strategies.base import build_strategy

register_schema()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> dict:
    """Build everything from the config (checks first), fit, test, and write the outputs."""
    out = Path(HydraConfig.get().runtime.output_dir)
    L.seed_everything(cfg.seed, workers=True)
    # Construction validates every setting, before any data is read or step is run:
    # the strategy config is a factory (`_partial_: true`), called with the model's D.
    model = instantiate(cfg.model)
    flat = FlatParams(model)
    strategy = build_strategy(instantiate(cfg.strategy), flat.num_params, layout=flat.layout)
    max_steps = steps_for(cfg.forward_passes, strategy.candidates_per_step)
    module = EvolutionModule(model, strategy, **cfg.module)
    datamodule = instantiate(cfg.data)
    checkpoints = instantiate(cfg.checkpoint)
    trainer: L.Trainer = instantiate(
        cfg.trainer,
        max_steps=max_steps,
        logger=instantiate(cfg.logger),
        callbacks=[checkpoints, OnExceptionCheckpoint(dirpath=checkpoints.dirpath, filename="interrupted")],
    )

    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    wall = time.perf_counter() - start
    if trainer.interrupted:
        print(f"Interrupted: the last state is in {checkpoints.dirpath}/interrupted.ckpt")
        return {}
    test_acc = trainer.test(module, datamodule=datamodule, verbose=False)[0]["test/acc"]
    best_train = float(module.engine.metrics()["train/best_score"])
    if not trainer.is_global_zero:  # under DDP every rank holds the same result: rank zero writes it
        return {}

    torch.save(module.best_model().state_dict(), out / "best_model.pt")
    summary = {
        "strategy": HydraConfig.get().runtime.choices.get("strategy"),
        "experiment": HydraConfig.get().runtime.choices.get("experiment"),
        "seed": cfg.seed,
        "forward_passes": strategy.forward_passes,
        "best_train_acc": best_train,
        "test_acc": test_acc,
        "wall_seconds": wall,
        "forward_passes_per_second": strategy.forward_passes / wall,
        "steps": trainer.global_step,
        "output_dir": str(out),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    OmegaConf.save(cfg, out / "config_resolved.yaml", resolve=True)
    print(
        f"{summary['strategy']} (seed {cfg.seed}): {summary['forward_passes']} forward passes in "
        f"{wall:.1f} s ({summary['forward_passes_per_second']:.0f}/s); best member: train accuracy "
        f"{best_train:.4f}, test accuracy {test_acc:.4f}.\nOutputs in {out}: summary.json, "
        f"best_model.pt, checkpoints/, logs/ (metrics, class_accuracy.png)."
    )
    return summary


if __name__ == "__main__":
    main()
