"""The model card (README.md) of a merge: what it is made of, how, at what cost, how well it scores, how to rebuild it.

The YAML front matter is the hub's model-card metadata (`base_model`: the
seeds that are hub ids, `tags`, `library_name`), so the directory can be
pushed as it is; the body is written for a person.
"""

from __future__ import annotations

import bisect
import itertools
import json
from pathlib import Path

import yaml

from m2n2_lightning.merging.recipe import RECIPE_FILE, Recipe, is_hub_id

#: Segments of the form listed in the card (the recipe file holds them all).
SHOWN_SEGMENTS = 40
PAPER = "https://arxiv.org/abs/2508.16204"
LIBRARY = "https://github.com/m2n2-lightning/m2n2-lightning"


def model_card(recipe: Recipe, title: str) -> str:
    """The README.md text of the merge `recipe` describes, headed `title`."""
    metadata = {
        "base_model": [s for s in recipe.seeds if s is not None and is_hub_id(s)] or None,
        "tags": ["merge", "m2n2"],
        "library_name": "transformers" if recipe.architecture else None,
    }
    front = yaml.safe_dump({k: v for k, v in metadata.items() if v is not None}, sort_keys=False)
    seeds = "\n".join(
        f"| {i} | {_code(s) if s is not None else '(an in-memory module)'} | {_code(d) if d else 'not recorded'} |"
        for i, (s, d) in enumerate(zip(recipe.seeds, recipe.digests))
    )
    settings = "\n".join(f"| `{k}` | {_code(json.dumps(v))} |" for k, v in recipe.settings.items())
    scores = "\n".join(f"| {name} | {value:.4f} |" for name, value in recipe.scores.items())
    what = f"A {recipe.architecture}" if recipe.architecture else "A model"
    origin = f"merged from {len(recipe.seeds)} seed models" if recipe.seeds else "evolved from random members"
    return f"""---
{front}---

# {title}

{what} {origin} by {recipe.method} with [m2n2-lightning]({LIBRARY}) {recipe.library_version}, which evolves
an archive of models and keeps the best one, without gradients (M2N2: Abrantes, Lange and Tang, "Competition
and Attraction Improve Model Fusion", GECCO 2025, [arXiv 2508.16204]({PAPER})).

## Seeds

| # | source | SHA-256 of its tensors |
|---|---|---|
{seeds}

## Method

`{recipe.method}` with these settings:

| setting | value |
|---|---|
{settings}

## Budget

{recipe.forward_passes:,} evaluations (one evaluation: one candidate scored on every resource example).

## Scores

| examples | score of this merge |
|---|---|
{scores}

## Recipe

{_recipe_section(recipe)}
"""


def write_card(recipe: Recipe, folder: Path, title: str) -> Path:
    """Write `folder`/README.md for the merge `recipe` describes, headed `title`; returns its path."""
    path = folder / "README.md"
    path.write_text(model_card(recipe, title))
    return path


def _recipe_section(recipe: Recipe) -> str:
    """The form as a table of segments (where each starts, its coefficient per seed) and how to rebuild it."""
    if recipe.cuts is None or recipe.table is None:
        return (f"`{recipe.method}` keeps its members as dense parameter vectors, not as mixtures of the seeds, "
                "so this merge has no coefficient recipe: these weights are the only record of it.")
    starts = list(itertools.accumulate((numel for _, numel in recipe.layout), initial=0))
    rows = []
    for segment, (begin, row) in enumerate(zip((0, *recipe.cuts), recipe.table)):
        if segment == SHOWN_SEGMENTS:
            rows.append(f"| ... {len(recipe.table) - SHOWN_SEGMENTS} more in `{RECIPE_FILE}` |{' |' * len(row)}")
            break
        parameter = bisect.bisect_right(starts, begin) - 1
        name, element = recipe.layout[parameter][0], begin - starts[parameter]
        rows.append(f"| `{name}`[{element}] | {' | '.join(f'{c:.6g}' for c in row)} |")
    seeds = " | ".join(f"seed {i}" for i in range(len(recipe.seeds)))
    table = "\n".join(rows)
    return f"""The merge is, on each segment of the flat parameter vector ({recipe.num_params:,} values: the
parameters in the order of `{RECIPE_FILE}`'s layout, each flattened row-major), a weighted sum of the seeds,
computed in float32 (float64 for float64 seeds) and rounded once to {recipe.dtype or "each parameter's dtype"}.
{len(recipe.table)} segments; each starts at the parameter element shown and runs to the next one:

| segment starts at | {seeds} |
|---|{"---|" * len(recipe.seeds)}
{table}

`{RECIPE_FILE}` holds the exact coefficients. It rebuilds this merge from the seeds, bit for bit, without any
search (the seeds' digests are checked first):

```bash
python -m m2n2_lightning.merging.rebuild {RECIPE_FILE} rebuilt/ [--seeds SEED ...]
```

or from Python: `m2n2_lightning.merging.rebuild.rebuild_to("{RECIPE_FILE}", "rebuilt/")`, or
`rebuild(Recipe.load("{RECIPE_FILE}"), model)` for a model you built."""


def _code(text: str) -> str:
    return "`" + text.replace("`", "'").replace("|", "\\|") + "`"
