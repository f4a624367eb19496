"""Every fast path of the forward pass and scoring (oneDNN linear, population_forward, bfloat16 Evaluator,
load_into, correctness) against the plain computation it replaces (float64 where the path allows it)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from m2n2_lightning import MLP, Evaluator, FlatParams, population_forward
from m2n2_lightning.kernels import onednn_applies, onednn_linear
from m2n2_lightning.scoring import correctness

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN (mkldnn)")


# ------------------------------------------------------------------------------------------------- scoring
def test_correctness_is_argmax_with_ties_and_nan() -> None:
    """`correctness` reads `max().indices`: the same first maximum as argmax, NaN rows included."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randint(0, 3, (4, 500, 10), generator=g).float()  # many ties
    logits[torch.rand(logits.shape, generator=g) < 0.02] = float("nan")
    targets = torch.randint(0, 10, (500,), generator=g)
    # a NaN in a row is wrong on that example (argmax of NaN would pick the NaN's class)
    expected = ((logits.argmax(-1) == targets) & ~logits.isnan().any(-1)).float()
    assert torch.equal(correctness(logits, (None, targets)), expected)
    assert 0 < expected.sum() < expected.numel()


# ------------------------------------------------------------------------------ forward paths
@needs_onednn
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_onednn_linear_matches_float64(relu: bool, with_bias: bool) -> None:
    x, w, b = torch.randn(37, 13), torch.randn(13, 9), torch.randn(9)
    assert onednn_applies(x, w)
    got = onednn_linear(x, w, b if with_bias else None, relu=relu)
    expected = x.double() @ w.double() + (b.double() if with_bias else 0)
    torch.testing.assert_close(got.double(), expected.relu() if relu else expected, rtol=1e-5, atol=1e-5)


def test_onednn_does_not_apply_under_vmap_autograd_or_other_dtypes() -> None:
    x = torch.randn(5, 3)
    seen = []

    def run(w: torch.Tensor) -> torch.Tensor:
        seen.append(onednn_applies(x, w))
        return torch.relu(x @ w)

    torch.func.vmap(run)(torch.randn(2, 3, 4))
    assert seen == [False]
    assert not onednn_applies(torch.randn(5, 4), torch.randn(4, 3, requires_grad=True))
    assert not onednn_applies(torch.randn(5, 4, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64))
    # the MLP keeps autograd through its plain path
    model = MLP(4, 3, 2)
    model(torch.randn(5, 4)).sum().backward()
    assert model.w1.grad is not None


@needs_onednn
@pytest.mark.parametrize("k", [1, 3])
def test_mlp_population_forward_matches_vmap_and_float64(k: int) -> None:
    model = MLP(11, 17, 5)
    flat = FlatParams(model)
    candidates = torch.randn(k, flat.num_params)
    x = torch.randn(23, 11)
    fast = population_forward(model, flat, candidates, x)  # oneDNN, one candidate at a time
    params = flat.unflatten(candidates)
    vmapped = torch.func.vmap(lambda p: torch.func.functional_call(model, p, (x,)))(params)
    reference = model.double().forward_population(flat.unflatten(candidates.double()), x.double())  # batched matmul
    torch.testing.assert_close(fast, vmapped, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast.double(), reference, rtol=1e-5, atol=1e-5)
    for i in range(k):
        single = MLP(11, 17, 5).double()
        flat.load_into(single, candidates[i].double())
        torch.testing.assert_close(reference[i], single(x.double()), rtol=1e-12, atol=1e-12)


def test_subclass_changing_forward_or_hooks_is_not_given_the_fast_path() -> None:
    class Doubled(MLP):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * super().forward(x)

    model = Doubled(3, 4, 2).double()
    flat = FlatParams(model)
    candidates = torch.randn(2, flat.num_params, dtype=torch.float64)
    x = torch.randn(5, 3, dtype=torch.float64)
    out = population_forward(model, flat, candidates, x)
    torch.testing.assert_close(out, 2 * MLP(3, 4, 2).double().forward_population(flat.unflatten(candidates), x))
    hooked = MLP(3, 4, 2).double()
    hooked.register_forward_hook(lambda module, args, output: output + 1)
    torch.testing.assert_close(population_forward(hooked, flat, candidates, x), out / 2 + 1)


def test_evaluator_bfloat16_scores_nearly_the_float32_ones() -> None:
    torch.manual_seed(0)
    model = MLP(16, 32, 4)
    flat = FlatParams(model)
    x, y = torch.randn(400, 16), torch.randint(0, 4, (400,))
    candidates = 0.3 * torch.randn(5, flat.num_params)
    exact = Evaluator(model, x, y)(candidates)
    low = Evaluator(model, x, y, dtype=torch.bfloat16)(candidates)
    assert low.dtype == torch.float32 and low.shape == exact.shape
    assert (low != exact).float().mean() < 0.05
    generic = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    cands = 0.3 * torch.randn(3, FlatParams(generic).num_params)
    seen = []
    Evaluator(generic, x, y, score_fn=lambda out, batch: seen.append(out.dtype) or correctness(out, batch),
              dtype=torch.bfloat16)(cands)
    assert seen == [torch.bfloat16]
    with pytest.raises(ValueError, match="dtype"):
        Evaluator(model, x, y, dtype=torch.float64)


def test_load_into_fast_path_still_refuses_other_modules() -> None:
    flat = FlatParams(MLP(3, 4, 2))
    model = MLP(3, 4, 2)
    vector = torch.arange(flat.num_params, dtype=torch.float32)
    flat.load_into(model, vector)
    flat.load_into(model, vector + 1)  # checked once in full, then by shapes
    assert torch.equal(flat.flatten(model), vector + 1)
    model.w2 = nn.Parameter(torch.zeros(4, 3))
    with pytest.raises(ValueError, match="expected 26"):
        flat.load_into(model, vector)
    with pytest.raises(ValueError, match="expected 26"):
        flat.load_into(copy.deepcopy(MLP(3, 5, 2)), vector)
    double = MLP(3, 4, 2).double()
    flat.load_into(double, vector)  # converts dtype like copy_
    assert double.w1.dtype == torch.float64 and torch.equal(flat.flatten(double), vector.double())
