"""benchmarks/mergekit_grid.py: mergekit's merges of tiny random Llamas against the methods' formulas in float64,
the grid's choice by training score (first on ties), and its evaluation counts."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import mergekit_grid as mg


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[str]]:
    """A base and four fine-tunes (base + noise on every tensor), saved with save_pretrained: (base, seeds)."""
    root = tmp_path_factory.mktemp("mergekit_models")
    config = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, head_dim=4, max_position_embeddings=16, tie_word_embeddings=False)
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    base.save_pretrained(root / "base")
    seeds = []
    for k in range(4):
        model = LlamaForCausalLM(config)
        model.load_state_dict({n: t + 0.1 * torch.randn_like(t) for n, t in base.state_dict().items()})
        model.save_pretrained(root / f"seed{k}")
        seeds.append(str(root / f"seed{k}"))
    return str(root / "base"), seeds


def tensors(path: str | Path) -> dict[str, torch.Tensor]:
    return {n: t.double() for n, t in load_file(Path(path) / "model.safetensors").items()}


def merged(point: mg.GridPoint, base: str, seeds: list[str], out: Path) -> dict[str, torch.Tensor]:
    return tensors(mg.merge(point, seeds, base, out))


def close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name, value in a.items():
        torch.testing.assert_close(value, b[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("weights", [(0.3, 0.7), (2.0, 1.0, 1.0, 1.0)])
def test_linear_is_the_weighted_mean(models: tuple[str, list[str]], tmp_path: Path, weights: tuple[float, ...]) -> None:
    """mergekit normalises the weights: sum_k w_k theta_k / sum_k w_k (weights summing to 5 included)."""
    base, seeds = models
    thetas = [tensors(s) for s in seeds[: len(weights)]]
    expected = {n: sum(w * t[n] for w, t in zip(weights, thetas)) / sum(weights) for n in thetas[0]}
    close(merged(mg.GridPoint("linear", weights=weights), base, seeds[: len(weights)], tmp_path / "m"), expected)


def test_task_arithmetic_adds_lambda_times_the_task_vectors(models: tuple[str, list[str]], tmp_path: Path) -> None:
    base, seeds = models
    b, thetas = tensors(base), [tensors(s) for s in seeds]
    expected = {n: b[n] + 0.75 * sum(t[n] - b[n] for t in thetas) for n in b}
    close(merged(mg.GridPoint("task_arithmetic", lam=0.75), base, seeds, tmp_path / "m"), expected)


def ties_reference(b: dict[str, torch.Tensor], thetas: list[dict[str, torch.Tensor]], density: float,
                   lam: float) -> dict[str, torch.Tensor]:
    """TIES (Yadav et al. 2023) in float64: keep the top `density` of each task vector by magnitude (per tensor),
    elect each entry's sign by the sum of the kept values (+ on 0), average the kept values of that sign, scale."""
    out = {}
    for n, start in b.items():
        deltas = []
        for t in thetas:
            d = (t[n] - start).flatten()
            keep = torch.zeros_like(d)
            keep[d.abs().argsort(descending=True)[: max(1, int(density * d.numel()))]] = 1
            deltas.append(d * keep)
        d = torch.stack(deltas)
        sign = torch.where(d.sum(0) >= 0, 1.0, -1.0).double()
        agree = (d.sign() == sign).double()
        mean = (d * agree).sum(0) / agree.sum(0).clamp(min=1)
        out[n] = start + lam * mean.reshape(start.shape)
    return out


@pytest.mark.parametrize("density", [1.0, 0.5])
def test_ties_is_the_sign_elected_mean(models: tuple[str, list[str]], tmp_path: Path, density: float) -> None:
    base, seeds = models
    b, thetas = tensors(base), [tensors(s) for s in seeds[:3]]
    result = merged(mg.GridPoint("ties", lam=1.5, density=density), base, seeds[:3], tmp_path / "m")
    close(result, ties_reference(b, thetas, density, 1.5))
    linear = {n: sum(t[n] for t in thetas) / 3 for n in b}
    assert any(not torch.allclose(result[n], linear[n], atol=1e-4) for n in b)


def test_slerp_interpolates_each_tensor_along_the_great_circle(models: tuple[str, list[str]], tmp_path: Path) -> None:
    base, seeds = models
    a, c = tensors(seeds[0]), tensors(seeds[1])
    expected = {}
    for n in a:
        omega = torch.arccos((a[n].flatten() @ c[n].flatten() / (a[n].norm() * c[n].norm())).clamp(-1, 1))
        expected[n] = (torch.sin(0.7 * omega) * a[n] + torch.sin(0.3 * omega) * c[n]) / torch.sin(omega)
    close(merged(mg.GridPoint("slerp", t=0.3), base, seeds[:2], tmp_path / "m"), expected)


