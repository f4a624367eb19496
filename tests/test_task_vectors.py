"""M2N2's `task_vectors` option: crossover in task-vector space over a base (the last of the seeds), checked in float64."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from test_lm_merge import tiny  # noqa: F401  (the tiny seed models, a module fixture)

from m2n2_lightning import M2N2Strategy
from m2n2_lightning.strategies.coefficient_archive import CoefficientArchive


def slerp_coefficients(a: torch.Tensor, b: torch.Tensor, t: float) -> tuple[float, float]:
    """(sin((1 - t) W) / sin W, sin(t W) / sin W), W the angle between a and b (float64)."""
    omega = math.acos(float(a @ b) / (float(a.norm()) * float(b.norm())))
    return math.sin((1 - t) * omega) / math.sin(omega), math.sin(t * omega) / math.sin(omega)


def slerp_by_hand(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    c_a, c_b = slerp_coefficients(a, b, t)
    return c_a * a + c_b * b


def test_a_child_is_the_base_plus_the_slerp_of_the_parents_task_vectors() -> None:
    torch.manual_seed(0)
    d = 40
    base = torch.randn(d, dtype=torch.float64)
    tuned = [base + 0.3 * torch.randn(d, dtype=torch.float64) for _ in range(3)]
    archive = CoefficientArchive(4, d, [*tuned, base], task_vectors=True)
    assert len(archive.initial_children(None, 0.0, torch.Generator())) == 3  # the base is no member
    archive.forms[:3] = archive.initial_children(None, 0.0, torch.Generator()).forms
    first = archive.crossover(torch.tensor([0]), torch.tensor([1]), torch.tensor([15]), torch.tensor([[0.3]], dtype=torch.float64))
    a, b = tuned[0] - base, tuned[1] - base
    # The form over (A, B, C, base): c_a A + c_b B + (1 - c_a - c_b) base, ratio 0.3 before the split, 0.7 after.
    rows = [[c_a, c_b, 0.0, 1 - c_a - c_b] for c_a, c_b in (slerp_coefficients(a, b, t) for t in (0.3, 0.7))]
    assert first.forms[0][0].tolist() == [15]
    assert torch.allclose(first.forms[0][1], torch.tensor(rows, dtype=torch.float64), rtol=0, atol=1e-13)
    expected = base.clone()
    expected[:15] += slerp_by_hand(a, b, 0.3)[:15]
    expected[15:] += slerp_by_hand(a, b, 0.7)[15:]
    assert torch.allclose(first.dense()[0], expected, rtol=0, atol=1e-6)  # written in float32 arithmetic
    # A grandchild: its parents' task vectors are the child's (expected - base) and seed C's.
    archive.forms[3] = first.forms[0]
    second = archive.crossover(torch.tensor([3]), torch.tensor([2]), None, torch.tensor([[0.6]], dtype=torch.float64))
    assert torch.allclose(second.dense()[0], base + slerp_by_hand(expected - base, tuned[2] - base, 0.6), atol=1e-6)
    # The same parents without the option: the SLERP of the members themselves.
    plain = CoefficientArchive(4, d, [*tuned, base])
    plain.forms[:2] = archive.forms[:2]
    child = plain.crossover(torch.tensor([0]), torch.tensor([1]), None, torch.tensor([[0.3]], dtype=torch.float64))
    c_a, c_b = slerp_coefficients(tuned[0], tuned[1], 0.3)
    assert torch.allclose(child.forms[0][1], torch.tensor([[c_a, c_b, 0.0, 0.0]], dtype=torch.float64), atol=1e-13)


def test_near_orthogonal_task_vectors_keep_more_of_each_than_averaging() -> None:
    """The reason for the option: the midpoint of two orthogonal task vectors of one length keeps 1/sqrt(2) of each."""
    base = torch.zeros(4, dtype=torch.float64) + 1.0
    tuned = [base + torch.tensor([1.0, 0, 0, 0], dtype=torch.float64), base + torch.tensor([0, 1.0, 0, 0], dtype=torch.float64)]
    archive = CoefficientArchive(2, 4, [*tuned, base], task_vectors=True)
    archive.forms[:2] = archive.initial_children(None, 0.0, torch.Generator()).forms
    child = archive.crossover(torch.tensor([0]), torch.tensor([1]), None, torch.tensor([[0.5]], dtype=torch.float64)).dense()[0]
    assert child.tolist() == pytest.approx([1 + 2**-0.5, 1 + 2**-0.5, 1.0, 1.0], abs=1e-12)


def test_the_strategy_runs_and_refuses_what_cannot_hold_it() -> None:
    torch.manual_seed(1)
    d = 30
    base = torch.randn(d)
    seeds = [base + 0.1 * torch.randn(d) for _ in range(2)] + [base]
    strategy = M2N2Strategy(d, pop_size=4, init_models=seeds, storage="coefficients", task_vectors=True,
                            warmup_steps=2)
    target = torch.randn(d)
    score = lambda children: -(children.dense() - target).abs()[:, :5] / 10  # noqa: E731
    strategy.start(lambda members: (score(members) + 1).clamp(0, 1))
    assert int(strategy.occupied.sum()) == 2 and strategy.settings()["task_vectors"] is True
    for _ in range(5):
        children = strategy.ask()
        strategy.tell(children, (score(children) + 1).clamp(0, 1))
    assert all(form is None or form[1].shape[1] == 3 for form in strategy.archive.forms)
    with pytest.raises(ValueError, match="storage=coefficients"):
        M2N2Strategy(d, pop_size=4, init_models=seeds, task_vectors=True)
    with pytest.raises(ValueError, match="two or more fine-tunes and then their base"):
        M2N2Strategy(d, pop_size=4, init_models=seeds[1:], storage="coefficients", task_vectors=True)


@pytest.mark.slow  # a train.py run in a subprocess
def test_train_py_merges_in_task_vector_space_and_the_recipe_rebuilds_it(tiny, tmp_path) -> None:  # noqa: F811
    """train.py passes the base as the last seed; best_model/'s recipe names it and rebuilds the merge bit for bit."""
    from test_lm_entry import tiny_seeds, train_lm
    from transformers import AutoModelForCausalLM

    from m2n2_lightning.merging.rebuild import rebuild_to
    from m2n2_lightning.merging.recipe import RECIPE_FILE, Recipe

    summary = train_lm(tmp_path / "run", *tiny_seeds(tiny), "forward_passes=12", "strategy.task_vectors=true")
    assert summary["strategy_settings"]["task_vectors"] is True and summary["strategy_settings"]["seed_models"] == 3
    recipe = Recipe.load(tmp_path / "run" / "best_model" / RECIPE_FILE)
    assert [Path(seed).name for seed in recipe.seeds] == ["skill_a", "skill_b", "base"]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "best_model").state_dict()
    rebuilt = AutoModelForCausalLM.from_pretrained(rebuild_to(tmp_path / "run" / "best_model" / RECIPE_FILE,
                                                              tmp_path / "rebuilt")).state_dict()
    assert all(torch.equal(value, merged[name]) for name, value in rebuilt.items())


