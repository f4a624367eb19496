"""The one U-Net architecture of every seed, and the noise schedules of training and sampling.

A `UNet2DConditionModel` for 1-channel 8x8 images: a cross-attention block at 8x8, a plain
residual block at 4x4, and a cross-attention middle block, as SDXL's U-Net (smaller by far).
Training adds noise on diffusers' `DDPMScheduler` (1,000 steps, cosine schedule); candidates
generate with `DDIMScheduler` over the same schedule in a few deterministic (eta = 0) steps.
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel

#: The training schedule; DDIM samples from the same one.
SCHEDULE = {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2", "clip_sample": True}


def make_unet(channels: int, text_hidden: int, seed: int) -> UNet2DConditionModel:
    """A fresh U-Net with `channels` and 2 x `channels` feature maps, cross-attending to `text_hidden`-wide states."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
        block_out_channels=(channels, 2 * channels),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=text_hidden, attention_head_dim=8, norm_num_groups=8,
    )


def training_scheduler() -> DDPMScheduler:
    """The noise schedule the U-Nets are trained on."""
    return DDPMScheduler(**SCHEDULE)


def sampler(steps: int) -> DDIMScheduler:
    """DDIM over the training schedule, set to `steps` deterministic steps."""
    scheduler = DDIMScheduler(**SCHEDULE)
    scheduler.set_timesteps(steps)
    return scheduler
