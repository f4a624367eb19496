"""The recipe of a merge: what it was made from and how, in kilobytes; `rebuild` makes it again from the seeds.

A search over K seed models without mutation leaves its best member as a
*form* (`strategies/mixture.py`): breakpoints and one coefficient row over
the seeds per segment of the flat parameter vector. The recipe holds that
form (exact float64: JSON writes floats by `repr`, which reads back to the
same bits), the seeds' sources and SHA-256 digests, the parameter layout
(names and sizes in vector order) and dtype, the method with its settings,
the budget and the scores; `merging.rebuild` makes the merge again from it.
A strategy that keeps dense members has no form: its recipe (``cuts is
None``) only describes the merge, for the model card.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import socket
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from m2n2_lightning.checkpointing import remove_orphans
from m2n2_lightning.merging.seed_files import _HUB_ID, _SUFFIXES
from m2n2_lightning.strategies.mixture import Form

#: The file name of a recipe beside the weights.
RECIPE_FILE = "m2n2_recipe.json"
FORMAT = "m2n2-recipe/1"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Recipe:
    """A merge as data: seeds, layout, method, budget, scores and (when it has one) the best member's form.

    `cuts` (B ints, strictly increasing in (0, D)) and `table` (B + 1 rows of
    K floats) are the form; both None for a strategy without forms. `seeds`
    are the sources as given (None: an in-memory module), `digests` their
    SHA-256 (None: unknown). Every field is checked on construction.
    """

    seeds: tuple[str | None, ...]
    digests: tuple[str | None, ...]
    layout: tuple[tuple[str, int], ...]
    dtype: str | None
    method: str
    settings: dict[str, Any]
    forward_passes: int
    scores: dict[str, float]
    cuts: tuple[int, ...] | None = None
    table: tuple[tuple[float, ...], ...] | None = None
    architecture: str | None = None
    library_version: str = ""

    def __post_init__(self) -> None:
        k = len(self.seeds)
        _require(len(self.digests) == k, f"{k} seeds with {len(self.digests)} digests")
        for i, digest in enumerate(self.digests):
            _require(digest is None or bool(_SHA256.match(str(digest))), f"digest {i} is not a SHA-256 hex string")
        _require(len(self.layout) > 0, "an empty layout")
        names = [name for name, _ in self.layout]
        _require(len(set(names)) == len(names), "a layout naming a parameter twice")
        _require(all(isinstance(n, str) and type(c) is int and c > 0 for n, c in self.layout),
                 "a layout entry that is not [name, positive size]")
        _require(self.dtype is None or isinstance(getattr(torch, str(self.dtype), None), torch.dtype),
                 f"an unknown dtype {self.dtype!r}")
        _require(type(self.forward_passes) is int and self.forward_passes >= 0, "a negative or non-integer budget")
        _require(all(isinstance(v, float) and math.isfinite(v) for v in self.scores.values()),
                 "a score that is not a finite float")
        if self.cuts is None or self.table is None:
            _require(self.cuts is None and self.table is None, "breakpoints without coefficients or the reverse")
            return
        size = self.num_params
        _require(k >= 1, "a form over no seeds")
        bounds = (0, *self.cuts, size)
        _require(all(type(c) is int for c in self.cuts) and all(a < b for a, b in itertools.pairwise(bounds)),
                 f"breakpoints that are not strictly increasing integers in (0, {size})")
        _require(len(self.table) == len(self.cuts) + 1, f"{len(self.cuts)} breakpoints need {len(self.cuts) + 1} rows")
        _require(all(len(row) == k and all(isinstance(c, float) and math.isfinite(c) for c in row) for row in self.table),
                 f"a coefficient row that is not {k} finite floats (one per seed)")

    @property
    def num_params(self) -> int:
        """D, the length of the flat vector the layout spans."""
        return sum(numel for _, numel in self.layout)

    @property
    def form(self) -> Form | None:
        """The best member's form as tensors (int64 breakpoints, float64 table), or None."""
        if self.cuts is None or self.table is None:
            return None
        return torch.tensor(self.cuts, dtype=torch.long), torch.tensor(self.table, dtype=torch.float64)

    def to_dict(self) -> dict[str, Any]:
        """The JSON document of the recipe."""
        form = None if self.cuts is None else {"cuts": list(self.cuts), "coefficients": [list(r) for r in self.table]}
        return {
            "format": FORMAT, "library_version": self.library_version, "method": self.method,
            "settings": self.settings, "forward_passes": self.forward_passes, "scores": self.scores,
            "seeds": [{"source": s, "sha256": d} for s, d in zip(self.seeds, self.digests)],
            "architecture": self.architecture, "dtype": self.dtype,
            "layout": [[name, numel] for name, numel in self.layout], "form": form,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Recipe:
        """A recipe from its JSON document; ValueError naming what is wrong."""
        try:
            if data.get("format") != FORMAT:
                raise ValueError(f"format {data.get('format')!r}, expected {FORMAT!r}")
            form = data["form"]
            return cls(
                seeds=tuple(s["source"] for s in data["seeds"]), digests=tuple(s["sha256"] for s in data["seeds"]),
                layout=tuple((name, numel) for name, numel in data["layout"]), dtype=data["dtype"],
                method=str(data["method"]), settings=dict(data["settings"]), forward_passes=data["forward_passes"],
                scores=dict(data["scores"]), cuts=None if form is None else tuple(form["cuts"]),
                table=None if form is None else tuple(tuple(row) for row in form["coefficients"]),
                architecture=data["architecture"], library_version=str(data["library_version"]),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            detail = f"missing field {err}" if isinstance(err, KeyError) else str(err)
            raise ValueError(f"not an m2n2 recipe: {detail}") from err

    def save(self, path: str | os.PathLike) -> Path:
        """Write the recipe as JSON (beside `path`, then renamed over it, as checkpoints are); returns the path."""
        if self.cuts is None:
            raise ValueError(f"{self.method} keeps no form of its members: there is no recipe to save")
        path = Path(path)
        prefix = f".{path.name}.{socket.gethostname()}-"
        remove_orphans(path.parent, prefix)  # the partial files of writers that were killed
        partial = path.with_name(f"{prefix}{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
        try:
            partial.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Recipe:
        """Read a recipe file; ValueError naming the file and the problem when it is not one."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"recipe {path} does not exist (a merge directory holds it as {RECIPE_FILE})")
        try:
            data = json.loads(path.read_text())
            return cls.from_dict(data if isinstance(data, dict) else {"format": f"a JSON {type(data).__name__}"})
        except (ValueError, UnicodeDecodeError) as err:
            raise ValueError(f"recipe {path} is not usable: {err}") from err


def _require(condition: bool, problem: str) -> None:
    if not condition:
        raise ValueError(f"the recipe has {problem}")


def recipe_of(
    evolution: Any, model: nn.Module, test_scores: Mapping[str, float] | None = None, architecture: str | None = None
) -> Recipe:
    """The recipe of the search `evolution` (an `M2N2Callback` after fit) whose result `model` holds.

    `architecture` names `model`'s transformers class, for `rebuild_to`.
    The layout is named as in `model` (a transformers model inside the
    LightningModule the search ran on drops its ``model.`` prefix); the
    digests are those the callback computed while it read the seeds.
    """
    from m2n2_lightning import __version__

    engine = evolution.engine
    if engine is None:
        raise ValueError("the search has not run (M2N2Callback.engine is None): fit first, then save")
    strategy = engine.strategy
    searched = dict(engine.model.named_parameters())
    own = {id(p): name for name, p in model.named_parameters()}
    layout = tuple((own.get(id(searched[name])), numel) for name, numel in engine.flat.layout)
    if outside := [name for (mine, _), (name, _) in zip(layout, engine.flat.layout) if mine is None]:
        raise ValueError(f"{type(model).__name__} does not hold the parameters the search evolved: {outside[:5]}")
    params = dict(model.named_parameters())
    dtypes = {params[name].dtype for name, _ in layout}
    sources = list(evolution.init_from or [])
    digests = evolution.seed_digests or [None] * len(sources)
    scores, _ = strategy.population()
    best_form = getattr(strategy, "best_form", None)  # a user's Strategy subclass may not have it
    form = None if best_form is None else best_form()
    return Recipe(
        seeds=tuple(str(s) if isinstance(s, (str, os.PathLike)) else None for s in sources), digests=tuple(digests),
        layout=layout, dtype=str(dtypes.pop()).removeprefix("torch.") if len(dtypes) == 1 else None,
        method=type(strategy).__name__, settings=json.loads(json.dumps(strategy.settings(), default=str)),
        forward_passes=int(strategy.forward_passes),
        scores={f"resources ({scores.shape[1]} examples)": float(scores.mean(dim=1).max()), **checked_scores(test_scores)},
        cuts=None if form is None else tuple(form[0].tolist()),
        table=None if form is None else tuple(map(tuple, form[1].tolist())),
        architecture=architecture, library_version=__version__,
    )


def checked_scores(scores: Mapping[str, float] | None) -> dict[str, float]:
    """`scores` as {name: finite float}; ValueError naming the entry otherwise."""
    if scores is None:
        return {}
    if not isinstance(scores, Mapping):
        raise TypeError(f"test_scores must map a test set's name to its score, got {type(scores).__name__}")
    checked = {}
    for name, value in scores.items():
        try:
            checked[str(name)] = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"test_scores[{name!r}] is {value!r}, not a number") from None
        if not math.isfinite(checked[str(name)]):
            raise ValueError(f"test_scores[{name!r}] is {value!r}, not a finite number")
    return checked


def is_hub_id(source: str) -> bool:
    """A Hugging Face hub repository id ("org/name"), as `merging.seeds` reads it, rather than a local path."""
    return not Path(source).exists() and bool(_HUB_ID.match(source)) and not source.endswith(_SUFFIXES)
