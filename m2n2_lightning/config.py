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
    val_every: int = 5000
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
    #: The language-model merge's settings (conf/experiment/lm_merge.yaml); None for the other experiments.
    lm: Any = None


def register_schema() -> None:
    """Make `run_schema` available to the defaults list of `m2n2_lightning/conf/config.yaml`."""
    ConfigStore.instance().store(name="run_schema", node=RunSchema)


def steps_for(forward_passes: int, candidates_per_step: int) -> int:
    """Trainer steps that score at least `forward_passes` candidates."""
    if forward_passes < 1:
        raise ValueError(f"forward_passes must be >= 1, got {forward_passes}")
    return -(-forward_passes // candidates_per_step)
