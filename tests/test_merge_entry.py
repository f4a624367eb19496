"""train.py as the one driver of a merge: intervals in evaluations, keys that do not apply, strategies that cannot merge."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from test_lm_entry import tiny_seeds, train_lm
from test_lm_merge import tiny  # noqa: F401  (the tiny seed models, a module fixture)

from m2n2_lightning.config import register_schema, step_intervals
from m2n2_lightning.merge_run import check_merge

CONF = Path(__file__).resolve().parents[1] / "m2n2_lightning" / "conf"


def checked(*overrides: str, experiment: str = "lm_merge") -> None:
    """Compose train.py's config and run the merge checks on it (nothing is read or loaded)."""
    register_schema()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        check_merge(compose(config_name="config", overrides=[f"experiment={experiment}", *overrides]))


def test_intervals_are_evaluations_whatever_the_candidates_per_step() -> None:
    cfg = OmegaConf.create({"forward_passes": 1000, "log_every": 10, "checkpoint_every": 250, "val_every": None})
    # layerwise CMA-ES scores 25 candidates a step: 250 evaluations are 10 steps, not 250
    assert step_intervals(cfg, 25) == {"max_steps": 40, "log_every_n_steps": 1, "every_n_train_steps": 10}
    cfg.val_every = 500
    assert step_intervals(cfg, 50)["val_check_interval"] == 10


@pytest.mark.slow  # a whole train.py / m2n2-merge run in a subprocess (CI runs it)
def test_checkpoint_every_counts_evaluations_in_a_layerwise_slerp_merge(tiny: Path, tmp_path: Path) -> None:  # noqa: F811
    train_lm(tmp_path, *tiny_seeds(tiny), "strategy=cmaes_layerwise_slerp", "forward_passes=75", "checkpoint_every=25",
             "checkpoint.save_top_k=-1", "+checkpoint.filename='{step}'")
    # 25 candidates a step: a checkpoint every step (25 evaluations), three steps for the budget of 75
    saved = sorted(p.name for p in (tmp_path / "checkpoints").glob("step=*.ckpt"))
    assert saved == ["step=1.ckpt", "step=2.ckpt", "step=3.ckpt"]


def test_a_strategy_that_cannot_start_from_seeds_is_refused_naming_those_that_can() -> None:
    with pytest.raises(ValueError, match="cannot start from seed models; a merge takes one of: ") as error:
        checked("strategy=cmaes")
    named = str(error.value).split("one of: ")[1].split(", ")
    assert {"m2n2_merge", "ga", "map_elites_merge", "cmaes_layerwise_slerp"} <= set(named)
    assert "cmaes" not in named and "cmaes_diagonal" not in named


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("module.score_fn=correctness",), "module.score_fn does not apply to a merge"),
        (("data=digits",), "data does not apply to a merge"),
        (("val_every=100",), "val_every does not apply to a merge"),
        (("merge.models=[only_one]",), "two or more seed models"),
        (("merge.dtype=float64",), "merge.dtype must be one of"),
        (("merge.batch_size=0",), "merge.batch_size must be an integer >= 1"),
        (("~merge.tasks.skills",), "merge.tasks must name at least one task"),
    ],
)
def test_a_bad_merge_block_is_refused_before_anything_loads(overrides: tuple[str, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        checked(*overrides)


def test_merge_needs_models_where_there_are_no_toy_seeds() -> None:
    with pytest.raises(ValueError, match="merge.models must list two or more seed models"):
        checked("merge.models=null", experiment="merge")


def test_merge_keys_are_refused_by_the_other_experiments(tmp_path: Path) -> None:
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, str(root / "train.py"), "+lm.reduced=true", f"hydra.run.dir={tmp_path}"],
                            capture_output=True, text=True, timeout=120, cwd=root)
    assert result.returncode != 0 and "lm.* belongs to experiment=lm_merge" in result.stderr


def test_an_ablation_over_a_strategy_without_m2n2_switches_is_refused() -> None:
    from omegaconf import OmegaConf

    from m2n2_lightning.train import check_ablation

    cmaes = OmegaConf.create({"_target_": "m2n2_lightning.strategies.CMAESStrategy", "_partial_": True})
    with pytest.raises(ValueError, match=r"ablation=ga switches M2N2's operators .* strategy=cmaes \(CMAESStrategy\)"):
        check_ablation(cmaes, {"ablation": "ga", "strategy": "cmaes"})
    elites = OmegaConf.create({"_target_": "m2n2_lightning.strategies.MAPElitesStrategy", "_partial_": True})
    with pytest.raises(ValueError, match="has none"):
        check_ablation(elites, {"ablation": "no_split_point", "strategy": "map_elites"})
    m2n2 = OmegaConf.create({"_target_": "m2n2_lightning.strategies.M2N2Strategy", "_partial_": True})
    check_ablation(m2n2, {"ablation": "ga", "strategy": "m2n2_merge"})
    check_ablation(cmaes, {"ablation": None, "strategy": "cmaes"})
