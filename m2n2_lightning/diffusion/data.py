"""The digits as captioned images: two styles, two languages, and the splits of the image-generation merge.

Each of scikit-learn's 1,797 8x8 digits gets a caption of a style word and its digit, "bold seven"
or "thin two": bold when the image holds more ink than the median training image of its digit.
The second language names the same content with another vocabulary (romanised Japanese,
"futoi nana"), as JSDXL's Japanese captions name what SDXL's English ones do.

Splits, in the data's own order: the paper's first 1,437 images train the base, the seeds and the
scorer; of the last 360 (which no model trains on), the first half are the merge's resources and
the second half its test images, as the paper takes COCO validation images for both.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import Tensor

from m2n2_lightning.data.digits import DIGITS_TOTAL, DIGITS_TRAIN

LANGUAGES = ("en", "ja")
DIGIT_WORDS = {
    "en": ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"),
    "ja": ("rei", "ichi", "ni", "san", "yon", "go", "roku", "nana", "hachi", "kyuu"),
}
#: Style words by language: index 0 thin, 1 bold.
STYLE_WORDS = {"en": ("thin", "bold"), "ja": ("hosoi", "futoi")}
#: The merge's resources and test images: the halves of the 360 images after the training ones.
RESOURCE_IMAGES = range(DIGITS_TRAIN, DIGITS_TRAIN + (DIGITS_TOTAL - DIGITS_TRAIN) // 2)
TEST_IMAGES = range(RESOURCE_IMAGES.stop, DIGITS_TOTAL)


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    digits = load_digits()
    return digits.images.astype(np.float32), digits.target.astype(np.int64)


def images() -> Tensor:
    """All 1,797 images as [N, 1, 8, 8] in [-1, 1] (pixel value / 8 - 1)."""
    return torch.from_numpy(_digits()[0]).unsqueeze(1) / 8.0 - 1.0


def digits() -> Tensor:
    """The digit of every image, [N] int64."""
    return torch.from_numpy(_digits()[1])


def styles() -> Tensor:
    """[N] int64: 1 (bold) where an image holds more ink than its digit's median training image, else 0 (thin)."""
    pixels, labels = _digits()
    ink = pixels.sum(axis=(1, 2))
    medians = np.array([np.median(ink[:DIGITS_TRAIN][labels[:DIGITS_TRAIN] == d]) for d in range(10)])
    return torch.from_numpy((ink > medians[labels]).astype(np.int64))


def caption(image: int, language: str) -> str:
    """The caption of image `image` in `language`: its style word, then its digit word."""
    if language not in LANGUAGES:
        raise ValueError(f"language must be one of {LANGUAGES}, got {language!r}")
    if not 0 <= image < DIGITS_TOTAL:
        raise ValueError(f"image must be an index in [0, {DIGITS_TOTAL}), got {image}")
    return f"{STYLE_WORDS[language][int(styles()[image])]} {DIGIT_WORDS[language][int(digits()[image])]}"


def examples(indices: Sequence[int], language: str) -> list[dict]:
    """The captioned images `indices` in `language`: {"image", "language", "caption"} each (JSON for the fingerprint)."""
    return [{"image": int(i), "language": language, "caption": caption(int(i), language)} for i in indices]


def vocabulary() -> list[str]:
    """Every word of both languages, after the special tokens <pad>, <bos>, <eos>: the one vocabulary of all encoders."""
    words = [w for lang in LANGUAGES for w in (*STYLE_WORDS[lang], *DIGIT_WORDS[lang])]
    return ["<pad>", "<bos>", "<eos>", *words]
