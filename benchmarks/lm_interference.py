"""Why merges of the LM fine-tunes lose skills: their task vectors' interference and which test prompts each model solves.

For one setting's seeds (`--setting lm_merge` or `lm_merge4`, train.py's experiment; the
package's seed build of `--seed`), with task vectors tau_k = theta_k - theta_base:

- the size of each fine-tune (||tau_k|| / ||theta_base||) and the cosine between every pair
  of task vectors, over the whole vector and per layer group (embeddings, each layer, the
  rest): near-orthogonal task vectors add without cancelling, aligned or opposed ones do not;
- TIES' sign conflict: among the coordinates where some tau_k is in its top 20% by
  magnitude, the fraction where the fine-tunes' signs disagree;
- per skill, the test prompts each model solves (greedy exact match) and, for every model
  given with `--model name=dir` (e.g. a run's best_model/ or a mergekit output), how many
  of the prompts that skill's own fine-tune solves it keeps.

    python benchmarks/lm_interference.py --setting lm_merge4 --seed 0 \\
        --model m2n2=outputs/.../best_model --out benchmarks/results/lm_merge4/interference_seed0.md
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_runs import compose_train_config  # noqa: E402

from m2n2_lightning.lm.tasks import SKILLS, exact_match, prompt_sets  # noqa: E402
from m2n2_lightning.merge_run import seed_sources  # noqa: E402
from m2n2_lightning.strategies.layer_groups import group_parameters  # noqa: E402

#: TIES' trim: a coordinate takes part in the sign vote where some task vector is in its top `TOP` by magnitude.
TOP = 0.2


def task_vectors(base: torch.nn.Module, tuned: Sequence[torch.nn.Module]) -> dict[str, torch.Tensor]:
    """name -> [K, numel] float64 task vectors of every parameter."""
    theta = dict(base.named_parameters())
    return {name: torch.stack([dict(m.named_parameters())[name].detach().double().flatten() - p.detach().double().flatten()
                               for m in tuned]) for name, p in theta.items()}


def cosines(vectors: torch.Tensor) -> dict[tuple[int, int], float]:
    """Cosine of every pair of rows of [K, n]."""
    return {(i, j): float(torch.nn.functional.cosine_similarity(vectors[i], vectors[j], dim=0))
            for i, j in itertools.combinations(range(len(vectors)), 2)}


def sign_conflict(vectors: torch.Tensor) -> float:
    """Among coordinates where some row is in its own top TOP by magnitude, the fraction with rows of both signs
    there (counting only rows in their top TOP at that coordinate, as TIES' trimmed vote does)."""
    magnitude = vectors.abs()
    kept = magnitude >= magnitude.kthvalue(max(1, round((1 - TOP) * vectors.shape[1])), dim=1, keepdim=True).values
    signs = torch.sign(vectors) * kept
    voted = kept.any(0)
    both = (signs > 0).any(0) & (signs < 0).any(0)
    return float(both[voted].double().mean())


def solved(model: torch.nn.Module, skill: str) -> set[int]:
    """Indices of the skill's test prompts the model answers exactly."""
    pairs = prompt_sets(SKILLS[skill])[1]
    scores = exact_match(model, ([p for p, _ in pairs], [a for _, a in pairs]))
    return {i for i, s in enumerate(scores.tolist()) if s == 1.0}


def report(setting: str, seed: int, models: dict[str, str]) -> str:
    cfg = compose_train_config([f"experiment={setting}", f"seed={seed}"])
    seeds, base_dir = seed_sources(cfg)
    load = lambda path: AutoModelForCausalLM.from_pretrained(path).eval()  # noqa: E731
    base, tuned = load(base_dir), [load(path) for path in seeds]
    trained = list(cfg.merge.tasks.skills.train)
    tested = list(cfg.merge.tasks.skills.test)
    vectors = task_vectors(base, tuned)
    whole = torch.cat(list(vectors.values()), dim=1)
    base_norm = float(torch.cat([p.detach().double().flatten() for p in base.parameters()]).norm())
    names = [f"{k} ({skill})" for k, skill in zip("ABCD", trained)]
    lines = [f"# Task-vector interference and solved prompts: {setting}, seed build {seed}", "",
             "| fine-tune | own skill | ||tau|| / ||theta_base|| |", "|---|---|---|"]
    lines += [f"| {n} | {skill} | {float(whole[k].norm()) / base_norm:.4f} |" for k, (n, skill) in enumerate(zip(names, trained))]
    group_names, owner = group_parameters([(name, v.shape[1]) for name, v in vectors.items()], "layers")
    groups: dict[str, list[torch.Tensor]] = {}
    for group, v in zip(owner, vectors.values()):
        groups.setdefault(group_names[group], []).append(v)
    parts = {"whole": whole, **{g: torch.cat(vs, dim=1) for g, vs in groups.items()}}
    pairs = list(itertools.combinations(range(len(tuned)), 2))
    lines += ["", "Cosine between task vectors, and TIES' sign conflict (top 20% by magnitude):", "",
              "| part | " + " | ".join(f"cos {'ABCD'[i]}{'ABCD'[j]}" for i, j in pairs) + " | sign conflict |",
              "|---" * (len(pairs) + 2) + "|"]
    for part, v in parts.items():
        cos = cosines(v)
        lines.append(f"| {part} | " + " | ".join(f"{cos[p]:+.3f}" for p in pairs) + f" | {sign_conflict(v):.3f} |")
    solved_by = {n: {skill: solved(m, skill) for skill in tested} for n, m in zip(names, tuned)}
    solved_by["base"] = {skill: solved(base, skill) for skill in tested}
    for name, path in models.items():
        merged = load(path)
        solved_by[name] = {skill: solved(merged, skill) for skill in tested}
    own = {skill: solved_by[n][skill] for n, skill in zip(names, trained)}
    n_test = len(prompt_sets(SKILLS[tested[0]])[1])
    lines += ["", f"Test prompts solved per skill (of {n_test}); in brackets, how many of those the skill's own "
              "fine-tune solves are kept:", "",
              "| model | " + " | ".join(tested) + " |", "|---" * (len(tested) + 1) + "|"]
    for name, per_skill in solved_by.items():
        cells = [f"{len(s)}" + (f" ({len(s & own[skill])}/{len(own[skill])})" if skill in own else "")
                 for skill, s in per_skill.items()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", default="lm_merge4")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", action="append", default=[], metavar="NAME=DIR", help="a merged model to compare")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    models = dict(item.split("=", 1) for item in args.model)
    torch.set_num_threads(1)
    text = report(args.setting, args.seed, models)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