def test_dare_ties_is_reproducible_and_leaves_the_callers_rng(models: tuple[str, list[str]], tmp_path: Path) -> None:
    base, seeds = models
    point = mg.GridPoint("dare_ties", lam=0.5, density=0.5)
    torch.manual_seed(123)
    np.random.seed(1)
    unmerged = torch.rand(3), np.random.rand()  # what the caller's generators give without a merge
    torch.manual_seed(123)
    np.random.seed(1)
    first = merged(point, base, seeds, tmp_path / "a")
    assert torch.equal(torch.rand(3), unmerged[0]) and np.random.rand() == unmerged[1]
    second = merged(point, base, seeds, tmp_path / "b")
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    ties = merged(mg.GridPoint("ties", lam=0.5, density=0.5), base, seeds, tmp_path / "t")
    assert any(not torch.equal(first[n], ties[n]) for n in first)  # random drops, not TIES's magnitude drops


def test_grid_sizes() -> None:
    assert len(mg.grid(2)) == 39 and len(mg.grid(4)) == 26
    assert {p.method for p in mg.grid(2)} == set(mg.METHODS)
    assert {p.method for p in mg.grid(4)} == set(mg.METHODS) - {"slerp"}
    assert [p.weights for p in mg.grid(2) if p.method == "linear"][2] == (0.3, 0.7)
    with pytest.raises(ValueError, match="at least two"):
        mg.grid(1)


def test_run_grid_scores_each_merge_once_and_chooses_by_training_score(models: tuple[str, list[str]]) -> None:
    """A fake training score per call: the choice is the first of the best scores, each merge one evaluation."""
    base, seeds = models
    points = [mg.GridPoint("linear", weights=(1.0, 1.0)), mg.GridPoint("slerp", t=0.5), mg.GridPoint("slerp", t=0.9),
              mg.GridPoint("task_arithmetic", lam=0.5)]
    fake, calls = iter([0.2, 0.9, 0.5, 0.9]), []

    def train_score(model: torch.nn.Module) -> float:
        calls.append(model)
        return next(fake)

    def load(path: Path) -> torch.nn.Module:
        return AutoModelForCausalLM.from_pretrained(path).eval()

    rows = mg.run_grid(points, seeds[:2], base, load, train_score, lambda m, train: {"x": float(len(calls)), "train": train})
    assert len(calls) == 4 and [r.evaluation for r in rows] == [1, 2, 3, 4]
    out = mg.results(rows)
    assert set(out) == {"mergekit_linear", "mergekit_slerp", "mergekit_task_arithmetic", "mergekit_best"}
    assert out["mergekit_best"].forward_passes == 4 and out["mergekit_slerp"].forward_passes == 2
    assert out["mergekit_best"].settings["t"] == 0.5 and out["mergekit_best"].train == 0.9  # evaluation 2, not 4
    assert out["mergekit_best"].test == {"x": 2.0, "train": 0.9}
    assert [p.test["x"] for p in out["mergekit_best"].test_points] == [1.0, 2.0, 2.0, 2.0]  # best so far
    assert out["mergekit_slerp"].test["x"] == 2.0 and out["mergekit_linear"].train == 0.2
    with pytest.raises(ValueError, match="base model"):
        mg.run_grid(points, seeds[:2], seeds[0], load, train_score, lambda m, train: {})
    with pytest.raises(ValueError, match="exactly two"):
        mg.run_grid(points[1:2], seeds[:3], base, load, train_score, lambda m, train: {})


def test_baseline_names() -> None:
    assert set(mg.LABELS) == {f"mergekit_{m}" for m in mg.METHODS} | {mg.BEST}
    assert callable(mg.mergekit_baseline("mergekit_ties")) and callable(mg.mergekit_baseline("mergekit_best"))
    with pytest.raises(ValueError, match="unknown mergekit baseline"):
        mg.mergekit_baseline("mergekit_fancy")


@pytest.mark.slow  # 26 mergekit merges written and read back
def test_the_four_seed_grid_runs_every_method_once_per_point(models: tuple[str, list[str]]) -> None:
    """grid(4) through mergekit on four seeds: 26 evaluations, each method's count, distinct merges per point."""
    base, seeds = models
    sums: list[float] = []

    def train_score(model: torch.nn.Module) -> float:
        sums.append(float(sum(p.double().sum() for p in model.parameters())))
        return -len(sums)  # the first point is the best

    rows = mg.run_grid(mg.grid(4), seeds, base, AutoModelForCausalLM.from_pretrained, train_score, lambda m, t: {})
    out = mg.results(rows)
    counts = {"mergekit_linear": 5, "mergekit_task_arithmetic": 3, "mergekit_ties": 6, "mergekit_dare_ties": 6,
              "mergekit_della": 4, "mergekit_breadcrumbs": 2, "mergekit_best": 26}
    assert {name: r.forward_passes for name, r in out.items()} == counts
    assert min(torch.tensor(sorted(sums)).diff()) > 1e-3  # no two settings gave the same merge
    assert out["mergekit_best"].settings["weights"] == [1.0, 1.0, 1.0, 1.0]
