"""Deterministic generation: a fixed noise per caption and DDIM with a fixed number of steps (eta = 0)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import UNet2DConditionModel
from torch import Tensor

from m2n2_lightning.diffusion.models import sampler


def initial_noise(noise_seeds: Sequence[int]) -> Tensor:
    """[B, 1, 8, 8] standard normal noise, each image's from its own seed (the same for a caption in any batch)."""
    return torch.stack([torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(int(s))) for s in noise_seeds])


@torch.no_grad()
def generate(unet: UNet2DConditionModel, states: Tensor, noise_seeds: Sequence[int], steps: int) -> Tensor:
    """Images [B, 1, 8, 8] in [-1, 1] from the text states [B, tokens, hidden], DDIM in `steps` steps.

    The result depends only on the weights, the states and the seeds: a candidate's scores are
    the same however its captions are batched (up to float rounding of the batch's kernels).
    """
    if len(noise_seeds) != len(states):
        raise ValueError(f"{len(noise_seeds)} noise seeds for {len(states)} captions: give one per caption")
    parameter = next(unet.parameters())
    scheduler = sampler(steps)
    x = initial_noise(noise_seeds).to(parameter.device, parameter.dtype)
    states = states.to(parameter.device, parameter.dtype)
    for t in scheduler.timesteps:
        eps = unet(x, t, encoder_hidden_states=states).sample
        x = scheduler.step(eps, t, x, eta=0.0).prev_sample
    return x.clamp(-1.0, 1.0).float()
