"""Score [k, D] candidates on resources that stay resident on the device."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from m2n2_lightning.params import FlatParams, population_forward
from m2n2_lightning.scoring import ScoreFn, get_score_fn

#: Scoring dtypes other than the model's own.
LOW_PRECISION = (torch.bfloat16, torch.float16)


class Evaluator:
    """Scores candidates on a fixed set of examples (the M2N2 resources).

    The inputs and targets are moved to the model's device once, here, and
    never again. Candidates are processed `chunk_size` at a time (all at once
    when None) to bound the memory of the [k, N, ...] activations.

    Speed options (off by default: the default is the exact float32 scoring):

    - `dtype=torch.bfloat16` (or float16): candidates and inputs are cast to
      it and the forward runs in it (under `torch.autocast` for modules whose
      buffers stay float32). The scores, hence the archive, are then those of
      the rounded network. For TF32 on CUDA set torch's own switch,
      `torch.backends.cuda.matmul.fp32_precision = "tf32"`.
    - `compile=True`: the scoring of a chunk goes through `torch.compile`. On
      the CPU it pays for modules scored through `vmap` (a generic
      `nn.Sequential` MLP: 1.3-2x), not for the MLP's own oneDNN path, which
      it slows down (benchmarks/RESULTS.md). The first call compiles (seconds).
    """

    def __init__(
        self,
        model: nn.Module,
        inputs: Tensor,
        targets: Tensor,
        score_fn: str | ScoreFn = "correctness",
        chunk_size: int | None = None,
        flat: FlatParams | None = None,
        dtype: torch.dtype | None = None,
        compile: bool = False,
    ) -> None:
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
        if len(inputs) != len(targets):
            raise ValueError(f"{len(inputs)} inputs but {len(targets)} targets")
        if dtype is not None and dtype not in LOW_PRECISION:
            raise ValueError(f"dtype must be None, torch.bfloat16 or torch.float16, got {dtype!r}")
        self.model = model
        self.flat = flat or FlatParams(model)
        device = next(model.parameters()).device
        self.dtype = dtype
        self.inputs = self._cast(inputs.to(device))
        self.targets = targets.to(device)
        self.score_fn = get_score_fn(score_fn)
        self.chunk_size = chunk_size
        self._score_chunk = torch.compile(self._scores, dynamic=False) if compile else self._scores

    @property
    def num_resources(self) -> int:
        return len(self.targets)

    def _cast(self, tensor: Tensor) -> Tensor:
        return tensor.to(self.dtype) if self.dtype is not None and tensor.is_floating_point() else tensor

    @torch.no_grad()
    def logits(self, candidates: Tensor, inputs: Tensor | None = None) -> Tensor:
        """Model outputs [k, N, ...] of each candidate on `inputs` (default: the resources)."""
        inputs = self.inputs if inputs is None else self._cast(inputs)
        if self.dtype is None:
            return population_forward(self.model, self.flat, candidates, inputs)
        with torch.autocast(inputs.device.type, dtype=self.dtype):
            return population_forward(self.model, self.flat, candidates.to(self.dtype), inputs)

    def _scores(self, candidates: Tensor) -> Tensor:
        return self.score_fn(self.logits(candidates), self.targets)

    @torch.no_grad()
    def __call__(self, candidates: Tensor) -> Tensor:
        """Scores [k, N] of each candidate on each resource."""
        if self.chunk_size is None or self.chunk_size >= len(candidates):
            return self._score_chunk(candidates)
        return torch.cat([self._score_chunk(chunk) for chunk in candidates.split(self.chunk_size)])
