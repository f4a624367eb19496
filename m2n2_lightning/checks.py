"""The input checks, in one place, and how a failed one reaches a train.py user.

Every check raises a ValueError (a TypeError where the kind of object is
wrong) that names the setting, the value it got and what it accepts, before
any data is read or any state changes. `report_in_one_line` wraps the Hydra
task: a bad value, a missing package or file, or a full disk is then printed
as its message alone (Hydra's compact error), with the traceback behind
`HYDRA_FULL_ERROR=1`, as Hydra does for its own config errors.
"""

from __future__ import annotations

import errno
import functools
import inspect
from collections.abc import Callable, Iterator
from typing import Any

from hydra.errors import CompactHydraException
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset

#: summary.json entries that `optimized_metric` may name (numbers in every experiment's summary).
OPTIMIZABLE_METRICS = ("best_train_acc", "test_acc", "forward_passes", "forward_passes_per_second", "wall_seconds")


def check_positive_int(name: str, value: Any, minimum: int) -> int:
    """`value` if it is an integer >= `minimum`, else a ValueError naming `name`."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_non_negative(name: str, value: Any) -> float:
    """`value` as a float if it is a finite number >= 0, else a ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or value == float("inf"):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def check_labels(targets: Tensor, num_classes: int | None) -> None:
    """ValueError, before any step, when integer labels fall outside [0, num_classes)."""
    if num_classes is None or targets.is_floating_point() or targets.numel() == 0:
        return
    low, high = int(targets.min()), int(targets.max())
    if low < 0 or high >= num_classes:
        raise ValueError(
            f"resource labels must lie in [0, {num_classes}) (the data's num_classes), got labels in [{low}, {high}]; "
            "check the data or its num_classes"
        )


def check_resources(resources: Any, evaluate: Callable | None) -> Any:
    """The `resources` of `M2N2Callback`, checked against `evaluate`; a generator becomes a list.

    With `evaluate`: a fixed-order, sized dataset (a Dataset with `__len__`, a
    list, a DataLoader over one). Without: None (the datamodule's) or `(x, y)`.
    """
    if evaluate is not None and not callable(evaluate):
        raise ValueError(f"evaluate must be a callable (module, batch) -> scores [B], got {evaluate!r}")
    if isinstance(resources, Iterator) and not isinstance(resources, DataLoader):
        resources = list(resources)  # a one-shot generator of examples: read once, as the resources are anyway
    dataset = resources.dataset if isinstance(resources, DataLoader) else resources
    if evaluate is None:
        if resources is not None and not (isinstance(resources, (tuple, list)) and len(resources) == 2):
            raise TypeError(
                f"resources without evaluate=... must be a pair (inputs, targets) of tensors, got "
                f"{type(resources).__name__}; pass evaluate=... to score a dataset by your own code"
            )
        return resources
    if resources is None or isinstance(resources, tuple) or isinstance(dataset, IterableDataset) or not hasattr(
        dataset, "__len__"
    ):
        got = "nothing" if resources is None else type(dataset).__name__
        raise ValueError(
            "evaluate=... scores each candidate on a fixed-order, sized dataset: pass resources= a Dataset with "
            f"__len__, a list, or a DataLoader over one (got {got}); an IterableDataset or a stream may be "
            "infinite or change order, so make a list of its examples first (resources=list(...))"
        )
    return resources


def low_precision_of(module: nn.Module) -> torch.dtype | None:
    """bfloat16 / float16 when the module's floating-point parameters are all in it (a module converted with
    `.to(torch.bfloat16)`): vectorised scoring then casts the resources to it, as `precision="bf16-true"` does."""
    dtypes = {p.dtype for p in module.parameters() if p.is_floating_point()}
    return next(iter(dtypes)) if len(dtypes) == 1 and dtypes <= {torch.bfloat16, torch.float16} else None


def check_optimized_metric(metric: str | None) -> None:
    """ValueError, before any work, when `optimized_metric` names no number of summary.json."""
    if metric is not None and metric not in OPTIMIZABLE_METRICS:
        raise ValueError(
            f"optimized_metric={metric!r} is not a summary.json number; use one of {', '.join(OPTIMIZABLE_METRICS)}"
        )


class BadRunInput(CompactHydraException):
    """A bad value, a missing package or file, or a full disk, shown by Hydra as its message alone."""


def is_disk_full(error: BaseException) -> bool:
    """Whether `error` (or an error it was raised from) is 'no space left' / 'disk quota exceeded'."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        error = error.__cause__ or error.__context__
    return False


def report_in_one_line(task: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a Hydra task: ValueError, ModuleNotFoundError, FileNotFoundError and a full disk reach the user as
    one message (Hydra's `CompactHydraException`); `HYDRA_FULL_ERROR=1` shows the whole chained traceback."""

    @functools.wraps(task)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            return task(*args, **kwargs)
        except (ValueError, ModuleNotFoundError, FileNotFoundError, OSError) as err:
            if isinstance(err, OSError) and not isinstance(err, FileNotFoundError) and not is_disk_full(err):
                raise
            raise BadRunInput(str(err)) from err  # Hydra adds the line about HYDRA_FULL_ERROR=1

    wrapped.__signature__ = inspect.signature(task)  # type: ignore[attr-defined]
    return wrapped
