"""What the image-generation merge reports beyond the fitness: similarity per language, the FID-like distance,
language consistency, and sample grids.

Consistency (the paper's Japanese/English consistency, section 4.3): the normalised similarity
between the images a U-Net generates for the same image's captions in the two languages, from
the same noise; 1 when the language does not change the picture.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from m2n2_lightning.diffusion.data import LANGUAGES
from m2n2_lightning.diffusion.scorer import frechet_distance, similarity
from m2n2_lightning.tasks.diffusion import DiffusionTask


@torch.no_grad()
def evaluate(task: DiffusionTask, unet: nn.Module, tests: Mapping[str, list[dict]]) -> dict[str, float]:
    """similarity_<lang> and fid_<lang> on each test set of `tests` (a loaded task's), and consistency between the
    languages' images of the same test images."""
    report: dict[str, float] = {}
    generated: dict[str, Tensor] = {}
    for language, examples in tests.items():
        generated[language] = task.generate(unet, examples)
        truth = task.real(examples)
        report[f"similarity_{language}"] = float(similarity(task.scorer, generated[language], truth).double().mean())
        report[f"fid_{language}"] = frechet_distance(task.scorer, generated[language], truth)
    first, second = (tests[lang] for lang in LANGUAGES)
    if [e["image"] for e in first] != [e["image"] for e in second]:
        raise ValueError("the test sets of the two languages must caption the same images, in the same order")
    report["consistency"] = float(similarity(task.scorer, *(generated[lang] for lang in LANGUAGES)).double().mean())
    return report


def save_grid(rows: Mapping[str, Tensor], captions: list[str], path: str | Path) -> None:
    """A PNG of images [B, 1, 8, 8] in [-1, 1], one row per model (labelled), one column per caption."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = len(captions)
    figure, axes = plt.subplots(len(rows), columns, figsize=(0.9 * columns + 1.2, 0.95 * len(rows) + 0.4), squeeze=False)
    for r, (name, images) in enumerate(rows.items()):
        for c in range(columns):
            axis = axes[r][c]
            axis.imshow(images[c, 0].numpy(), cmap="gray_r", vmin=-1, vmax=1)
            axis.set_xticks([])
            axis.set_yticks([])
            if r == 0:
                axis.set_title(captions[c], fontsize=6)
        axes[r][0].set_ylabel(name, fontsize=7, rotation=0, ha="right", va="center")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
