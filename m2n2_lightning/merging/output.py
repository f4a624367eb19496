"""A merge written out: `save_merged` writes a module's weights so that they load again."""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn


def save_merged(module: nn.Module, directory: str | os.PathLike) -> Path:
    """Write `module`'s weights to `directory` so the merge can be loaded again; returns the directory.

    A transformers model (or a module holding exactly one as a direct child and
    no parameters outside it, such as a LightningModule's ``self.model``) is
    written with ``save_pretrained`` (config.json + model.safetensors), so
    ``AutoModel*.from_pretrained(directory)`` loads it. Anything else becomes
    ``model.safetensors`` via ``safetensors.torch.save_model``, which drops the
    duplicates of tied tensors.
    """
    directory = Path(directory)
    hf = _pretrained_model(module)
    if hf is not None:
        hf.save_pretrained(directory)
        return directory
    from safetensors.torch import save_model

    directory.mkdir(parents=True, exist_ok=True)
    save_model(module, str(directory / "model.safetensors"))
    return directory


def _pretrained_model(module: nn.Module) -> nn.Module | None:
    """`module` if it is a transformers PreTrainedModel, or its one such direct child holding all its parameters."""
    def is_hf(m: nn.Module) -> bool:
        if not any(c.__module__.startswith("transformers") for c in type(m).__mro__):
            return False  # transformers is imported only for modules that come from it
        from transformers import PreTrainedModel

        return isinstance(m, PreTrainedModel)

    if is_hf(module):
        return module
    children = [c for c in module.children() if is_hf(c)]
    inside = {id(p) for p in children[0].parameters()} if len(children) == 1 else set()
    return children[0] if inside and all(id(p) in inside for p in module.parameters()) else None
