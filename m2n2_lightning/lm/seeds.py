"""The seed models of the small language-model merge: one pre-trained base and N fine-tunes of it.

A stand-in for Llama-2-7B and its fine-tunes WizardMath and AgentEvol
(docs/ALGORITHM.md, "Beyond the digits"): a tiny `LlamaForCausalLM` built from a config
is pre-trained on a mixture of tasks (BASE_MIX), then fine-tuned gently, once
on skill A and once on skill B (tasks.py), so that both fine-tunes stay near
the base and their task vectors can be merged. The four-skill presets (`skills=4`,
MIX4) fine-tune one base on four skills instead, in a setting where the standard
merges of the four fall well short of the fine-tunes (issue #22;
benchmarks/results/lm_merge4/seed_search.md). Everything is deterministic
from the seed and cached on disk with `save_pretrained`.

    python -m m2n2_lightning.lm.seeds [--out <dir>] [--reduced] [--skills 2|4] [--seed N]

`seed_models()` returns the base and the fine-tunes, built on first use into `default_cache()`.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import sys
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from m2n2_lightning.lm.gradient import adamw_with_schedule, answer_step
from m2n2_lightning.lm.tasks import (
    SKILL_A,
    SKILL_B,
    SKILLS,
    TOKENIZER,
    Skill,
    accuracy,
    held_out_prompts,
    prompt_sets,
)

#: The two-skill presets' models; `seed_names` gives any preset's.
SEED_NAMES = ("base", "skill_a", "skill_b")

#: Pre-training mixture: the third skill (copy), and skills A and B in their own formats but
#: answered by the echo of the question 80% of the time, so that the base holds both skills
#: without producing them greedily; a fine-tune then only has to tip the balance.
BASE_MIX: tuple[tuple[Skill, float], ...] = (
    (SKILLS["copy"], 0.3),
    (replace(SKILL_A, name="add_echo", echo=0.8), 0.35),
    (replace(SKILL_B, name="rev_echo", echo=0.8), 0.35),
)

#: The four-skill presets' fine-tune skills, in the order of skill_a..skill_d.
SKILLS4 = tuple(SKILLS[name] for name in ("add", "rev", "sort", "shift"))

#: The four-skill pre-training mixture: copy, and the four skills each answered by the echo of the question
#: 80% of the time, fine-tuned gently as the two skills are. The four task vectors then collide: the best of
#: the average and task arithmetic loses 22 and 24 points of mean skill accuracy against the fine-tunes on
#: seeds 0 and 2 (but 9 on seed 1), mostly on addition, whose fine-tune moves furthest
#: (benchmarks/results/lm_merge4/seed_search.md). A base that never sees a right answer (echo 1.0) is too
#: hard: its addition fine-tune stalls below 0.8 and every merge scores 0.
MIX4: tuple[tuple[Skill, float], ...] = (
    (SKILLS["copy"], 0.2),
    *((replace(skill, name=f"{skill.name}_echo", echo=0.8), 0.2) for skill in SKILLS4),
)


@dataclass(frozen=True)
class SeedSettings:
    """Everything the seed models depend on; a change of any field rebuilds the cache.

    A fine-tune runs rounds of `ft_steps` at `ft_lr` until its skill's
    training prompts reach `ft_target` exact match, at most `ft_max_rounds`.
    `fine_tunes` are the skills of skill_a, skill_b, ... in order.
    """

    seed: int = 0
    n_layer: int = 2
    d_model: int = 64
    n_head: int = 4
    base_mix: tuple[tuple[Skill, float], ...] = BASE_MIX
    base_steps: int = 6000
    base_lr: float = 3e-3
    ft_steps: int = 400
    ft_lr: float = 3e-4
    ft_target: float = 0.9
    ft_max_rounds: int = 5
    batch_size: int = 64
    fine_tunes: tuple[Skill, ...] = (SKILL_A, SKILL_B)

    def __post_init__(self) -> None:
        if not 1 <= len(self.fine_tunes) <= 26:
            raise ValueError(f"fine_tunes must hold 1 to 26 skills, got {len(self.fine_tunes)}")


_REDUCED = {"base_steps": 500, "ft_steps": 50, "ft_target": 0.0, "ft_max_rounds": 1}
_FOUR = {"base_mix": MIX4, "fine_tunes": SKILLS4}
#: The presets by (reduced, number of skills).
PRESETS = {
    (False, 2): SeedSettings(),
    # CI's quick build: one round and no target (its seeds are for plumbing, not for the skills).
    (True, 2): SeedSettings(**_REDUCED),
    (False, 4): SeedSettings(**_FOUR),
    (True, 4): SeedSettings(**_FOUR, **_REDUCED),
}


def seed_names(settings: SeedSettings) -> tuple[str, ...]:
    """"base" and one "skill_<letter>" per fine-tune: skill_a, skill_b, ..."""
    return ("base", *(f"skill_{chr(ord('a') + i)}" for i in range(len(settings.fine_tunes))))


def measured_skills(settings: SeedSettings) -> list[Skill]:
    """The skills a build is scored on: the fine-tunes' and then the mixture's own skills (copy)."""
    skills = list(settings.fine_tunes)
    skills += [s for s, _ in settings.base_mix if SKILLS.get(s.name) == s and s not in skills]
    return skills


def make_model(settings: SeedSettings) -> LlamaForCausalLM:
    """A fresh tiny Llama with the settings' shape, initialised from the seed."""
    config = LlamaConfig(
        vocab_size=TOKENIZER.vocab_size,
        hidden_size=settings.d_model,
        intermediate_size=4 * settings.d_model,
        num_hidden_layers=settings.n_layer,
        num_attention_heads=settings.n_head,
        num_key_value_heads=settings.n_head,
        max_position_embeddings=32,
        pad_token_id=TOKENIZER.pad_id,
        bos_token_id=TOKENIZER.bos_id,
        eos_token_id=TOKENIZER.eos_id,
    )
    torch.manual_seed(settings.seed)
    return LlamaForCausalLM(config)


