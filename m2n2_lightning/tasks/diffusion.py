"""The image-generation merge's fitness (section 4.3) as a task: a candidate U-Net generates each caption's image.

    merge.tasks.images: {_target_: m2n2_lightning.tasks.diffusion.DiffusionTask, preset: full, cache: <dir>}

The resources are captions of images no seed trained on, in the second language (the paper's
Japanese COCO captions); the test sets are other images' captions in each language. A candidate
generates every caption's image from a fixed noise (the image's own seed) with DDIM in `steps`
steps through the kept text encoder (the bilingual seed's, as the paper keeps JSDXL's), and
scores its similarity to the caption's real image on the scorer's features, in [0, 1]
(m2n2_lightning/diffusion/scorer.py). The seeds and the scorer are built into `cache` on first
use, when the task is loaded (before the merge reads the seeds from there).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from m2n2_lightning.tasks.base import TaskData


class DiffusionTask:
    """Captions of the digits scored by the similarity of a candidate U-Net's image to the real one."""

    def __init__(self, cache: str | None = None, preset: str = "full", seed_models_seed: int = 0, language: str = "ja",
                 resources: int = 60, tests: int = 180, steps: int = 10, text_encoder: str = "bilingual") -> None:
        from m2n2_lightning.diffusion import data
        from m2n2_lightning.diffusion.seeds import PRESETS, default_cache

        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
        if language not in data.LANGUAGES:
            raise ValueError(f"language must be one of {data.LANGUAGES}, got {language!r}")
        if text_encoder not in ("bilingual", "base"):
            raise ValueError(f"text_encoder must be bilingual (the kept one) or base, got {text_encoder!r}")
        for key, value, most in (("resources", resources, len(data.RESOURCE_IMAGES)), ("tests", tests, len(data.TEST_IMAGES)),
                                 ("steps", steps, 1000)):
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
                raise ValueError(f"{key} must be an integer in [1, {most}], got {value!r}")
        self.cache = str(cache) if cache is not None else str(default_cache(preset, seed_models_seed))
        self.preset, self.seed_models_seed, self.language = preset, seed_models_seed, language
        self.resources, self.tests, self.steps, self.text_encoder = resources, tests, steps, text_encoder
        self._states: dict[str, Tensor] = {}

    def load(self, name: str) -> TaskData:
        """Build the seeds and scorer if not cached; the resource captions and a test set per language ("en", "ja")."""
        from m2n2_lightning.diffusion import data
        from m2n2_lightning.diffusion.scorer import ImageEncoder
        from m2n2_lightning.diffusion.seeds import (
            build_seeds,
            load_text_encoder,
            preset,
            scorer_dir,
        )

        build_seeds(self.cache, preset(self.preset, self.seed_models_seed))
        self._encoder = load_text_encoder(self.cache, self.text_encoder)
        self._scorer = ImageEncoder.load(scorer_dir(self.cache))
        self._images = data.images()
        train = data.examples(data.RESOURCE_IMAGES[: self.resources], self.language)
        tests = {lang: data.examples(data.TEST_IMAGES[: self.tests], lang) for lang in data.LANGUAGES}
        return TaskData(train, tests, headline=list(tests))

    def bind(self, tokenizer: Any) -> None:
        """The captions go through the task's own text encoder, whatever the base model has."""

    def generate(self, unet: nn.Module, examples: list[dict]) -> Tensor:
        """The images [B, 1, 8, 8] the U-Net generates for the examples' captions, each from its image's noise."""
        from m2n2_lightning.diffusion.sampling import generate
        from m2n2_lightning.diffusion.text import encode

        missing = [e["caption"] for e in examples if e["caption"] not in self._states]
        if missing:  # the text encoder is fixed: each caption is encoded once
            with torch.no_grad():
                self._states.update(zip(missing, encode(self._encoder, missing)))
        states = torch.stack([self._states[e["caption"]] for e in examples])
        return generate(unet, states, [e["image"] for e in examples], self.steps)

    @property
    def scorer(self) -> nn.Module:
        """The image encoder that plays CLIP's role (after `load`)."""
        return self._scorer

    def real(self, examples: list[dict]) -> Tensor:
        """The real images [B, 1, 8, 8] of the examples' captions (after `load`)."""
        return self._images[[e["image"] for e in examples]]

    def score(self, model: nn.Module, examples: list[dict]) -> Tensor:
        """[B] normalised similarity in [0, 1] of each generated image to its caption's real image."""
        from m2n2_lightning.diffusion.scorer import similarity

        return similarity(self._scorer, self.generate(model, examples), self.real(examples))

    def test_score(self, model: nn.Module, examples: list[dict]) -> Tensor:
        """The same similarity, on the test captions."""
        return self.score(model, examples)
