"""The seeds of the image-generation merge: a base trained here and four fine-tunes of its one U-Net architecture.

Stand-ins for the paper's four SDXL U-Nets (section 4.3):

- `bilingual` (JSDXL): the base U-Net fine-tuned together with a new text encoder, trained from
  scratch on captions of both languages; only it understands the second language ("futoi nana").
- `bold` and `thin` (style fine-tunes, as Juggernaut-XL's): the base U-Net fine-tuned on the
  training images of one style only, with the base's text encoder.
- `sharp` (a quality fine-tune, as SDXL-DPO's): the base U-Net fine-tuned on every training image
  with more of the low-noise timesteps, which shape fine detail.

The scorer (`scorer.ImageEncoder`) is trained in the same build, on the same training images.
Everything is deterministic from the seed (one thread) and cached with `save_pretrained`:

    <cache>/base/{unet,text_encoder}  bilingual/{unet,text_encoder}  bold/unet  thin/unet  sharp/unet
    <cache>/scorer/  build.json (written last)

    python -m m2n2_lightning.diffusion.seeds [--out DIR] [--preset reduced] [--seed N]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextModel

from m2n2_lightning.data.digits import DIGITS_TRAIN
from m2n2_lightning.diffusion import data
from m2n2_lightning.diffusion.models import make_unet
from m2n2_lightning.diffusion.scorer import ImageEncoder, train_encoder
from m2n2_lightning.diffusion.text import make_text_encoder
from m2n2_lightning.diffusion.training import train_denoiser

#: The merge's seed U-Nets, the bilingual one (whose text encoder is kept) first.
SEED_NAMES = ("bilingual", "bold", "thin", "sharp")


@dataclass(frozen=True)
class SeedSettings:
    """Everything the build depends on; a change of any field rebuilds the cache."""

    seed: int = 0
    channels: int = 16
    text_hidden: int = 32
    batch_size: int = 64
    base_steps: int = 600
    base_lr: float = 2e-3
    bilingual_steps: int = 300
    finetune_steps: int = 150
    finetune_lr: float = 5e-4
    sharp_power: float = 2.0
    scorer_steps: int = 600


PRESETS = {
    "full": SeedSettings(),
    # CI's quick build: the same architecture, a few steps of each stage (for the plumbing, not for the images).
    "reduced": SeedSettings(batch_size=16, base_steps=30, bilingual_steps=15, finetune_steps=8, scorer_steps=60),
}


def preset(name: str = "full", seed: int = 0) -> SeedSettings:
    """The named preset (full or reduced) with the given seed."""
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
    return replace(PRESETS[name], seed=seed)


def default_cache(name: str = "full", seed: int = 0) -> Path:
    """$M2N2_DIFFUSION_CACHE (else ~/.cache/m2n2-lightning/diffusion) / <preset>_seed<N>: outside the repository."""
    root = Path(os.environ.get("M2N2_DIFFUSION_CACHE", Path.home() / ".cache" / "m2n2-lightning" / "diffusion"))
    return root / f"{name}_seed{seed}"


def unet_dir(cache: str | Path, name: str) -> Path:
    """The save_pretrained folder of seed `name`'s U-Net (or the base's)."""
    return Path(cache) / name / "unet"


def text_encoder_dir(cache: str | Path, name: str = "bilingual") -> Path:
    """The save_pretrained folder of a text encoder: "bilingual" (kept by the merge) or "base"."""
    return Path(cache) / name / "text_encoder"


def scorer_dir(cache: str | Path) -> Path:
    return Path(cache) / "scorer"


def _fine_tune(base: UNet2DConditionModel, settings: SeedSettings, encoder: CLIPTextModel, images: torch.Tensor,
               captions: list[list[str]], offset: int, **options: float | bool) -> UNet2DConditionModel:
    """A copy of the base U-Net trained further on `images` (`options`: those of `train_denoiser`)."""
    s = settings
    unet = make_unet(s.channels, s.text_hidden, s.seed)
    unet.load_state_dict(base.state_dict())
    train_denoiser(unet, encoder, images, captions, **{"steps": s.finetune_steps, **options}, lr=s.finetune_lr,
                   seed=s.seed + offset, encoder_lr=s.base_lr, batch_size=s.batch_size)
    return unet


def _train_models(settings: SeedSettings) -> tuple[dict[str, UNet2DConditionModel], dict[str, CLIPTextModel], ImageEncoder]:
    """The base and the seeds (U-Nets and text encoders by name) and the scorer, trained in this order."""
    s = settings
    images, styles = data.images()[:DIGITS_TRAIN], data.styles()[:DIGITS_TRAIN]
    english = [[data.caption(i, "en")] for i in range(DIGITS_TRAIN)]
    both = [[data.caption(i, lang) for lang in data.LANGUAGES] for i in range(DIGITS_TRAIN)]
    base, base_text = make_unet(s.channels, s.text_hidden, s.seed), make_text_encoder(s.text_hidden, s.seed)
    train_denoiser(base, base_text, images, english, steps=s.base_steps, lr=s.base_lr, seed=s.seed, train_encoder=True,
                   batch_size=s.batch_size)
    texts = {"base": base_text, "bilingual": make_text_encoder(s.text_hidden, s.seed + 100)}
    unets = {"base": base}
    unets["bilingual"] = _fine_tune(base, s, texts["bilingual"], images, both, 1, steps=s.bilingual_steps,
                                    train_encoder=True)
    for offset, (name, style) in enumerate((("bold", 1), ("thin", 0)), start=2):
        keep = torch.nonzero(styles == style).squeeze(1)
        unets[name] = _fine_tune(base, s, base_text, images[keep], [english[i] for i in keep.tolist()], offset)
    unets["sharp"] = _fine_tune(base, s, base_text, images, english, 4, timestep_power=s.sharp_power)
    scorer = train_encoder(images, 2 * data.digits()[:DIGITS_TRAIN] + styles, s.scorer_steps, s.seed + 5)
    return unets, texts, scorer


def build_seeds(out: str | Path, settings: SeedSettings) -> dict:
    """Build (or find in `out`) the base, the four seeds and the scorer; returns the build record (build.json).

    build.json is written last, so an interrupted build is redone; a second call with the same
    settings only reads it. Runs on one thread (restored after): the build is bit-for-bit
    reproducible only with a fixed thread count.
    """
    out = Path(out)
    record_path = out / "build.json"
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        if record["settings"] == asdict(settings):
            return record
    record_path.unlink(missing_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    start = time.perf_counter()
    try:
        unets, texts, scorer = _train_models(settings)
    finally:
        torch.set_num_threads(threads)
    for name, unet in unets.items():
        unet.save_pretrained(unet_dir(out, name))
    for name, encoder in texts.items():
        encoder.save_pretrained(text_encoder_dir(out, name))
    scorer.save(scorer_dir(out))
    record = {"settings": asdict(settings), "build_seconds": time.perf_counter() - start,
              "scorer_test_accuracy": scorer_accuracy(scorer)}
    record_path.write_text(json.dumps(record, indent=2))
    return record


@torch.no_grad()
def scorer_accuracy(scorer: ImageEncoder) -> float:
    """The scorer's accuracy at telling the 20 captions apart on the 360 images no model trains on."""
    classes = 2 * data.digits()[DIGITS_TRAIN:] + data.styles()[DIGITS_TRAIN:]
    return float((scorer(data.images()[DIGITS_TRAIN:]).argmax(1) == classes).double().mean())


def load_unet(cache: str | Path, name: str) -> UNet2DConditionModel:
    """Seed (or base) `name`'s U-Net, in eval mode."""
    return UNet2DConditionModel.from_pretrained(unet_dir(cache, name)).eval()


def load_text_encoder(cache: str | Path, name: str = "bilingual") -> CLIPTextModel:
    return CLIPTextModel.from_pretrained(text_encoder_dir(cache, name)).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="cache folder (default: default_cache(preset, seed))")
    parser.add_argument("--preset", default="full", choices=sorted(PRESETS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out) if args.out else default_cache(args.preset, args.seed)
    start = time.perf_counter()
    record = build_seeds(out, preset(args.preset, args.seed))
    print(json.dumps(record, indent=2))
    print(f"{out}: built in {record['build_seconds']:.1f} s; this call {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
