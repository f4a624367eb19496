"""The language-model merge runner (m2n2_lightning/lm/merge.py, baselines.py, experiment.py) on tiny seed models.

The scores here are continuous functions of the weights (a sigmoid of the answer's first-token
logit margin), so that every reported number is a non-trivial value to recompute by hand from
the saved models, and so that the members differ on which prompts they "solve" (score >= 0.5).
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from test_lm import TINY
from transformers import AutoModelForCausalLM

from m2n2_lightning import M2N2Callback, M2N2Strategy
from m2n2_lightning.config import register_schema
from m2n2_lightning.lm import seeds
from m2n2_lightning.lm.baselines import seed_alone, slerp_sweep
from m2n2_lightning.lm.merge import merge_models
from m2n2_lightning.lm.tasks import TOKENIZER, PromptDataset, prompt_sets
from m2n2_lightning.merge_run import resource_labels
from m2n2_lightning.tasks.skills import SkillTask
from m2n2_lightning.metrics import SOLVED
from m2n2_lightning.params import FlatParams
from m2n2_lightning.strategies.base import build_strategy

pytestmark = pytest.mark.usefixtures("one_thread")
CONF = Path(__file__).resolve().parents[1] / "m2n2_lightning" / "conf"


@torch.no_grad()
def margin_score(model: torch.nn.Module, batch) -> torch.Tensor:
    """Per prompt: sigmoid(30 x (logit of the answer's first character - mean logit)) after the prompt, in (0, 1)."""
    prompts, answers = batch
    ids, mask = TOKENIZER.batch_prompts(prompts)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits[:, -1]
    first = torch.tensor([TOKENIZER.encode(a[0])[0] for a in answers])
    margin = logits.gather(1, first[:, None]).squeeze(1) - logits.mean(dim=1)
    return torch.sigmoid(30 * margin.double()).float()


def mean_margin(model: torch.nn.Module, data) -> float:
    """The test function: mean `margin_score` over a dataset of (prompt, answer) pairs."""
    pairs = list(data)
    return float(margin_score(model, ([p for p, _ in pairs], [a for _, a in pairs])).mean())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny_seeds")
    seeds.build_seeds(out, TINY)
    return out


def dataset(name: str, split: int, count: int) -> PromptDataset:
    pairs = prompt_sets(seeds.SKILLS[name])[split][:count]
    return PromptDataset(pairs, [name] * count)


RESOURCES = PromptDataset(dataset("add", 0, 6).pairs + dataset("rev", 0, 6).pairs, ["add"] * 6 + ["rev"] * 6)
TESTS = {"add": dataset("add", 1, 8), "copy": dataset("copy", 1, 8)}


def load(tiny: Path, name: str = "base") -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(tiny / name).eval()


class PopulationByHand(L.Callback):
    """After every step: coverage and fitness entropy of the strategy's population, by their definitions in float64."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, float, float]] = []

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        engine = next(c for c in trainer.callbacks if isinstance(c, M2N2Callback)).engine
        scores, fitness = (t.double() for t in engine.strategy.population())
        coverage = sum(bool((scores[:, j] >= SOLVED).any()) for j in range(scores.shape[1])) / scores.shape[1]
        shares = [f / float(fitness.sum()) for f in fitness.tolist()]
        entropy = -sum(p * math.log(p) for p in shares if p > 0)
        self.rows.append((engine.forward_passes, coverage, entropy))


def test_merge_reports_what_the_saved_model_scores(tiny: Path, tmp_path: Path) -> None:
    model, by_hand = load(tiny), PopulationByHand()
    strategy = functools.partial(M2N2Strategy, pop_size=4, warmup_steps=3, storage="coefficients", seed=1)
    result = merge_models(strategy, [tiny / "skill_a", tiny / "skill_b"], model, RESOURCES, TESTS, 12,
                          score=margin_score, test_fn=mean_margin, resource_batch_size=5, callbacks=[by_hand])
    model.save_pretrained(tmp_path / "merged")
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    for name, data in TESTS.items():
        assert result.test[name] == pytest.approx(mean_margin(saved, data), rel=1e-6)
    assert result.train == pytest.approx(mean_margin(saved, RESOURCES), rel=1e-6)
    assert 0.05 < result.train < 0.95  # a value the checks above could get wrong
    # The curve: a row at the start and after every step; the best member's score is the saved model's.
    assert [row["forward_passes"] for row in result.curve] == list(range(13)) and result.forward_passes == 12
    assert result.curve[-1]["best_score"] == pytest.approx(mean_margin(saved, RESOURCES), rel=1e-5)
    assert [(r["coverage"], r["fitness_entropy"]) for r in result.curve[1:]] == [
        (pytest.approx(c, abs=1e-6), pytest.approx(e, rel=1e-5)) for _, c, e in by_hand.rows
    ]
    assert len({row["coverage"] for row in result.curve}) > 1 or 0 < result.curve[-1]["coverage"] < 1
    seconds = [row["wall_seconds"] for row in result.curve]
    assert seconds == sorted(seconds) and result.wall_seconds >= seconds[-1]
    assert [p.forward_passes for p in result.test_points] == [0, 12] and result.settings["archive"] == "CoefficientArchive"


def test_test_points_every_n_evaluations(tiny: Path) -> None:
    strategy = functools.partial(M2N2Strategy, pop_size=3, seed=0)
    result = merge_models(strategy, [tiny / "skill_a", tiny / "skill_b"], load(tiny), RESOURCES, TESTS, 7,
                          score=margin_score, test_fn=mean_margin, test_every=3)
    assert [p.forward_passes for p in result.test_points] == [0, 3, 6, 7]
    assert result.test_points[-1].test == result.test


def slerp_by_hand(a: torch.Tensor, b: torch.Tensor, w: float) -> torch.Tensor:
    """SLERP of two flat vectors with one angle, in float64: sin((1-w) O)/sin O a + sin(w O)/sin O b."""
    a, b = a.double(), b.double()
    omega = math.acos(float(a @ b / (a.norm() * b.norm())))
    return (math.sin((1 - w) * omega) * a + math.sin(w * omega) * b) / math.sin(omega)


@pytest.mark.parametrize("as_loader", [False, True], ids=["dataset", "dataloader"])
def test_slerp_sweep_keeps_the_best_training_weight(tiny: Path, as_loader: bool) -> None:
    """Every resource is scored, from a dataset or a DataLoader of batches (train.py's tasks give a DataLoader: its
    len() counts batches, and the sweep once scored only the first of 12 examples there)."""
    model = load(tiny)
    resources = torch.utils.data.DataLoader(RESOURCES, batch_size=4) if as_loader else RESOURCES
    test_fn = lambda m, data: mean_margin(m, RESOURCES if data is resources else data)  # noqa: E731
    result = slerp_sweep([tiny / "skill_a", tiny / "skill_b"], model, resources, TESTS, 5, score=margin_score,
                         test_fn=test_fn, resource_batch_size=4)
    a, b = (torch.nn.utils.parameters_to_vector(load(tiny, n).parameters()).detach() for n in ("skill_a", "skill_b"))
    holder = load(tiny)
    train = []
    for w in (0.0, 0.25, 0.5, 0.75, 1.0):
        torch.nn.utils.vector_to_parameters(slerp_by_hand(a, b, w).float(), holder.parameters())
        train.append(mean_margin(holder, RESOURCES))
    best = max(range(5), key=lambda i: (train[i], -i))  # the first of the best
    assert result.settings["best_w"] == best / 4 and result.forward_passes == 5
    assert result.settings["best_train_score"] == pytest.approx(train[best], rel=1e-5)
    merged = torch.nn.utils.parameters_to_vector(model.parameters()).detach().double()
    assert torch.allclose(merged, slerp_by_hand(a, b, best / 4), atol=1e-6)
    torch.nn.utils.vector_to_parameters(slerp_by_hand(a, b, best / 4).float(), holder.parameters())
    assert result.test["add"] == pytest.approx(mean_margin(holder, TESTS["add"]), rel=1e-5)


def test_seed_alone_is_the_seed(tiny: Path) -> None:
    result = seed_alone(tiny / "skill_b", load(tiny), RESOURCES, TESTS, test_fn=mean_margin)
    expected = {name: mean_margin(load(tiny, "skill_b"), data) for name, data in TESTS.items()}
    assert result.test == pytest.approx(expected, rel=1e-6) and result.forward_passes == 0


def test_bad_input_is_refused_before_any_run(tiny: Path) -> None:
    strategy = functools.partial(M2N2Strategy, pop_size=3)
    with pytest.raises(ValueError, match="two or more seed models"):
        merge_models(strategy, [tiny / "skill_a"], load(tiny), RESOURCES, TESTS, 5)
    with pytest.raises(ValueError, match="evaluations"):
        merge_models(strategy, [tiny / "skill_a", tiny / "skill_b"], load(tiny), RESOURCES, TESTS, 0)
    with pytest.raises(ValueError, match="test set"):
        merge_models(strategy, [tiny / "skill_a", tiny / "skill_b"], load(tiny), RESOURCES, {}, 5)
    with pytest.raises(ValueError, match="exactly two"):
        slerp_sweep([tiny / "skill_a"] * 3, load(tiny), RESOURCES, TESTS, 5)
    for options, message in (({"score": "bleu"}, "score must be one of"), ({"train": ["add", "mul"]}, "train must be"),
                             ({"test": "copy"}, "test must be")):
        with pytest.raises(ValueError, match=message):
            SkillTask(**options)


def compose_lm(*overrides: str):
    register_schema()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=["experiment=lm_merge", *overrides])


def test_lm_strategy_configs_build_the_papers_settings(tiny: Path) -> None:
    seeds = [load(tiny, name) for name in ("skill_a", "skill_b")]
    flat = FlatParams(seeds[0])

    def built(name: str):
        factory = instantiate(compose_lm(name, "seed=3").strategy)
        return build_strategy(factory, flat.num_params, seeds, flat.layout)

    m2n2 = built("strategy=m2n2_merge")
    assert (m2n2.pop_size, m2n2.warmup_steps, m2n2.mutation_sigma, m2n2.seed) == (15, 50, 0.0, 3)
    assert type(m2n2.archive).__name__ == "CoefficientArchive" and m2n2.capacity == "unit"
    assert m2n2.alpha == 1.0 and m2n2.use_matchmaker and m2n2.use_split_point
    assert built("strategy.capacity=max").capacity == "max"
    ga = built("ablation=ga")
    assert ga.alpha == 0.0 and not ga.use_matchmaker and ga.pop_size == 15 and ga.warmup_steps == 50
    assert not built("ablation=no_split_point").use_split_point and not built("ablation=no_matchmaker").use_matchmaker
    elites = built("strategy=map_elites_merge")
    assert elites.bins == 4 and elites.mutation_sigma == 0.0
    assert built("strategy=cmaes_layerwise_slerp").candidates_per_step == 25
    assert elites.membership.tolist() == [[1.0] * 100 + [0.0] * 100, [0.0] * 100 + [1.0] * 100]


def test_a_bad_task_fails_before_any_seed_is_built(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("M2N2_LM_CACHE", str(tmp_path / "cache"))
    cfg = compose_lm("merge.tasks.skills.score=bleu")
    assert cfg.data is None and cfg.model is None and cfg.forward_passes == 1000
    with pytest.raises(InstantiationException, match="score must be one of"):
        instantiate(cfg.merge.tasks)
    assert not (tmp_path / "cache").exists()


def test_skill_labels_follow_the_resources() -> None:
    labels = resource_labels({"skills": SkillTask(train=["add", "rev"])})
    assert labels == [0] * 100 + [1] * 100
    assert resource_labels({"skills": SkillTask(train=["rev", "add"])}) == [0] * 100 + [1] * 100  # the first named skill is 0
    # two tasks: one group each
    assert resource_labels({"a": SkillTask(train=["add"]), "b": SkillTask(train=["copy"], test=[])}) == [0] * 100 + [1] * 100
