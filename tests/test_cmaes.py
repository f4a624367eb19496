"""CMAESStrategy against pycma, the implementation the paper used, as the oracle.

Both are told the same candidates (pycma's, so its TPA pairs and its own bookkeeping
are exercised) and the same fitness values; after every generation the mean, sigma,
p_sigma, p_c and the covariance must agree to float64 round-off.
"""

from __future__ import annotations

import io
import math

import cma
import numpy as np
import pytest
import torch
from cma.utilities.math import Mh

from m2n2_lightning.params import flat_vector
from m2n2_lightning.strategies.cmaes import AUTO_DIAGONAL_ABOVE, CMAESStrategy
from m2n2_lightning.strategies.m2n2 import M2N2Strategy

#: Largest deviation allowed, relative to the largest entry of pycma's value.
RELATIVE_TOLERANCE = 1e-11


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny matmuls: one thread avoids waking OpenMP's worker threads for each of them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def record_hsig(monkeypatch):
    """Let pycma list the generations in which h_sigma stalled."""
    monkeypatch.setattr(cma.evolution_strategy, "_record_hsig", True)


def pycma_options(popsize: int, diagonal: bool, tpa: bool, gap: float | None, seed: int) -> dict:
    options = {"popsize": popsize, "seed": seed, "verbose": -9, "CMA_diagonal": diagonal}
    options["AdaptSigma"] = cma.sigma_adaptation.CMAAdaptSigmaTPA if tpa else cma.sigma_adaptation.CMAAdaptSigmaCSA
    return options if gap is None else {**options, "updatecovwait": gap}


def far_target_scores(x: torch.Tensor) -> torch.Tensor:
    """Per-example scores [k, 1]: a Gaussian bump 20 initial sigmas away, so the first
    generations see an almost linear slope (long p_sigma: h_sigma stalls) and later ones a sphere."""
    return torch.exp(-((x - 0.2) ** 2).sum(dim=1, keepdim=True))


def started(**kwargs) -> CMAESStrategy:
    """A CMAESStrategy after `start` (CMA-ES scores nothing there, so any score callable does)."""
    strategy = CMAESStrategy(**kwargs)
    strategy.start(far_target_scores)
    return strategy


def step(strategy: CMAESStrategy) -> torch.Tensor:
    """Ask one generation and tell its far_target_scores; the candidates."""
    candidates = strategy.ask().dense()
    strategy.tell(candidates, far_target_scores(candidates))
    return candidates


def assert_close(name: str, ours: torch.Tensor, reference: np.ndarray | float, generation: int) -> None:
    reference = np.asarray(reference, dtype=np.float64)
    deviation = np.max(np.abs(ours.cpu().numpy() - reference)) / np.max(np.abs(reference))
    assert deviation < RELATIVE_TOLERANCE, f"{name} differs by {deviation:.2e} (relative) at generation {generation}"


CONFIGS = {
    # dim, popsize, diagonal, TPA, updatecovwait: C refreshed every generation (pycma's gap < 1 at D = 8)
    "full-csa": (8, 20, False, False, None),
    "full-csa-lazy": (8, 20, False, False, 3),  # refreshed every third generation only
    "full-csa-own-gap": (40, 6, False, False, None),  # pycma's own gap (1.5 generations)
    "full-tpa": (8, 20, False, True, None),
    "diagonal-csa": (8, 20, True, False, None),
    "diagonal-tpa": (10, 12, True, True, None),
}


