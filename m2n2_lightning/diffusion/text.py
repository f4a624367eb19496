"""Captions to token ids, and the tiny CLIP text encoders that turn them into the U-Net's cross-attention states.

Every caption is two words, so the ids are [<bos>, style, digit, <eos>] without padding. Each
text encoder is a `CLIPTextModel` (transformers) built from a config, as SDXL's are; its last
hidden states [B, 4, hidden] condition the U-Net.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from transformers import CLIPTextConfig, CLIPTextModel

from m2n2_lightning.diffusion.data import vocabulary

#: Tokens per caption: <bos>, two words, <eos>.
CAPTION_TOKENS = 4


def token_ids(captions: Sequence[str]) -> Tensor:
    """[B, 4] int64 ids of two-word captions; a ValueError names a caption of another length or an unknown word."""
    index = {word: i for i, word in enumerate(vocabulary())}
    rows = []
    for text in captions:
        words = text.split()
        if len(words) != CAPTION_TOKENS - 2 or any(w not in index for w in words):
            raise ValueError(f"caption {text!r} is not a style word and a digit word of the vocabulary {vocabulary()[3:]}")
        rows.append([index["<bos>"], *(index[w] for w in words), index["<eos>"]])
    return torch.tensor(rows, dtype=torch.int64)


def make_text_encoder(hidden: int, seed: int) -> CLIPTextModel:
    """A fresh one-layer CLIP text encoder over the caption vocabulary, initialised from `seed`."""
    config = CLIPTextConfig(
        vocab_size=len(vocabulary()), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=CAPTION_TOKENS, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        projection_dim=hidden,
    )
    torch.manual_seed(seed)
    return CLIPTextModel(config)


def encode(encoder: CLIPTextModel, captions: Sequence[str]) -> Tensor:
    """The encoder's last hidden states [B, 4, hidden] for `captions`: the U-Net's `encoder_hidden_states`."""
    return encoder(input_ids=token_ids(captions)).last_hidden_state
