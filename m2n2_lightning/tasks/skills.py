"""The package's toy skills (m2n2_lightning/lm: addition, reversal, copying) as one task of the task interface.

    merge.tasks.skills: {_target_: m2n2_lightning.tasks.skills.SkillTask, train: [add, rev], test: [add, rev, copy]}

The training prompts of the `train` skills are the resources (100 each, skill after skill); every
`test` skill is a test set of its own (200 prompts), named by the skill. The fitness is `score`
(exact match of greedy generation, or the fraction of answer characters right); the reported
scores are always exact match, so that runs with either fitness compare on one scale.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from m2n2_lightning.lm.tasks import SKILLS, char_fraction, exact_match, prompt_sets
from m2n2_lightning.tasks.base import TaskData

#: The fitness scores a skill task may use, by name.
SCORES = {"exact_match": exact_match, "char_fraction": char_fraction}


class SkillTask:
    """The toy skills' prompts; the model answers through the package's character tokenizer."""

    def __init__(self, train: Sequence[str] = ("add", "rev"), test: Sequence[str] = ("add", "rev", "copy"),
                 score: str = "exact_match") -> None:
        if score not in SCORES:
            raise ValueError(f"score must be one of {sorted(SCORES)}, got {score!r}")
        for key, names in (("train", train), ("test", test)):
            if isinstance(names, str) or any(name not in SKILLS for name in names):
                raise ValueError(f"{key} must be a list of skills from {sorted(SKILLS)}, got {names!r}")
        self.train, self.test, self.score_name = list(train), list(test), score

    def load(self, name: str) -> TaskData:
        """The train skills' training prompts, one skill after the other, and each test skill's test prompts."""
        parts = {skill: prompt_sets(SKILLS[skill])[0] for skill in self.train}
        train = [pair for part in parts.values() for pair in part]
        tests = {skill: prompt_sets(SKILLS[skill])[1] for skill in self.test}
        groups = [skill for skill, part in parts.items() for _ in part]
        return TaskData(train, tests, headline=[skill for skill in self.test if skill in self.train], groups=groups)

    def bind(self, tokenizer: Any) -> None:
        """The skills use the package's character tokenizer, whatever the base model has."""

    def score(self, model: nn.Module, examples: list[Any]) -> Tensor:
        """`score` of each (prompt, answer) pair's greedy completion."""
        return SCORES[self.score_name](model, _columns(examples))

    def test_score(self, model: nn.Module, examples: list[Any]) -> Tensor:
        """Exact match of each pair's greedy completion."""
        return exact_match(model, _columns(examples))


def _columns(examples: list[Any]) -> tuple[list[str], list[str]]:
    return [prompt for prompt, _ in examples], [answer for _, answer in examples]
