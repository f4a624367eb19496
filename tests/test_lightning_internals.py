"""The private Lightning internals the callback relies on are where it expects them.

pyproject.toml bounds `lightning` above; this test fails loudly, naming the attribute, when a
Lightning release moves one of them, so that the bound can be lifted only after adapting."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.loops.optimization.automatic import _AutomaticOptimization


def test_the_private_internals_used_by_the_callback_exist() -> None:
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    fit_loop = trainer.fit_loop
    # callback.py: the backward switch of automatic optimization (as StochasticWeightAveraging uses it).
    assert isinstance(fit_loop.epoch_loop.automatic_optimization, _AutomaticOptimization)
    assert hasattr(fit_loop.epoch_loop.automatic_optimization, "_skip_backward")
    assert isinstance(type(fit_loop)._skip_backward, property), "fit_loop._skip_backward moved"
    # callback.py: the train dataloader source the resources are collected from.
    assert hasattr(fit_loop, "_data_source"), "fit_loop._data_source moved"
    assert hasattr(type(fit_loop._data_source), "dataloader")
    # engine.log_evolution: whether this step writes logs.
    assert hasattr(type(trainer._logger_connector), "should_update_logs"), "_logger_connector.should_update_logs moved"
