"""Flat parameter vectors and the vmapped population forward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from m2n2_lightning import MLP, FlatParams, NotVmappableError, population_forward


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 5), nn.Tanh(), nn.Linear(5, 4)
    ).double()


def test_layout_follows_named_parameters_row_major() -> None:
    model = MLP(3, 4, 2)
    flat = FlatParams(model)
    assert flat.names == ["w1", "b1", "w2", "b2"]
    assert flat.num_params == 3 * 4 + 4 + 4 * 2 + 2
    assert [s.offset for s in flat.specs] == [0, 12, 16, 24]
    assert FlatParams(MLP(64, 256, 10)).num_params == 19_210  # the paper's D
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.copy_(torch.arange(p.numel(), dtype=p.dtype).reshape(p.shape) + 100 * i)
    vector = flat.flatten(model)
    # W1 row-major: element [r, c] sits at r * hidden + c
    assert vector[1 * 4 + 2].item() == model.w1[1, 2].item()
    assert vector[16 + 3 * 2 + 1].item() == model.w2[3, 1].item()


def test_flatten_unflatten_round_trip() -> None:
    model = small_cnn()
    flat = FlatParams(model)
    vector = torch.randn(flat.num_params, dtype=torch.float64)
    other = small_cnn()
    flat.load_into(other, vector)
    assert torch.equal(flat.flatten(other), vector)
    views = flat.unflatten(vector)
    for (name, p), (vname, v) in zip(other.named_parameters(), views.items()):
        assert name == vname and torch.equal(p, v)


@pytest.mark.parametrize("make", [lambda: MLP(6, 5, 3).double(), small_cnn])
def test_population_forward_equals_separate_modules_float64(make) -> None:
    torch.manual_seed(0)
    model = make()
    flat = FlatParams(model)
    k = 4
    candidates = torch.randn(k, flat.num_params, dtype=torch.float64)
    inputs = torch.randn(7, 6, dtype=torch.float64) if isinstance(model, MLP) else torch.randn(7, 1, 6, 6, dtype=torch.float64)
    out = population_forward(model, flat, candidates, inputs)
    assert out.shape[0] == k
    for i in range(k):
        separate = make()
        flat.load_into(separate, candidates[i])
        torch.testing.assert_close(out[i], separate(inputs), rtol=1e-12, atol=1e-12)


def test_batchnorm_in_training_mode_is_refused_clearly() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    flat = FlatParams(model)
    with pytest.raises(NotVmappableError, match="running statistics.*eval"):
        population_forward(model, flat, torch.zeros(2, flat.num_params), torch.randn(5, 4))
    model.eval()  # in eval mode the running stats are read, not written: it works
    assert population_forward(model, flat, torch.zeros(2, flat.num_params), torch.randn(5, 4)).shape == (2, 5, 3)


def test_module_writing_state_in_forward_is_refused_clearly() -> None:
    class Counter(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.register_buffer("calls", torch.zeros(()))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.lin(x)
            if out.sum() > 0:  # data-dependent control flow cannot be vmapped
                self.calls += 1
            return out

    flat = FlatParams(Counter())
    with pytest.raises(NotVmappableError, match="vmap"):
        population_forward(Counter(), flat, torch.zeros(2, flat.num_params), torch.randn(3, 2))


def test_wrong_shapes_are_refused() -> None:
    model = MLP(3, 4, 2)
    flat = FlatParams(model)
    with pytest.raises(ValueError, match=r"\[k, 26\]"):
        population_forward(model, flat, torch.zeros(2, 25), torch.zeros(1, 3))
    with pytest.raises(ValueError, match="expected 26"):
        flat.load_into(MLP(3, 5, 2), torch.zeros(26))