def train(
    model: torch.nn.Module, mix: tuple[tuple[Skill, float], ...], steps: int, lr: float, batch_size: int, seed: int,
    progress: tqdm | None = None,
) -> None:
    """AdamW on the answers of fresh samples from the weighted mixture (never a held-out prompt); `progress`
    counts the steps.

    The learning rate warms up over the first 5% of the steps and decays to
    zero with a cosine, so the model ends at rest rather than mid-step.
    """
    rng = random.Random(seed)
    held_out = held_out_prompts()
    skills, weights = zip(*mix)
    optimizer, schedule = adamw_with_schedule(model, lr, steps)
    model.train()
    for _ in range(steps):
        pairs = []
        while len(pairs) < batch_size:
            prompt, answer = rng.choices(skills, weights)[0].sample(rng)
            if prompt not in held_out:
                pairs.append((prompt, answer))
        answer_step(model, optimizer, schedule, TOKENIZER.batch_train(*zip(*pairs)))
        if progress is not None:
            progress.update()
    model.eval()


def measure(model: torch.nn.Module, skills: list[Skill]) -> dict[str, float]:
    """Test-set exact match of each skill."""
    return {skill.name: accuracy(model, prompt_sets(skill)[1]) for skill in skills}


def task_vector_ratio(tuned: torch.nn.Module, base: torch.nn.Module) -> float:
    """||theta_tuned - theta_base|| / ||theta_base||: how far a fine-tune moved."""
    diff = sum(float((a - b).detach().pow(2).sum()) for a, b in zip(tuned.parameters(), base.parameters()))
    norm = sum(float(b.detach().pow(2).sum()) for b in base.parameters())
    return math.sqrt(diff / norm)


