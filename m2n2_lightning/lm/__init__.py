"""Small language models for the paper's LLM merge at laptop scale: skills, scoring and seed models."""

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
    "PromptDataset",
    "Skill",
    "char_fraction",
    "exact_match",
    "prompt_sets",
    "skill_dataset",
]
