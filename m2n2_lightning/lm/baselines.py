"""The two baselines of the language-model merge that are not searches: each seed alone, and the best single SLERP weight.

The paper's LLM comparison (docs/ALGORITHM.md, "Beyond the digits") puts every method at the
same budget of evaluations; the brute-force SLERP spends it on an even grid of weights
w in [0, 1] between the two seeds (w = 0 is the first seed), one angle over the whole
parameter vector and no split point (M2N2's crossover with the split point off), and keeps
the weight with the best mean training score (the first on ties). Its test accuracy is then
reported, as for every method: the choice never sees a test prompt.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from m2n2_lightning.evaluator import EvaluateFn, ModuleEvaluator, resource_batches
from m2n2_lightning.lm.merge import AccuracyFn, AccuracyPoint, MergeResult
from m2n2_lightning.lm.tasks import accuracy, exact_match
from m2n2_lightning.params import FlatParams
from m2n2_lightning.merging.seeds import SeedSource, read_seeds
from m2n2_lightning.checks import check_positive_int
from m2n2_lightning.strategies.operators import slerp

#: Weights scored per evaluator call by the brute-force sweep.
SWEEP_CHUNK = 10


def seed_vectors(model: nn.Module, flat: FlatParams, sources: Sequence[SeedSource]) -> Tensor:
    """The flat parameter vectors [K, D] of `sources` in `model`'s layout (read lazily and checked by `read_seeds`)."""
    return read_seeds(model, flat.names, sources).vectors


def _result(model: nn.Module, resources: Dataset, tests: Mapping[str, Any], test_fn: AccuracyFn, done: int,
            wall: float, settings: dict[str, Any]) -> MergeResult:
    model.eval()
    test = {name: float(test_fn(model, data)) for name, data in tests.items()}
    return MergeResult(test=test, train=float(test_fn(model, resources)), forward_passes=done, wall_seconds=wall,
                       test_points=[AccuracyPoint(done, wall, test)], settings=settings)


@torch.no_grad()
def seed_alone(source: SeedSource, model: nn.Module, resources: Dataset, tests: Mapping[str, Any],
               test_fn: AccuracyFn = accuracy) -> MergeResult:
    """One seed model, unmerged: loaded into `model` and tested (no evaluation of the budget spent)."""
    flat = FlatParams(model)
    flat.load_into(model, seed_vectors(model, flat, [source])[0])
    return _result(model, resources, tests, test_fn, 0, 0.0, {"seed_model": str(source)})


@torch.no_grad()
def slerp_sweep(
    seeds: Sequence[SeedSource],
    model: nn.Module,
    resources: Dataset,
    tests: Mapping[str, Any],
    points: int,
    score: EvaluateFn = exact_match,
    test_fn: AccuracyFn = accuracy,
    resource_batch_size: int = 200,
) -> MergeResult:
    """The best of `points` SLERP weights w = linspace(0, 1) between two seeds by mean training `score`;
    `model` then holds that merge, and the result reports its test accuracies and the chosen w."""
    check_positive_int("points", points, 2)
    if isinstance(seeds, (str, bytes)) or len(seeds) != 2:
        raise ValueError(f"the SLERP sweep merges exactly two seed models, got {seeds!r}")
    start = time.perf_counter()
    flat = FlatParams(model)
    a, b = seed_vectors(model, flat, seeds)
    count = len(resources.dataset) if isinstance(resources, DataLoader) else len(resources)  # examples, not batches
    evaluator = ModuleEvaluator(model, flat, score, resource_batches(resources, 0, count, resource_batch_size))
    best, best_w, best_score = best_slerp(evaluator, a, b, points, SWEEP_CHUNK)
    flat.load_into(model, best)
    settings = {"points": points, "best_w": best_w, "best_train_score": best_score}
    return _result(model, resources, tests, test_fn, points, time.perf_counter() - start, settings)


@torch.no_grad()
def best_slerp(evaluator: Callable[[Tensor], Tensor], a: Tensor, b: Tensor, points: int, chunk: int,
               after_chunk: Callable[[int, Tensor], None] | None = None) -> tuple[Tensor, float, float]:
    """The SLERP of `a` and `b` [D] with the best mean score among `points` weights w = linspace(0, 1) (the first
    on ties), scored `chunk` weights per `evaluator` call ([k, D] -> [k, N] scores); returns (merge, w, mean score).
    `after_chunk(weights scored so far, best merge so far)` is called after each chunk (a benchmark's curve)."""
    weights = torch.linspace(0, 1, points, dtype=a.dtype, device=a.device)
    best, best_w, best_score, done = a, 0.0, -math.inf, 0
    for part in weights.split(chunk):
        candidates = slerp(a.expand(len(part), -1), b.expand(len(part), -1), part.unsqueeze(1))
        means = evaluator(candidates).mean(dim=1)
        top = int(means.argmax())
        if float(means[top]) > best_score:
            best, best_w, best_score = candidates[top].clone(), float(part[top]), float(means[top])
        done += len(part)
        if after_chunk is not None:
            after_chunk(done, best)
    return best, best_w, best_score