def _settings_json(settings: SeedSettings) -> dict:
    """The settings and the measured skills' definitions (the fine-tunes' among them), as they read back from
    JSON: the cache key. The two-skill presets' key is the one they had before `fine_tunes` existed."""
    fields = asdict(settings)
    del fields["fine_tunes"]
    skills = {skill.name: asdict(skill) for skill in measured_skills(settings)}
    return json.loads(json.dumps({**fields, "skills": skills}))


def fine_tune(
    base: torch.nn.Module, skill: Skill, settings: SeedSettings, seed: int, progress: tqdm | None = None
) -> tuple[torch.nn.Module, int, float]:
    """A copy of `base` fine-tuned on `skill` in rounds of `ft_steps` until it reaches `ft_target`.

    The stop is measured on the skill's training prompts (the merge's
    resources, which no seed model trains on), never on its test prompts.
    One fixed number of steps is not enough: the point where a gentle
    fine-tune tips the base from echoing to answering moves with the base
    (and with the machine's floating-point order), so a fixed count gave
    0.24-0.99 on the same skill across seeds. Returns the model, the rounds
    run and the final training-prompt accuracy.
    """
    model = copy.deepcopy(base)
    train_pairs = prompt_sets(skill)[0]
    for rounds in range(1, settings.ft_max_rounds + 1):
        if rounds > 1 and progress is not None:  # another round: the bar's total (and ETA) grows by it
            progress.total += settings.ft_steps
        train(model, ((skill, 1.0),), settings.ft_steps, settings.ft_lr, settings.batch_size,
              seed + 1000 * (rounds - 1), progress)
        reached = accuracy(model, train_pairs)
        if reached >= settings.ft_target:
            break
    return model, rounds, reached