@pytest.mark.slow  # three bf16 vectors past 2^24 and their float64 reference (about 1.5 GB)
def test_past_two_to_the_24_in_bf16_the_split_and_the_coefficients_hold() -> None:
    d, split = (1 << 24) + 1003, (1 << 24) + 17
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(d, generator=generator).bfloat16()
    tuned = [(base.float() + 0.05 * torch.randn(d, generator=generator)).bfloat16() for _ in range(2)]
    archive = CoefficientArchive(3, d, [*tuned, base], task_vectors=True)
    archive.forms[:2] = archive.initial_children(None, 0.0, torch.Generator()).forms
    child = archive.crossover(torch.tensor([0]), torch.tensor([1]), torch.tensor([split]),
                              torch.tensor([[0.3]], dtype=torch.float64))
    a, b = (x.double() - base.double() for x in tuned)
    rows = [[*slerp_coefficients(a, b, t), 0.0] for t in (0.3, 0.7)]
    rows = [[c_a, c_b, 1 - c_a - c_b] for c_a, c_b, _ in rows]
    assert child.forms[0][0].tolist() == [split]
    assert torch.allclose(child.forms[0][1], torch.tensor(rows, dtype=torch.float64), rtol=0, atol=1e-12)
    written = child.dense()[0]
    assert written.dtype == torch.bfloat16
    expected = base.double().clone()
    expected[:split] += rows[0][0] * a[:split] + rows[0][1] * b[:split]
    expected[split:] += rows[1][0] * a[split:] + rows[1][1] * b[split:]
    error = (written.double() - expected).abs() / expected.abs().clamp_min(1e-3)
    assert float(error.max()) <= 2**-8  # one bf16 rounding of each value
