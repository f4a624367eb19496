"""Flat parameter vectors and the vmapped population forward."""

from __future__ import annotations

import copy

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


def frozen_b1_mlp() -> MLP:
    """MLP(3, 4, 2) in float64 with b1 = 0.5 frozen (requires_grad=False)."""
    model = MLP(3, 4, 2).double()
    with torch.no_grad():
        model.b1.fill_(0.5)
    model.b1.requires_grad_(False)
    return model


def test_frozen_parameters_stay_out_of_the_vector_unless_included() -> None:
    model = frozen_b1_mlp()
    assert FlatParams(model).names == ["w1", "b1", "w2", "b2"] and FlatParams(model).num_params == 26
    flat = FlatParams(model, include_frozen=False)
    assert flat.names == ["w1", "w2", "b2"] and flat.num_params == 12 + 8 + 2
    assert [s.offset for s in flat.specs] == [0, 12, 20]
    vector = torch.arange(22, dtype=torch.float64)
    flat.load_into(model, vector)
    assert torch.equal(model.w1.reshape(-1), vector[:12]) and torch.equal(model.b2, vector[20:])
    assert torch.equal(model.b1, torch.full((4,), 0.5, dtype=torch.float64))  # untouched
    assert torch.equal(flat.flatten(model), vector)
    everything_frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match=r"no parameters to evolve \(all have requires_grad=False; evolve_frozen=True"):
        FlatParams(everything_frozen, include_frozen=False)


def test_population_forward_of_a_generic_module_keeps_its_frozen_parameters_float64() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    model[0].bias.requires_grad_(False)
    flat = FlatParams(model, include_frozen=False)
    assert flat.names == ["0.weight", "2.weight", "2.bias"]
    candidates = torch.randn(3, flat.num_params, dtype=torch.float64)
    inputs = torch.randn(5, 3, dtype=torch.float64)
    out = population_forward(model, flat, candidates, inputs)
    for i in range(3):
        separate = copy.deepcopy(model)
        flat.load_into(separate, candidates[i])
        torch.testing.assert_close(out[i], separate(inputs), rtol=1e-12, atol=1e-12)


def test_population_forward_hook_keeps_the_frozen_parameters_float64() -> None:
    """MLP's `forward_population` hook gets the frozen b1 too: the same outputs as k separate modules."""
    model = frozen_b1_mlp()
    flat = FlatParams(model, include_frozen=False)
    candidates = torch.randn(2, flat.num_params, dtype=torch.float64)
    inputs = torch.randn(5, 3, dtype=torch.float64)
    out = population_forward(model, flat, candidates, inputs)
    for i in range(2):
        separate = frozen_b1_mlp()
        flat.load_into(separate, candidates[i])
        expected = torch.relu(inputs @ separate.w1 + 0.5) @ separate.w2 + separate.b2  # by hand, b1 = 0.5
        torch.testing.assert_close(separate(inputs), expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out[i], expected, rtol=1e-12, atol=1e-12)