def run_against_pycma(config: str, device: str = "cpu", generations: int = 24, seed: int = 3) -> None:
    dim, popsize, diagonal, tpa, gap = CONFIGS[config]
    x0 = np.random.default_rng(seed).normal(0, 0.01, dim)
    es = cma.CMAEvolutionStrategy(x0, 0.01, pycma_options(popsize, diagonal, tpa, gap, seed + 1))
    ours = CMAESStrategy(
        num_params=dim, popsize=popsize, x0=torch.tensor(x0), diagonal=diagonal,
        sigma_adaptation="tpa" if tpa else "csa", eigen_update_gap=gap,
    ).to(device)
    ours.start(lambda candidates: far_target_scores(candidates))
    for generation in range(1, generations + 1):
        solutions = np.array(es.ask())
        ours.ask()  # where our lazy eigendecomposition happens, as in pycma's ask
        candidates = torch.tensor(solutions, device=device)
        scores = far_target_scores(candidates)
        es.tell(list(solutions), list(-scores.mean(dim=1).cpu().numpy()))
        ours.tell(candidates, scores)
        assert_close("mean", ours.mean, es.mean, generation)
        assert_close("sigma", ours.sigma, es.sigma, generation)
        assert_close("p_sigma", ours.p_sigma, es.adapt_sigma.ps, generation)
        assert_close("p_c", ours.p_c, es.pc, generation)
        if diagonal:
            assert_close("C", ours.C, es.sigma_vec.scaling**2, generation)
        else:
            assert_close("C", ours.C, es.sm.C, generation)
            assert ours.eigen_updated_at == es.sm.last_update, f"eigendecomposition at generation {generation}"
            assert_close("D", ours.D, es.sm.D, generation)  # both ascending
        if tpa:
            assert_close("TPA s", ours.tpa_s, es.adapt_sigma.s, generation)
    assert 0 < len(es.hsiglist) < generations, "both h_sigma cases must occur"
    if not diagonal and es.sm.lazy_update_gap > 1:
        assert 1 < es.sm.count_eigen < generations - 1, "lazy eigendecomposition not exercised"


CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"))


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_updates_match_pycma(config: str, device: str) -> None:
    run_against_pycma(config, device)


@pytest.mark.parametrize("dim, popsize", [(2, 2), (5, 7), (10, 20), (150, 20), (400, 20)])
@pytest.mark.parametrize("diagonal", [False, True])
def test_parameters_match_pycma(dim: int, popsize: int, diagonal: bool) -> None:
    options = {"popsize": popsize, "CMA_diagonal": diagonal, "verbose": -9, "CMA_mirrors": 0}
    es = cma.CMAEvolutionStrategy(np.zeros(dim), 1.0, options)
    ours = CMAESStrategy(num_params=dim, popsize=popsize, diagonal=diagonal).params
    sp = es.sp
    np.testing.assert_allclose(ours.weights, list(sp.weights), rtol=1e-13, atol=1e-15)
    assert ours.mu == sp.weights.mu
    assert ours.mueff == pytest.approx(sp.weights.mueff, rel=1e-13)
    learning_rates = (sp.cc_sep, sp.c1_sep, sp.cmu_sep) if diagonal else (sp.cc, sp.c1, sp.cmu)
    assert (ours.cc, ours.c1, ours.cmu) == pytest.approx(learning_rates, rel=1e-13)
    assert ours.chi_n == pytest.approx(Mh.chiN(dim), rel=1e-13)
    if dim >= 300:  # pycma's own choice: TPA
        assert isinstance(es.adapt_sigma, cma.sigma_adaptation.CMAAdaptSigmaTPA)
        assert ours.tpa_damp == pytest.approx(es.adapt_sigma.sp.damp, rel=1e-13)
    else:
        assert (ours.cs, ours.damps) == pytest.approx((es.adapt_sigma.cs, es.adapt_sigma.damps), rel=1e-13)
    if not diagonal:
        assert ours.eigen_update_gap == pytest.approx(es.sm.lazy_update_gap, rel=1e-13)


def test_converges_on_the_sphere_like_pycma() -> None:
    """Scores exp(-||x - c||^2) (N = 1): after equal budgets the final f are of one order of magnitude."""
    dim, generations, centre = 10, 100, 0.3
    ours_f, pycma_f = [], []
    for seed in range(3):
        x0 = np.random.default_rng(seed).normal(0, 0.01, dim)
        es = cma.CMAEvolutionStrategy(x0, 0.01, {"popsize": 20, "seed": seed + 1, "verbose": -9})
        ours = started(num_params=dim, popsize=20, x0=torch.tensor(x0), candidate_dtype=torch.float64, seed=seed)
        for _ in range(generations):
            solutions = np.array(es.ask())
            es.tell(list(solutions), list(((solutions - centre) ** 2).sum(axis=1)))
            candidates = ours.ask().dense()
            ours.tell(candidates, torch.exp(-((candidates - centre) ** 2).sum(dim=1, keepdim=True)))
        pycma_f.append(((es.mean - centre) ** 2).sum())
        ours_f.append(((ours.mean - centre) ** 2).sum().item())
    assert max(ours_f) < 1e-5 * centre**2 * dim, ours_f  # 1e-5 times the initial f
    assert abs(np.mean(np.log10(ours_f)) - np.mean(np.log10(pycma_f))) < 1, (ours_f, pycma_f)


