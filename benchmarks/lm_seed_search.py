"""Search for a four-skill seed setting that standard merges cannot solve (issue #22).

Builds one base and four fine-tunes (m2n2_lightning.lm.seeds) under the given settings, then scores
each fine-tune on its own skill and two standard merges of the four on all four test sets: the plain
average and task arithmetic, base + lambda * sum of the task vectors. Prints one markdown row
(setting, own-skill accuracies, their mean, the merges' mean skill accuracy, the drop of the best
merge from that mean) and appends the full record to --log as a JSON line. Bases are cached in
--bases by their settings, so fine-tune settings can be scanned on one base. With --built, scores
the seeds of a finished build instead.

    OMP_NUM_THREADS=1 python benchmarks/lm_seed_search.py --echo 1.0 --ft-lr 1e-3 --ft-steps 400
    OMP_NUM_THREADS=1 python benchmarks/lm_seed_search.py --built ~/.cache/m2n2-lightning/lm/full4_seed1
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from m2n2_lightning.lm import seeds
from m2n2_lightning.lm.tasks import SKILLS, Skill, accuracy, prompt_sets

LAMBDAS = (0.25, 0.5, 0.75, 1.0)


def mixture(skills: tuple[Skill, ...], echo: float, copy_weight: float) -> tuple[tuple[Skill, float], ...]:
    """Copy at `copy_weight`, the rest split evenly over the skills answered by their echo `echo` of the time."""
    share = (1.0 - copy_weight) / len(skills)
    return ((SKILLS["copy"], copy_weight), *((replace(s, name=f"{s.name}_echo", echo=echo), share) for s in skills))


def base_model(settings: seeds.SeedSettings, root: Path) -> torch.nn.Module:
    """The pre-trained base of `settings`, from `root` when built before."""
    key = json.dumps({k: v for k, v in asdict(settings).items() if k.startswith(("base", "n_", "d_", "seed", "batch"))},
                     sort_keys=True, default=str)
    path = root / hashlib.sha1(key.encode()).hexdigest()[:12]
    if (path / "config.json").is_file():
        return AutoModelForCausalLM.from_pretrained(path).eval()
    model = seeds.make_model(settings)
    seeds.train(model, settings.base_mix, settings.base_steps, settings.base_lr, settings.batch_size, settings.seed)
    model.save_pretrained(path)
    return model


def merged(base: torch.nn.Module, tunes: list[torch.nn.Module], weights: list[float], scale: float) -> torch.nn.Module:
    """base + scale * sum_i weights_i * (tune_i - base), on a copy of the base."""
    out = AutoModelForCausalLM.from_config(base.config).eval()
    tuned = [t.state_dict() for t in tunes]
    state = {}
    for key, b in base.state_dict().items():
        state[key] = b + scale * sum(w * (t[key] - b) for w, t in zip(weights, tuned))
    out.load_state_dict(state)
    return out


def skill_scores(model: torch.nn.Module, skills: tuple[Skill, ...]) -> dict[str, float]:
    return {s.name: accuracy(model, prompt_sets(s)[1]) for s in skills}


def evaluate(base: torch.nn.Module, tunes: list[torch.nn.Module], skills: tuple[Skill, ...]) -> dict:
    """Each fine-tune on its own skill, and the base, the average and task arithmetic on every skill."""
    own = {s.name: accuracy(t, prompt_sets(s)[1]) for s, t in zip(skills, tunes)}
    ceiling = sum(own.values()) / len(own)
    ones = [1.0] * len(tunes)
    results = {"base": skill_scores(base, skills), "average": skill_scores(merged(base, tunes, ones, 1 / len(tunes)), skills)}
    for lam in LAMBDAS:
        results[f"ta{lam}"] = skill_scores(merged(base, tunes, ones, lam), skills)
    means = {name: sum(r.values()) / len(r) for name, r in results.items()}
    best = max(m for name, m in means.items() if name != "base")
    return {"own": own, "ceiling": ceiling, "merges": results, "means": means, "best_merge": best,
            "drop": ceiling - best, "ratios": [seeds.task_vector_ratio(t, base) for t in tunes]}


def row(setting: str, record: dict, skills: tuple[Skill, ...]) -> str:
    """The markdown row of one setting, and each merge's accuracies by skill."""
    rounds = record.get("rounds", {})
    own = " ".join(f"{record['own'][s.name]:.2f}" + (f"({rounds[s.name]})" if s.name in rounds else "") for s in skills)
    means = record["means"]
    ta = " ".join(f"{means[f'ta{lam}']:.2f}" for lam in LAMBDAS)
    head = f"| {setting} | {own} | {record['ceiling']:.3f} | {means['base']:.2f} | {means['average']:.3f} | {ta} |"
    lines = [f"{head} {record['drop']:.3f} |"]
    lines += [f"{name} {({k: round(v, 3) for k, v in r.items()})}" for name, r in record["merges"].items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--built", type=Path, default=None,
                        help="score the seeds of this build (m2n2_lightning.lm.seeds) instead of building")
    parser.add_argument("--skills", default="add,rev,sort,shift")
    parser.add_argument("--echo", type=float, default=0.8)
    parser.add_argument("--copy-weight", type=float, default=0.2)
    parser.add_argument("--base-steps", type=int, default=6000)
    parser.add_argument("--base-lr", type=float, default=3e-3)
    parser.add_argument("--ft-lr", type=float, default=3e-4)
    parser.add_argument("--ft-steps", type=int, default=400)
    parser.add_argument("--ft-target", type=float, default=0.9)
    parser.add_argument("--ft-rounds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bases", type=Path, default=Path("/tmp/lm4_search/bases"))
    parser.add_argument("--log", type=Path, default=Path("/tmp/lm4_search/log.jsonl"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    if args.built is not None:
        build = json.loads((args.built / "build.json").read_text())
        skills = tuple(SKILLS[name] for name in build["settings"]["skills"] if name != "copy")
        models = seeds.load_seeds(args.built)
        record = evaluate(models.pop("base"), list(models.values()), skills)
        setting = f"{args.built.name} (build.json settings)"
    else:
        skills = tuple(SKILLS[name] for name in args.skills.split(","))
        settings = replace(
            seeds.preset(seed=args.seed, skills=4), base_mix=mixture(skills, args.echo, args.copy_weight),
            base_steps=args.base_steps, base_lr=args.base_lr, ft_lr=args.ft_lr, ft_steps=args.ft_steps,
            ft_target=args.ft_target, ft_max_rounds=args.ft_rounds, fine_tunes=skills,
        )
        base = base_model(settings, args.bases)
        tunes, rounds = [], {}
        for index, skill in enumerate(skills):
            model, rounds[skill.name], _ = seeds.fine_tune(base, skill, settings, settings.seed + 1 + index)
            tunes.append(model.eval())
        record = evaluate(base, tunes, skills) | {"rounds": rounds}
        setting = (f"echo {args.echo}, base {args.base_steps}@{args.base_lr:g}, ft {args.ft_steps}@{args.ft_lr:g}"
                   f" x<={args.ft_rounds} to {args.ft_target}, seed {args.seed}")
    record |= {"args": {k: str(v) for k, v in vars(args).items()}, "seconds": time.perf_counter() - start}
    args.log.parent.mkdir(parents=True, exist_ok=True)
    with args.log.open("a") as f:
        f.write(json.dumps(record) + "\n")
    print(row(setting, record, skills))
    print(f"{record['seconds']:.0f} s")


if __name__ == "__main__":
    main()
