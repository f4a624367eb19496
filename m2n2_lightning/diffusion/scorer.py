"""The image encoder that plays CLIP's role: a small CNN trained here on the real digits.

It is trained to tell the 20 captions apart (digit x style) on the training images; its
64-dimensional features before the classifier are the embedding. A generated image's score is
the cosine similarity of its features to those of the real image of its caption, mapped from
[-1, 1] to [0, 1] as (1 + cos) / 2 (the paper's "normalised CLIP similarity"). The FID-like
distance is the Frechet distance between Gaussians fitted to the same features of two image sets.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from scipy import linalg
from torch import Tensor, nn

#: The embedding's width.
FEATURES = 64


class ImageEncoder(nn.Module):
    """Conv 1->w->2w (3x3, ReLU), 2x2 average pooling, then a linear map to the features; a linear head on top."""

    def __init__(self, width: int = 16, classes: int = 20) -> None:
        super().__init__()
        self.width = width
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
            nn.AvgPool2d(2), nn.Flatten(), nn.Linear(2 * width * 16, FEATURES),
        )
        self.head = nn.Linear(FEATURES, classes)

    def features(self, images: Tensor) -> Tensor:
        """[B, 64] features of images [B, 1, 8, 8] in [-1, 1]."""
        return self.body(images)

    def forward(self, images: Tensor) -> Tensor:
        """Logits [B, 20] of the caption classes (digit x 2 + style)."""
        return self.head(torch.relu(self.features(images)))

    def save(self, directory: Path) -> None:
        """`model.safetensors` and `config.json` in `directory`."""
        from safetensors.torch import save_model

        directory.mkdir(parents=True, exist_ok=True)
        save_model(self, str(directory / "model.safetensors"))
        (directory / "config.json").write_text(json.dumps({"width": self.width}))

    @classmethod
    def load(cls, directory: str | Path) -> ImageEncoder:
        """The encoder saved in `directory`, in eval mode."""
        from safetensors.torch import load_model

        directory = Path(directory)
        encoder = cls(**json.loads((directory / "config.json").read_text()))
        load_model(encoder, str(directory / "model.safetensors"))
        return encoder.eval()


def train_encoder(images: Tensor, classes: Tensor, steps: int, seed: int, batch_size: int = 128) -> ImageEncoder:
    """An encoder trained with cross-entropy on `images` [N, 1, 8, 8] and their caption classes [N].

    Each batch gets Gaussian pixel noise (std 0.1), so that slightly noisy generated images
    are embedded like clean ones.
    """
    torch.manual_seed(seed)
    encoder = ImageEncoder()
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(encoder.parameters(), lr=3e-3)
    for _ in range(steps):
        index = torch.randint(0, len(images), (batch_size,), generator=generator)
        noisy = images[index] + 0.1 * torch.randn(images[index].shape, generator=generator)
        loss = nn.functional.cross_entropy(encoder(noisy), classes[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return encoder.eval()


@torch.no_grad()
def similarity(encoder: ImageEncoder, generated: Tensor, real: Tensor) -> Tensor:
    """[B] (1 + cos) / 2 of each generated image's features to its real image's: the per-caption score in [0, 1]."""
    cos = nn.functional.cosine_similarity(encoder.features(generated).double(), encoder.features(real).double(), dim=1)
    return ((1.0 + cos) / 2.0).clamp(0.0, 1.0).float()


@torch.no_grad()
def frechet_distance(encoder: ImageEncoder, generated: Tensor, real: Tensor) -> float:
    """||mu_g - mu_r||^2 + tr(S_g + S_r - 2 (S_g S_r)^(1/2)) of Gaussians fitted to the two sets' features (float64)."""
    if len(generated) < 2 or len(real) < 2:
        raise ValueError("the Frechet distance needs at least two images in each set")
    a, b = encoder.features(generated).double().numpy(), encoder.features(real).double().numpy()
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b)
    root = root.real if np.iscomplexobj(root) else root  # sqrtm's rounding leaves tiny imaginary parts
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2.0 * root))
