"""The merge experiments of train.py (`experiment=merge`, `experiment=lm_merge`): seeds, tasks and the callback.

`check_merge` refuses a bad `merge` block before anything is read or loaded; `build_merge`
reads the tasks' examples, loads the base model that holds the candidates, and returns the
module and callbacks that train.py's one Trainer fits; `MergeOutputs.finish` tests the best
member and writes summary.json, best_model/, curves.csv and the recipe.
"""

from __future__ import annotations

import inspect
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra import compose
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_class, instantiate
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from omegaconf import OmegaConf

from m2n2_lightning.callback import M2N2Callback
from m2n2_lightning.config import step_intervals
from m2n2_lightning.lm.merge import CurveRecorder, LanguageModel, settings_of, write_curve
from m2n2_lightning.merging.output import save_merged
from m2n2_lightning.params import FlatParams
from m2n2_lightning.tasks.base import TaskSet
from m2n2_lightning.threads import auto_threads

log = logging.getLogger("m2n2_lightning.train")
CONF = Path(__file__).with_name("conf")
#: `merge.dtype`: the dtype the base model is loaded in (null: the checkpoint's own, float32 for most).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: Keys of the run config that a merge does not use: null in its experiment config, refused when set.
NOT_FOR_MERGE = ("data", "model", "val_every", "module.score_fn")


def check_merge(cfg: Any) -> None:
    """Refuse a `merge` block that cannot run, before any task is read or model loaded."""
    merge = cfg.merge
    for key in NOT_FOR_MERGE:
        if OmegaConf.select(cfg, key) is not None:
            raise ValueError(f"{key} does not apply to a merge (the resources are the tasks' examples): remove it")
    models = merge.models
    if models is None and cfg.get("lm") is None:
        raise ValueError("merge.models must list two or more seed models (hub ids, directories or safetensors files)")
    if models is not None and (isinstance(models, str) or len(models) < 2):
        raise ValueError(f"merge.models must list two or more seed models, got {models!r}: a merge needs two or more")
    if merge.dtype is not None and merge.dtype not in DTYPES:
        raise ValueError(f"merge.dtype must be one of {sorted(DTYPES)} (or null), got {merge.dtype!r}")
    for key, low in (("batch_size", 1), ("test_every", 0)):
        if not isinstance(merge[key], int) or merge[key] < low:
            raise ValueError(f"merge.{key} must be an integer >= {low}, got {merge[key]!r}")
    if not merge.tasks:
        raise ValueError("merge.tasks must name at least one task (a dataset, an lm-eval task, the toy skills)")
    check_model_class(merge.get("model_class"))
    check_starts_from_seeds(cfg.strategy)
    if cfg.strategy.get("task_vectors") and models is not None and merge.base_model is None:
        raise ValueError(
            "strategy.task_vectors crosses the seeds' task vectors over the model they were fine-tuned from: "
            "set merge.base_model to that base"
        )


def strategy_seeds(cfg: Any, seeds: list[str], base: str) -> list[str]:
    """The strategy's `init_models`: the seeds, then the base where the strategy works in task-vector space
    (`M2N2Strategy(task_vectors=True)` takes the last seed as the base)."""
    return [*seeds, base] if cfg.strategy.get("task_vectors") else seeds


def starts_from_seeds(strategy: Any) -> bool:
    """Whether a strategy config's class takes seed models (`init_models`)."""
    try:
        classes = get_class(strategy._target_).__mro__
    except Exception:  # a config without a class to read: it cannot be built at all
        return False
    # `init_models` may be taken by a base class through **kwargs (M2N2Strategy -> PopulationStrategy)
    return any("init_models" in inspect.signature(cls.__init__).parameters for cls in classes if "__init__" in vars(cls))


def check_starts_from_seeds(strategy: Any) -> None:
    """ValueError naming the strategy configs that can start from seeds, unless this one can."""
    if starts_from_seeds(strategy):
        return
    names = sorted(path.stem for path in (CONF / "strategy").glob("*.yaml"))
    able = [name for name in names if starts_from_seeds(compose("config", overrides=[f"strategy={name}"]).strategy)]
    chosen = HydraConfig.get().runtime.choices.get("strategy") if HydraConfig.initialized() else strategy.get("_target_")
    raise ValueError(f"strategy={chosen} cannot start from seed models; a merge takes one of: {', '.join(able)}")