def train_seeds(settings: SeedSettings) -> tuple[dict[str, torch.nn.Module], dict[str, dict]]:
    """Pre-train the base, then fine-tune it on each skill; the models keyed by `seed_names` and each fine-tune's
    rounds.

    Runs on one thread (restored afterwards): the build is bit-for-bit
    reproducible only with a fixed thread count.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    names = seed_names(settings)
    progress = tqdm(total=settings.base_steps + len(settings.fine_tunes) * settings.ft_steps,
                    desc="building the seed models (once)",
                    unit="step", file=sys.stdout, dynamic_ncols=True)
    try:
        base = make_model(settings)
        train(base, settings.base_mix, settings.base_steps, settings.base_lr, settings.batch_size, settings.seed,
              progress)
        models, rounds = {"base": base}, {}
        for index, (name, skill) in enumerate(zip(names[1:], settings.fine_tunes)):
            models[name], n, reached = fine_tune(base, skill, settings, settings.seed + 1 + index, progress)
            rounds[name] = {"rounds": n, "train_accuracy": reached}
            if reached < settings.ft_target:
                warnings.warn(
                    f"{name} (seed {settings.seed}) reached {reached:.2f} exact match on its training prompts after "
                    f"{n} round{'s' if n > 1 else ''} of {settings.ft_steps} steps, short of ft_target={settings.ft_target}: this base "
                    "holds too little of the skill for a gentle fine-tune; build another --seed",
                    stacklevel=2,
                )
    finally:
        progress.close()
        torch.set_num_threads(threads)
    return models, rounds


def build_seeds(out: str | Path, settings: SeedSettings) -> dict:
    """Build (or load from `out`) the base and the fine-tunes; returns the build record.

    `out` holds base/, skill_a/, skill_b/, ... (safetensors) and build.json with
    the settings, accuracies, task-vector ratios and build time; build.json is
    written last, so an interrupted build is redone. A second call with the
    same settings only reads build.json.
    """
    out = Path(out)
    record_path = out / "build.json"
    names = seed_names(settings)
    if record_path.is_file() and all((out / n / "config.json").is_file() for n in names):
        record = json.loads(record_path.read_text())
        if record["settings"] == _settings_json(settings):
            return record
    record_path.unlink(missing_ok=True)
    start = time.perf_counter()
    models, rounds = train_seeds(settings)
    build_s = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    for name, model in models.items():
        model.save_pretrained(out / name)
    record = {
        "settings": _settings_json(settings),
        "accuracy": {name: measure(model, measured_skills(settings)) for name, model in models.items()},
        "task_vector_ratio": {name: task_vector_ratio(models[name], models["base"]) for name in names[1:]},
        "fine_tune": rounds,
        "build_seconds": build_s,
    }
    record_path.write_text(json.dumps(record, indent=2))
    return record


def built_names(out: str | Path) -> list[str]:
    """The models of the build in `out`, base first, as its build.json lists them."""
    return list(json.loads((Path(out) / "build.json").read_text())["accuracy"])


def load_seeds(out: str | Path) -> dict[str, torch.nn.Module]:
    """The saved base and fine-tunes, in eval mode, keyed by their names (`seed_names`)."""
    return {name: AutoModelForCausalLM.from_pretrained(Path(out) / name).eval() for name in built_names(out)}


def _check_skills(skills: int) -> None:
    if skills not in (2, 4):
        raise ValueError(f"the presets have 2 or 4 skills, got skills={skills!r}")


def preset(reduced: bool = False, seed: int = 0, skills: int = 2) -> SeedSettings:
    """The full or reduced (CI) settings of the two- or four-skill seeds, with the given seed."""
    _check_skills(skills)
    return replace(PRESETS[(reduced, skills)], seed=seed)


def default_cache(reduced: bool = False, seed: int = 0, skills: int = 2) -> Path:
    """$M2N2_LM_CACHE (else ~/.cache/m2n2-lightning/lm) / <preset>_seed<N>: outside the repository.

    <preset> is full or reduced for two skills, full4 or reduced4 for four.
    """
    _check_skills(skills)
    root = Path(os.environ.get("M2N2_LM_CACHE", Path.home() / ".cache" / "m2n2-lightning" / "lm"))
    return root / f"{'reduced' if reduced else 'full'}{'' if skills == 2 else skills}_seed{seed}"


def seed_models(
    reduced: bool = False, seed: int = 0, out: str | Path | None = None, skills: int = 2
) -> dict[str, torch.nn.Module]:
    """The preset's base and fine-tunes, built on first use into `out` (default `default_cache`)."""
    out = Path(out) if out is not None else default_cache(reduced, seed, skills)
    build_seeds(out, preset(reduced, seed, skills))
    return load_seeds(out)


def format_table(record: dict) -> str:
    """The accuracies as a markdown table: one row per model, one column per skill's test set, then each
    fine-tune's task-vector ratio and rounds."""
    names = list(next(iter(record["accuracy"].values())))
    header = "| model | " + " | ".join(names) + " | task vector / base | fine-tune rounds |"
    lines = [header, "|---" * (len(names) + 3) + "|"]
    for model, accs in record["accuracy"].items():
        ratio = record["task_vector_ratio"].get(model)
        rounds = record.get("fine_tune", {}).get(model, {}).get("rounds")
        cells = [f"{accs[n]:.3f}" for n in names]
        cells += [f"{ratio:.4f}" if ratio is not None else "-", str(rounds) if rounds is not None else "-"]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="cache folder for base/, skill_a/, skill_b/, ... and build.json")
    parser.add_argument("--reduced", action="store_true", help="the small CI preset")
    parser.add_argument("--skills", type=int, default=2, choices=(2, 4), help="two fine-tunes (add, rev) or four")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out) if args.out else default_cache(args.reduced, args.seed, args.skills)
    start = time.perf_counter()
    record = build_seeds(out, preset(args.reduced, args.seed, args.skills))
    print(format_table(record))
    print(f"{out}: built in {record['build_seconds']:.1f} s; this call {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
