"""Small language models for the paper's LLM merge at laptop scale: skills, scoring, seed models and the merge runner."""

from m2n2_lightning.lm.merge import LanguageModel, MergeResult, merge_models
from m2n2_lightning.lm.tasks import (
    SKILLS,
    TOKENIZER,
    CharTokenizer,
    PromptDataset,
    Skill,
    char_fraction,
    exact_match,
    prompt_sets,
    skill_dataset,
)

__all__ = [
    "SKILLS",
    "TOKENIZER",
    "CharTokenizer",
    "LanguageModel",
    "MergeResult",
    "PromptDataset",
    "Skill",
    "char_fraction",
    "exact_match",
    "merge_models",
    "prompt_sets",
    "skill_dataset",
]