@pytest.mark.parametrize("told", [0, 5])  # 0: last_scores is still [0, 0] when saved
@pytest.mark.parametrize("options", [{"eigen_update_gap": 2}, {"diagonal": True, "sigma_adaptation": "tpa"}])
def test_state_dict_round_trip_continues_identically(options: dict, told: int) -> None:
    original = started(num_params=6, popsize=8, seed=5, **options)
    for _ in range(told):
        step(original)
    torch.save(original.state_dict(), buffer := io.BytesIO())
    restored = CMAESStrategy(num_params=6, popsize=8, seed=123, **options)  # not started: the state says so
    restored.load_state_dict(torch.load(io.BytesIO(buffer.getvalue())))
    assert restored.started and restored.num_resources == original.num_resources
    for _ in range(6):
        assert torch.equal(step(original), step(restored))
    for name, value in original.state_dict().items():
        if name != "_extra_state":
            assert torch.equal(value, restored.state_dict()[name]), name
    assert restored.generation == original.generation == told + 6
    assert restored.forward_passes == original.forward_passes == 8 * (told + 6)


def test_mismatched_state_dicts_raise_a_value_error_naming_the_difference() -> None:
    step(cmaes := started(num_params=6, popsize=8))
    state = cmaes.state_dict()
    mismatches = [
        (CMAESStrategy(num_params=6), M2N2Strategy(num_params=6).state_dict(), "M2N2Strategy's, not a CMAESStrategy"),
        (CMAESStrategy(num_params=6), torch.nn.Linear(2, 3).state_dict(), "no strategy state"),
        (CMAESStrategy(num_params=6, popsize=10), state, "popsize = 8, this one 10"),
        (CMAESStrategy(num_params=7, popsize=8), state, "num_params = 6, this one 7"),
        (CMAESStrategy(num_params=6, popsize=8, diagonal=True), state, "diagonal = False, this one True"),
        (CMAESStrategy(num_params=6, popsize=8, sigma_adaptation="tpa"), state, "sigma_adaptation = 'csa'"),
    ]
    for target, saved, message in mismatches:
        with pytest.raises(ValueError, match=message):
            target.load_state_dict(saved)


def test_tpa_asks_a_mirrored_pair_along_the_mean_shift() -> None:
    strategy = started(num_params=5, popsize=10, sigma_adaptation="tpa", candidate_dtype=torch.float64)
    step(strategy)
    second = strategy.ask().dense()
    up, down = second[0] - strategy.mean, second[1] - strategy.mean
    torch.testing.assert_close(up, -down)
    cosine = torch.nn.functional.cosine_similarity(up, strategy.mean_shift, dim=0)
    assert cosine == pytest.approx(1.0, abs=1e-12)


def test_ask_returns_one_generation_in_the_candidate_dtype_and_the_state_dtype() -> None:
    strategy = started(num_params=7, seed=1)
    candidates = strategy.ask().dense()
    assert candidates.shape == (20, 7) and candidates.dtype == torch.float32
    assert strategy.mean.dtype == torch.float64
    assert torch.equal(candidates, started(num_params=7, seed=1).ask().dense())
    # x0 ~ N(0, 0.01^2) and steps of sigma0 = 0.01 around it.
    assert 0.001 < strategy.mean.std().item() < 0.03
    assert 0.001 < (candidates.double() - strategy.mean).std().item() < 0.03
    # float32 state and a module as x0
    model = torch.nn.Linear(3, 2)
    strategy = started(num_params=8, popsize=6, x0=model, dtype=torch.float32, eigen_update_gap=1)
    assert strategy.num_params == 8 and strategy.C.dtype == torch.float32
    torch.testing.assert_close(strategy.best_params(), flat_vector(model))
    for _ in range(4):
        step(strategy)
    assert strategy.eigen_updated_at == 3 and torch.isfinite(strategy.C).all()