def seed_sources(cfg: Any) -> tuple[list[str], str]:
    """The seed models and the model that holds the candidates (`merge.base_model`, else the first seed).

    Without `merge.models` (experiment=lm_merge or lm_merge4), the package's toy seeds (`lm.skills` fine-tunes,
    `lm.reduced`, `lm.seed_models_seed`) are built on first use into their cache, and their base holds the
    candidates.
    """
    merge = cfg.merge
    if merge.models is not None:
        models = [str(m) for m in merge.models]
        return models, str(merge.base_model) if merge.base_model is not None else models[0]
    from m2n2_lightning.lm.seeds import build_seeds, default_cache, preset, seed_names

    which = (cfg.lm.reduced, cfg.lm.seed_models_seed, cfg.lm.skills)
    settings, cache = preset(*which), default_cache(*which)
    build_seeds(cache, settings)
    base = str(merge.base_model) if merge.base_model is not None else str(cache / "base")
    return [str(cache / name) for name in seed_names(settings)[1:]], base


def load_base(source: str, dtype: str | None, model_class: str | None = None) -> tuple[torch.nn.Module, Any]:
    """The model that holds the candidates, in eval mode, and its tokenizer (None where it has none).

    `model_class` (`merge.model_class`): a class with `from_pretrained`, by its import path (e.g.
    diffusers.UNet2DConditionModel for the image-generation merge), loaded from `source`'s folder
    (a weights file's own folder) without a tokenizer; None: transformers' AutoModelForCausalLM.
    """
    if model_class is not None:
        path = Path(source)
        options = {} if dtype is None else {"torch_dtype": DTYPES[dtype]}
        return get_class(model_class).from_pretrained(str(path.parent if path.is_file() else path), **options).eval(), None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    options = {} if dtype is None else {"dtype": DTYPES[dtype]}
    model = AutoModelForCausalLM.from_pretrained(source, **options).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError):  # a model saved without tokenizer files (the toy seeds)
        tokenizer = None
    return model, tokenizer


def check_model_class(model_class: Any) -> None:
    """Refuse a `merge.model_class` that is not the import path of a class with `from_pretrained`."""
    if model_class is None:
        return
    try:
        found = get_class(str(model_class))
    except (ImportError, ValueError) as error:  # Hydra wraps the import error: its message says what is missing
        raise ValueError(f"merge.model_class={model_class!r} does not import as a class ({error})") from None
    if not callable(getattr(found, "from_pretrained", None)):
        raise ValueError(f"merge.model_class={model_class!r} has no from_pretrained: name a class that loads a saved model")


class StepIntervals(Callback):
    """Turns the evaluation intervals into training steps once the strategy is built (after `evolution.setup`).

    A merge's strategy is built by the callback from the seeds, so its candidates per step are
    known only then; `config.step_intervals` converts, as it does for the other experiments. (The
    budget itself is the callback's `max_forward_passes`, which stops fit exactly there.)
    """

    def __init__(self, cfg: Any, evolution: M2N2Callback, checkpoints: ModelCheckpoint) -> None:
        self.cfg, self.evolution, self.checkpoints = cfg, evolution, checkpoints

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        per_step = self.evolution.steps_per_batch * self.evolution.strategy.candidates_per_step
        steps = step_intervals(self.cfg, per_step)
        trainer.log_every_n_steps = steps["log_every_n_steps"]
        self.checkpoints._every_n_train_steps = steps["every_n_train_steps"]


class TaskFingerprint(Callback):
    """The tasks' content hash in the checkpoint; a resume with other task data is refused before any step."""

    def __init__(self, fingerprint: str, allow_changes: bool = False) -> None:
        self.fingerprint, self.allow_changes = fingerprint, allow_changes

    def state_dict(self) -> dict[str, Any]:
        return {"tasks": self.fingerprint}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("tasks") != self.fingerprint and not self.allow_changes:
            raise ValueError(
                "the checkpoint was made with other task data (examples, order or task settings differ): resume with "
                "the tasks it was made with, or allow_resume_changes=true to continue on the new ones"
            )


