"""Score [k, D] candidates: vectorised on resources resident on the device (`Evaluator`),
or by user code with each candidate loaded into the module (`ModuleEvaluator`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from m2n2_lightning.checks import check_positive_int
from m2n2_lightning.params import FlatParams, population_forward
from m2n2_lightning.scoring import ScoreFn, get_score_fn
from m2n2_lightning.strategies.children import Children

#: Scoring dtypes other than the model's own.
LOW_PRECISION = (torch.bfloat16, torch.float16)


class Evaluator:
    """Scores candidates on a fixed set of examples (the M2N2 resources).

    The inputs and targets are moved to the model's device once, here, and
    never again. Candidates are processed `chunk_size` at a time (all at once
    when None) to bound the memory of the [k, N, ...] activations.

    `dtype=torch.bfloat16` (or float16; what the Trainer's `precision` sets):
    candidates and inputs are cast to it and the forward runs in it (under
    `torch.autocast` for modules whose buffers stay float32). The scores, hence
    the archive, are then those of the rounded network.
    """

    def __init__(
        self,
        model: nn.Module,
        inputs: Tensor | Mapping[str, Tensor],
        targets: Tensor,
        score_fn: str | ScoreFn = "correctness",
        chunk_size: int | None = None,
        flat: FlatParams | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if chunk_size is not None:
            check_positive_int("chunk_size", chunk_size, 1)
        count = len(next(iter(inputs.values()))) if isinstance(inputs, Mapping) else len(inputs)
        if count != len(targets):
            raise ValueError(f"{count} inputs but {len(targets)} targets")
        if dtype is not None and dtype not in LOW_PRECISION:
            raise ValueError(f"dtype must be None, torch.bfloat16 or torch.float16, got {dtype!r}")
        self.model = model
        self.flat = flat or FlatParams(model)
        device = next(model.parameters()).device
        self.dtype = dtype
        self.inputs = (
            {key: self._to(value, device) for key, value in inputs.items()}
            if isinstance(inputs, Mapping)
            else self._to(inputs, device)
        )
        self.targets = targets.to(device)
        self.score_fn = get_score_fn(score_fn)
        self.chunk_size = chunk_size

    def _to(self, tensor: Tensor, device: torch.device) -> Tensor:
        """`tensor` on the device, floating-point ones in the scoring dtype."""
        tensor = tensor.to(device)
        return tensor.to(self.dtype) if self.dtype is not None and tensor.is_floating_point() else tensor

    @property
    def num_resources(self) -> int:
        return len(self.targets)

    @torch.no_grad()
    def __call__(self, candidates: Children | Tensor) -> Tensor:
        """Scores [k, N] of each candidate on each resource (children are made dense [k, D] for the forward)."""
        candidates = Children.of(candidates).dense().to(self.targets.device)
        chunks = [candidates] if self.chunk_size is None else candidates.split(self.chunk_size)
        scores = []
        for chunk in chunks:
            if self.dtype is None:
                outputs = population_forward(self.model, self.flat, chunk, self.inputs)
            else:
                with torch.autocast(self.inputs.device.type, dtype=self.dtype):
                    outputs = population_forward(self.model, self.flat, chunk.to(self.dtype), self.inputs)
            scores.append(check_scores_shape(self.score_fn(outputs, (self.inputs, self.targets)), len(chunk), len(self.targets)))
        return scores[0] if len(scores) == 1 else torch.cat(scores)


def check_scores_shape(scores: Any, k: int, n: int) -> Tensor:
    """A score function's result, if it is a [k, N] tensor; else a TypeError / ValueError saying what to return."""
    if not isinstance(scores, Tensor):
        raise TypeError(
            f"the score function returned {type(scores).__name__}; return a Tensor of shape [k={k}, N={n}] "
            "with one score in [0, 1] per candidate and example"
        )
    if scores.shape != (k, n):
        raise ValueError(f"the score function returned shape {tuple(scores.shape)}; expected [k={k}, N={n}]")
    return scores


#: A per-candidate evaluation: (module holding the candidate's weights, batch of resources) -> scores [B] in [0, 1].
EvaluateFn = Callable[[nn.Module, Any], Tensor]


def resource_batches(resources: Dataset | DataLoader, start: int, stop: int, batch_size: int) -> list[tuple[int, Any]]:
    """Examples [start, stop) of a fixed-order dataset (or a DataLoader's dataset, with its collate_fn),
    as (number of examples, batch) pairs, read once."""
    if isinstance(resources, DataLoader):
        dataset, collate, batch_size = resources.dataset, resources.collate_fn, resources.batch_size or batch_size
    else:
        dataset, collate = resources, None
    loader = DataLoader(Subset(dataset, range(start, stop)), batch_size=batch_size, shuffle=False, collate_fn=collate)
    sizes = [len(indices) for indices in loader.batch_sampler]
    return list(zip(sizes, loader))


def check_evaluated(scores: Any, expected: int) -> Tensor:
    """The scores `evaluate` returned for a batch of `expected` examples, or a clear error."""
    if not isinstance(scores, Tensor):
        raise TypeError(
            f"evaluate(module, batch) returned {type(scores).__name__}; return a Tensor of {expected} scores "
            "in [0, 1], one per example of the batch (e.g. torch.tensor([...]))"
        )
    if scores.shape != (expected,):
        raise ValueError(
            f"evaluate(module, batch) returned shape {tuple(scores.shape)} for a batch of {expected} examples; "
            f"return one score per example: shape ({expected},)"
        )
    if scores.is_meta:
        raise ValueError(
            "evaluate(module, batch) returned a tensor on the meta device (a shape without values); return the "
            "scores themselves, computed on the module's device or the CPU"
        )
    low, high = torch.stack(torch.aminmax(scores.float())).tolist()
    if not (0 <= low and high <= 1):
        raise ValueError(f"evaluate(module, batch) returned scores in [{low}, {high}] (or NaN); they must lie in [0, 1]")
    return scores.float()


class ModuleEvaluator:
    """Scores candidates by user code: each is loaded into the module, which `evaluate(module, batch)` may
    use in any way (`generate`, a tokenizer, an environment, a CLIP model...), over fixed-order resources.

    The module is put in eval mode while scoring (dropout off, as in generation) and
    back in its mode afterwards; the engine then loads the best member again.
    """

    def __init__(self, model: nn.Module, flat: FlatParams, evaluate: EvaluateFn, batches: list[tuple[int, Any]]) -> None:
        self.model, self.flat, self.evaluate, self.batches = model, flat, evaluate, batches
        self.num_resources = sum(size for size, _ in batches)

    @torch.no_grad()
    def __call__(self, candidates: Children | Tensor) -> Tensor:
        """Scores [k, N] of each candidate on each resource; each child is written straight into the module."""
        children = Children.of(candidates)
        training = self.model.training
        self.model.eval()
        try:
            rows = []
            for index in range(len(children)):
                children.load_into(index, self.model, self.flat)
                parts = [check_evaluated(self.evaluate(self.model, batch), size) for size, batch in self.batches]
                rows.append(torch.cat(parts).to(children.device))
        finally:
            self.model.train(training)
        return torch.stack(rows)
