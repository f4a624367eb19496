"""Training a U-Net (and optionally its text encoder) to predict the noise added to captioned images."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from diffusers import UNet2DConditionModel
from torch import Tensor, nn
from transformers import CLIPTextModel

from m2n2_lightning.diffusion.models import training_scheduler
from m2n2_lightning.diffusion.text import token_ids


def train_denoiser(
    unet: UNet2DConditionModel, encoder: CLIPTextModel, images: Tensor, captions: Sequence[Sequence[str]], *,
    steps: int, lr: float, seed: int, train_encoder: bool = False, encoder_lr: float | None = None,
    timestep_power: float = 1.0, batch_size: int = 128,
) -> None:
    """AdamW on the epsilon-prediction loss (mean squared error), in place; cosine decay of the rate to zero.

    `captions[k]` lists the captions image k may be shown with (one is drawn per sample: both
    languages for the bilingual seed). Timesteps are floor(T u^p) for u ~ U(0, 1): p = 1 uniform,
    p > 1 more of the low-noise steps that shape fine detail (the "sharp" seed). The text
    encoder is trained only with `train_encoder` (at `encoder_lr`, default `lr`).
    """
    if len(captions) != len(images):
        raise ValueError(f"{len(captions)} caption lists for {len(images)} images")
    generator = torch.Generator().manual_seed(seed)
    schedule = training_scheduler()
    total = schedule.config.num_train_timesteps
    groups = [{"params": list(unet.parameters()), "lr": lr}]
    if train_encoder:
        groups.append({"params": list(encoder.parameters()), "lr": encoder_lr or lr})
    encoder.requires_grad_(train_encoder)
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    decay = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    unet.train()
    encoder.train(train_encoder)
    for _ in range(steps):
        index = torch.randint(0, len(images), (batch_size,), generator=generator)
        choice = torch.randint(0, 1 << 30, (batch_size,), generator=generator)
        texts = [captions[i][c % len(captions[i])] for i, c in zip(index.tolist(), choice.tolist())]
        clean = images[index]
        noise = torch.randn(clean.shape, generator=generator)
        u = torch.rand(batch_size, generator=generator)
        t = (total * u**timestep_power).long().clamp(max=total - 1)
        states = encoder(input_ids=token_ids(texts)).last_hidden_state
        predicted = unet(schedule.add_noise(clean, noise, t), t, encoder_hidden_states=states).sample
        loss = nn.functional.mse_loss(predicted, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
        optimizer.step()
        decay.step()
    unet.eval()
    encoder.eval().requires_grad_(True)