@dataclass
class MergeRun:
    """What train.py fits for a merge, and what it writes afterwards."""

    cfg: Any
    tasks: TaskSet
    model: torch.nn.Module
    module: LanguageModel
    evolution: M2N2Callback
    recorder: CurveRecorder
    callbacks: list[Callback]
    #: The base model's source: where the merged directory's tokenizer files come from.
    base: str

    def finish(self, trainer: L.Trainer, out: Path) -> dict[str, Any]:
        """Test the best member; on rank zero write summary.json, best_model/, curves.csv and recipe.yaml."""
        self.model.eval()
        final = self.recorder.final_point()
        test, train = dict(final.test), self.tasks.train_score(self.model)
        choices = HydraConfig.get().runtime.choices
        summary = {
            "strategy": choices.get("strategy"),
            "ablation": choices.get("ablation"),
            "experiment": choices.get("experiment"),
            "seed": self.cfg.seed,
            "forward_passes": final.forward_passes,
            "forward_passes_this_run": final.forward_passes - self.evolution.forward_passes_at_start,
            "resources": len(self.tasks.resources),
            "best_train_acc": train,
            "test_acc": self.tasks.headline(test),
            "test": test,
            "tasks": {name: type(task).__name__ for name, task in self.tasks.tasks.items()},
            "wall_seconds": final.wall_seconds,
            "forward_passes_per_second": final.forward_passes / final.wall_seconds if final.wall_seconds else None,
            "strategy_settings": settings_of(self.evolution.strategy),
            "output_dir": str(out),
        }
        if not trainer.is_global_zero:  # under DDP every rank holds the same result: rank zero writes it
            return summary
        save_merged(self.model, out / "best_model", evolution=self.evolution, tokenizer_from=[self.base], test_scores=test)
        OmegaConf.save(self.cfg.merge, out / "best_model" / "merge_recipe.yaml", resolve=True)
        write_curve(self.recorder.curve, out / "curves.csv")
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        shown = ", ".join(f"{name} {acc:.3f}" for name, acc in test.items())
        log.info("%s (seed %d): %d evaluations in %.1f s; best member: train score %.4f, test %s.",
                 summary["strategy"], self.cfg.seed, final.forward_passes, final.wall_seconds, train, shown)
        log.info("Outputs in %s: summary.json, best_model/, curves.csv, checkpoints/, logs/.", out)
        return summary


def build_merge(cfg: Any, checkpoints: ModelCheckpoint) -> MergeRun:
    """Read the tasks (checked), load the base model, and build the evolution callback over the seeds."""
    tasks = TaskSet(instantiate(cfg.merge.tasks, _convert_="all"), cfg.merge.batch_size).load()
    fingerprint = tasks.fingerprint()
    seeds, base = seed_sources(cfg)
    model, tokenizer = load_base(base, cfg.merge.dtype, cfg.merge.get("model_class"))
    tasks.bind(tokenizer)
    torch.set_num_threads(cfg.threads or auto_threads(FlatParams(model).num_params, len(tasks.resources)))
    evolution = M2N2Callback(
        strategy=instantiate(cfg.strategy), init_from=strategy_seeds(cfg, seeds, base), evaluate=tasks.evaluate,
        resources=tasks.loader(),
        model=model, chunk_size=cfg.module.chunk_size, block_size=cfg.module.block_size,
        steps_per_batch=cfg.module.steps_per_batch, max_forward_passes=cfg.forward_passes, heatmap=False,
        allow_resume_changes=cfg.allow_resume_changes,
        best_in_training_step=False,  # LanguageModel.training_step reads no weights: no reload of the best a step
    )
    recorder = CurveRecorder(evolution, tasks.test_sets(), tasks.test_accuracy, cfg.merge.test_every)
    callbacks = [evolution, StepIntervals(cfg, evolution, checkpoints), recorder,
                 TaskFingerprint(fingerprint, cfg.allow_resume_changes)]
    return MergeRun(cfg, tasks, model, LanguageModel(model), evolution, recorder, callbacks, base)


def resource_labels(tasks: dict[str, Any], batch_size: int = 32) -> list[int]:
    """MAP-Elites' descriptor labels for a merge: the index of each resource's task (conf/strategy/map_elites_merge.yaml)."""
    return TaskSet(tasks, batch_size).load().labels()

