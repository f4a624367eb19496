"""Flat vectors longer than 2^24: every storage and the strategies that index the vector by position.

float32 represents every integer only up to 2^24, so a position computed in
float32 past it (a linspace, a float split point) rounds, and indexes out of
bounds or into the wrong coordinate. These runs use D = 2^24 + 1,027 in
bfloat16 (one large embedding: 34 MB a copy), a split point placed right at
the end of the vector, and check the children against the SLERP formula
computed here in float64 (docs/ALGORITHM.md, "Crossover").
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from m2n2_lightning import FlatParams, LayerwiseSlerpStrategy, M2N2Strategy
from m2n2_lightning.strategies.children import Children

D = (1 << 24) + 1027
#: bfloat16 keeps 8 significant bits: a mixed coordinate is within this of the float64 formula (relative).
BF16 = 2**-8


@pytest.fixture(scope="module")
def seeds() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(D, generator=generator)
    return [(base + 0.5 * torch.randn(D, generator=generator)).to(torch.bfloat16) for _ in range(2)]


def slerp64(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """The SLERP of a and b with ratio t, in float64."""
    a, b = a.double(), b.double()
    omega = math.acos(float(a @ b / (a.norm() * b.norm())))
    return (math.sin((1 - t) * omega) * a + math.sin(t * omega) * b) / math.sin(omega)


@pytest.mark.parametrize("storage", ["dense", "host", "mmap", "coefficients"])
def test_a_split_point_past_two_to_the_24_is_exact(storage: str, seeds: list[torch.Tensor]) -> None:
    strategy = M2N2Strategy(D, pop_size=3, init_models=seeds, storage=storage)
    assert strategy.archive.like.dtype == torch.bfloat16  # kept in the seeds' dtype
    strategy.start(lambda children: torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    cut, w = D - 3, 0.3
    children = strategy.archive.crossover(torch.tensor([0]), torch.tensor([1]), torch.tensor([cut]), torch.tensor([[w]]))
    child = children.dense()[0].double()
    before, after = slerp64(seeds[0], seeds[1], w), slerp64(seeds[0], seeds[1], 1 - w)
    for lo, hi, expected in ((cut - 5, cut, before), (cut, D, after), (0, 1000, before)):
        error = (child[lo:hi] - expected[lo:hi]).abs()
        assert (error <= BF16 * expected[lo:hi].abs() + 1e-6).all(), (storage, lo, hi, error.max())
    if storage == "coefficients":  # the form's breakpoint is the split point itself, an exact int64
        assert children.forms[0][0].tolist() == [cut]


@pytest.mark.parametrize("storage", ["dense", "coefficients"])
def test_runs_write_children_into_a_module_and_resume(storage: str, seeds: list[torch.Tensor]) -> None:
    """ask / tell with random split points over the whole range, children written straight into a module."""
    module = nn.Embedding(D, 1, dtype=torch.bfloat16)
    flat = FlatParams(module)
    strategy = M2N2Strategy(D, pop_size=4, init_models=seeds, storage=storage, seed=1)
    strategy.start(lambda children: torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]]))
    for step in range(4):
        children = strategy.ask()
        children.load_into(0, module, flat)
        assert torch.equal(flat.flatten(module), children.dense()[0])
        strategy.tell(children, torch.tensor([[step % 2, 1.0, 0.0]]))
    resumed = M2N2Strategy(D, pop_size=4, init_models=seeds, storage=storage, seed=1)
    resumed.load_state_dict(strategy.state_dict())
    assert torch.equal(resumed.ask().dense(), strategy.ask().dense())


def test_layerwise_slerp_past_two_to_the_24(seeds: list[torch.Tensor]) -> None:
    layout = [("model.layers.0.w", D - 600), ("model.layers.1.w", 500), ("head", 100)]
    strategy = LayerwiseSlerpStrategy(D, init_models=seeds, layout=layout, popsize=4)
    merge = strategy.merge(torch.tensor([[0.0, 1.0, 0.25]], dtype=torch.float64))
    assert isinstance(merge, Children) and merge.forms[0][0].tolist() == [D - 600, D - 100]
    child = merge.dense()[0]
    assert torch.equal(child[: D - 600], seeds[0][: D - 600]) and torch.equal(child[D - 600 : D - 100], seeds[1][D - 600 : D - 100])
    tail = slerp64(seeds[0][D - 100 :], seeds[1][D - 100 :], 0.25)
    assert ((child[D - 100 :].double() - tail).abs() <= BF16 * tail.abs() + 1e-6).all()