def test_best_params_is_the_best_candidate_told_and_population_the_last_generation() -> None:
    strategy = started(num_params=3, popsize=4, x0=torch.full((3,), 0.5))
    assert torch.equal(strategy.best_params(), torch.full((3,), 0.5))  # the mean before any tell
    scores, fitness = strategy.population()
    assert scores.numel() == 0 and fitness.numel() == 0
    candidates = strategy.ask().dense()
    strategy.tell(candidates, torch.tensor([[0.2, 0.4], [0.9, 0.7], [0.9, 0.7], [0.1, 0.0]]))
    assert torch.equal(strategy.best_params(), candidates[1])
    later, told = strategy.ask(), torch.rand(4, 2) / 2
    strategy.tell(later, told)  # worse: the best stays
    assert torch.equal(strategy.best_params(), candidates[1])
    assert strategy.best_score.item() == pytest.approx(0.8)
    assert strategy.forward_passes == 8 and strategy.candidates_per_step == 4
    scores, fitness = strategy.population()
    torch.testing.assert_close(scores, told.double())
    torch.testing.assert_close(fitness, told.double().mean(dim=1))


def test_auto_choices_follow_pycma() -> None:
    assert CMAESStrategy(num_params=299).sigma_adaptation == "csa"
    large = CMAESStrategy(num_params=300, diagonal="auto")
    assert large.sigma_adaptation == "tpa" and large.diagonal is False and large.C.shape == (300, 300)
    huge = CMAESStrategy(num_params=AUTO_DIAGONAL_ABOVE + 1, diagonal="auto")
    assert huge.diagonal is True and huge.C.shape == (AUTO_DIAGONAL_ABOVE + 1,) and huge.B.numel() == 0
    huge.start(far_target_scores)
    step(huge)
    assert huge.generation == 1


BAD_ARGUMENTS = [
    {"num_params": 0}, {"num_params": None}, {"popsize": 1}, {"popsize": 0}, {"popsize": 2.5}, {"popsize": True},
    {"sigma0": 0.0}, {"sigma0": -0.1}, {"sigma0": math.nan}, {"init_sigma": -1.0}, {"diagonal": "yes"},
    {"sigma_adaptation": "msr"}, {"eigen_update_gap": -1}, {"dtype": torch.int64}, {"candidate_dtype": "float"},
    {"x0": torch.zeros(4), "num_params": 5},
]  # fmt: skip


@pytest.mark.parametrize("kwargs", BAD_ARGUMENTS)
def test_bad_arguments_raise(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        CMAESStrategy(**{"num_params": 3, **kwargs})


def test_settings_start_and_bad_calls() -> None:
    strategy = CMAESStrategy(num_params=400, popsize=6, sigma0=0.1, diagonal="auto", dtype=torch.float32, seed=2)
    assert strategy.settings() == {
        "seed": 2, "num_params": 400, "popsize": 6, "sigma0": 0.1, "init_sigma": 0.01, "x0_given": False,
        "diagonal": False, "sigma_adaptation": "tpa", "eigen_update_gap": strategy.params.eigen_update_gap,
        "dtype": "float32", "candidate_dtype": "float32",
    }  # fmt: skip
    strategy.start(lambda candidates: pytest.fail("CMA-ES scores nothing at start"))
    with pytest.raises(RuntimeError, match="already started"):
        strategy.start(far_target_scores)
    assert strategy.forward_passes == 0 and strategy.num_resources is None
    strategy = started(num_params=3, popsize=6)
    with pytest.raises(ValueError, match="popsize"):
        strategy.ask(5)
    candidates = strategy.ask(6).dense()
    with pytest.raises(ValueError, match="popsize"):
        strategy.tell(candidates[:5], torch.rand(5, 2))
    with pytest.raises(ValueError):
        strategy.tell(candidates, torch.rand(6, 2) + 1)
    assert strategy.generation == 0  # nothing changed
    strategy.tell(candidates, torch.rand(6, 2))
    with pytest.raises(ValueError, match="N = 2"):
        strategy.tell(strategy.ask(), torch.rand(6, 3))
    for call in (lambda s: s.ask(), lambda s: s.tell(candidates, torch.rand(6, 2)), lambda s: s.best_params()):
        with pytest.raises(RuntimeError, match="start"):
            call(CMAESStrategy(num_params=3, popsize=6))
