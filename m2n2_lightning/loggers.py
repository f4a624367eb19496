"""What the run's optional loggers need beyond Lightning's `Logger` interface.

- Figures (the member-by-class heatmap), through each logger's own API:
  TensorBoard's `add_figure` (an image summary), W&B's `log_image` (a
  `wandb.Image` in the run's history and media files) and MLflow's
  `log_figure` (a PNG artifact of the run). CSV gets none; the PNG beside the
  logs is written anyway.
- A check, before any work, that the configured logger's package is installed,
  with the extra to install when it is not.
- `quiet_lightning()`: train.py and the examples turn off the messages of a
  normal run that ask nothing of the user (Lightning's litlogger tip, its
  `LeafSpec` deprecation warning from torch, and the eval-mode and
  `training_step returned None` warnings that the evolution callback makes
  meaningless: it scores in eval mode and needs no loss).
"""

from __future__ import annotations

import importlib.util
import logging
import warnings
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from lightning.pytorch.loggers import Logger, MLFlowLogger, WandbLogger

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def log_figure(loggers: Iterable[Logger], key: str, figure: Figure, step: int) -> None:
    """Send a matplotlib `figure` under `key` (e.g. "niche/class_accuracy") to every logger that takes figures
    (MLflow: as the artifact `<key>.png`); the figure stays open, for the caller to close."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key, [figure], step=step)
        elif isinstance(logger, MLFlowLogger):
            logger.experiment.log_figure(logger.run_id, figure, f"{key}.png")
        elif hasattr(getattr(logger, "experiment", None), "add_figure"):
            logger.experiment.add_figure(key, figure, global_step=step, close=False)


#: The module each optional Lightning logger needs (any one of them) and the extra of this project that installs it.
LOGGER_PACKAGES = {
    "WandbLogger": (("wandb",), "wandb"),
    "MLFlowLogger": (("mlflow",), "mlflow"),
    "TensorBoardLogger": (("tensorboard", "tensorboardX"), "tensorboard"),
}


def check_logger_installed(config: Any) -> None:
    """Fail before any work, naming the extra to install, when the configured logger (a Hydra node with
    `_target_`, e.g. conf/logger/wandb.yaml) needs a package that is not installed; without this check
    the error is an ImportError from inside Lightning, wrapped by Hydra's instantiate."""
    target = config.get("_target_") if isinstance(config, Mapping) else None
    if not isinstance(target, str):
        return  # no logger (false / null), or one given another way: Lightning's own checks apply
    modules, extra = LOGGER_PACKAGES.get(target.rsplit(".", 1)[-1], ((), ""))
    if modules and all(importlib.util.find_spec(name) is None for name in modules):
        raise ModuleNotFoundError(
            f"The logger {target} needs the `{modules[0]}` package, which is not installed. Install it with "
            f'pip install "m2n2-lightning[{extra}]" (in a clone: pip install -e ".[{extra}]"), '
            "or choose another logger, e.g. logger=csv."
        )


#: Warnings of a normal evolution run that ask nothing of the user (regular expressions of their text).
QUIET_WARNINGS = (
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # torch 2.9 about Lightning's _pytree; Lightning's to fix
    r"Found \d+ module\(s\) in eval mode",  # the callback loads each candidate and scores it in eval mode
    r"`training_step` returned `None`",  # a monitor-only training_step under the callback needs no loss
)


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


def quiet_lightning() -> None:
    """Silence the `QUIET_WARNINGS` and Lightning's advertising tips (its rank-zero log records starting
    with '💡 Tip:'); every other warning and message stays."""
    for pattern in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=f".*{pattern}")
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropTips) for f in logger.filters):
        logger.addFilter(_DropTips())
