"""The paper's image-generation merge (section 4.3) at laptop scale: text-to-image diffusion on the 8x8 digits.

A small `UNet2DConditionModel` (diffusers) with cross-attention denoises the 8x8 digits in pixel
space (no VAE: the images are 64 pixels already), conditioned on captions such as "bold seven"
through a tiny CLIP text encoder. A base is trained here, then seeds of the one U-Net
architecture as the paper's four SDXL U-Nets differ (`seeds.py`); a small CNN trained here plays
CLIP's role in the score (`scorer.py`); `m2n2_lightning.tasks.diffusion.DiffusionTask` scores a
candidate U-Net per caption. Needs the `diffusion` extra (diffusers).
"""
