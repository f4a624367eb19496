"""The whole loop on digits from scratch with the paper's settings (P = 20, alpha = 1, sigma = 0.01, k = 1).

Slow (about a minute): run with `pytest -m slow`; CI runs it.

What the bounds are based on (benchmarks/RESULTS.md, "M2N2 at 5,000 forward
passes"): the authors' JAX code, re-run here for 46 seeds, ends at 0.41 to 0.84
test accuracy after 5,000 forward passes (mean 0.716), 37% of its runs below
0.70; ours over 120 seeds: 0.39 to 0.85, mean 0.701. So "0.70 on every seed"
does not hold for the reference itself, and this test checks the mean of three
fixed seeds and a floor on each, plus that the GA is worse on average, as in
the paper.
"""

from __future__ import annotations

import pytest
import torch

from m2n2_lightning import MLP, FlatParams, M2N2Strategy
from m2n2_lightning.data import DigitsDataModule
from m2n2_lightning.engine import EvolutionEngine

SEEDS = (0, 1, 2)
BUDGET = 5_000


def final_test_accuracy(seed: int, **settings) -> float:
    data = DigitsDataModule()
    model = MLP()
    engine = EvolutionEngine(model, M2N2Strategy(FlatParams(model).num_params, seed=seed, **settings))
    engine.attach(*data.train_tensors)
    engine.start()
    for _ in range(BUDGET):
        engine.step()
    assert engine.strategy.forward_passes == BUDGET
    x, y = data.test_tensors
    with torch.no_grad():
        return (engine.model(x).argmax(-1) == y).float().mean().item()


@pytest.mark.slow
def test_m2n2_from_scratch_learns_and_beats_the_ga(one_thread) -> None:
    m2n2 = [final_test_accuracy(seed) for seed in SEEDS]
    ga = [final_test_accuracy(seed, alpha=0.0, use_matchmaker=False) for seed in SEEDS]
    mean_m2n2, mean_ga = sum(m2n2) / 3, sum(ga) / 3
    print(f"test accuracy after {BUDGET}: M2N2 {m2n2} (mean {mean_m2n2:.3f}), GA {ga} (mean {mean_ga:.3f})")
    assert min(m2n2) >= 0.55, m2n2  # chance is 0.10; the initial members score about 0.10-0.20
    assert mean_m2n2 >= 0.62, m2n2
    assert mean_ga < mean_m2n2, (ga, m2n2)
