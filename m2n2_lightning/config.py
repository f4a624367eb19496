"""The typed top level of the Hydra config, and the checks run before any work starts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore


@dataclass
class RunSchema:
    """Top-level keys of `m2n2_lightning/conf/config.yaml`; Hydra rejects values of the wrong type."""

    seed: int = 0
    forward_passes: int = 50_000
    log_every: int = 500
    #: None where the experiment has no validation (a merge).
    val_every: int | None = 5000
    checkpoint_every: int = 5000
    ckpt_path: str | None = None
    allow_resume_changes: bool = False
    threads: int | None = None
    callbacks: Any = field(default_factory=dict)
    optimized_metric: str | None = None
    module: Any = field(default_factory=dict)
    checkpoint: Any = field(default_factory=dict)
    data: Any = None
    model: Any = None
    strategy: Any = None
    trainer: Any = None
    logger: Any = None
    #: A merge's recipe (conf/experiment/merge.yaml): seeds, base model, dtype, tasks; None for the other experiments.
    merge: Any = None
    #: The toy seeds of experiment=lm_merge (m2n2_lightning/lm/seeds.py); None for the other experiments.
    lm: Any = None


def register_schema() -> None:
    """Make `run_schema` available to the defaults list of `m2n2_lightning/conf/config.yaml`."""
    ConfigStore.instance().store(name="run_schema", node=RunSchema)


def step_intervals(cfg: Any, per_step: int) -> dict[str, int]:
    """The config's budget and intervals, given in forward passes (evaluations), as Lightning training steps of
    `per_step` forward passes each: the one place where evaluations become steps, for every experiment."""
    steps = {
        "max_steps": steps_for(cfg.forward_passes, per_step),
        "log_every_n_steps": every(cfg.log_every, per_step),
        "every_n_train_steps": every(cfg.checkpoint_every, per_step),
    }
    if cfg.get("val_every") is not None:
        steps["val_check_interval"] = every(cfg.val_every, per_step)
    return steps


def every(forward_passes: int, per_step: int) -> int:
    """An interval in forward passes as a number of Lightning training steps (at least 1)."""
    return max(1, forward_passes // per_step)


def steps_for(forward_passes: int, candidates_per_step: int) -> int:
    """Trainer steps that score at least `forward_passes` candidates."""
    if forward_passes < 1:
        raise ValueError(f"forward_passes must be >= 1, got {forward_passes}")
    return -(-forward_passes // candidates_per_step)
