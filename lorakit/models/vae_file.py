"""A separate VAE (``vae=``): a single file in the LDM layout (with or without ``first_stage_model.``),
a diffusers VAE weight file, or a diffusers folder (the VAE's own or a whole model's)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch

from ..formats.checkpoint_file import CheckpointReader
from ..formats.checkpoint_layout import to_diffusers_recipes
from .assemble import fill_component
from .detect import ModelKindError, classify_keys
from .diffusers_folder import read_component_tensors, read_json

__all__ = ["load_vae"]

_LDM_PREFIX = "first_stage_model."


def load_vae(source: str | os.PathLike, kind: str, default_config: Mapping[str, Any],
             dtype: torch.dtype | None, config_origin: str = "the model's VAE config") -> torch.nn.Module:
    """The AutoencoderKL in ``source``; ``default_config`` (the model's VAE config, from ``config_origin``, which
    errors name) is used for single files."""
    source = Path(source)
    if source.is_dir():
        folder = source / "vae" if (source / "vae" / "config.json").is_file() else source
        config_file = folder / "config.json"
        if not config_file.is_file():
            raise ModelKindError(f"vae={source}: a folder without config.json (expected a diffusers VAE folder)")
        config = read_json(config_file)
        return fill_component("vae", config, lambda m: read_component_tensors(folder, m), dtype, f"vae={source}")
    if not source.is_file():
        raise FileNotFoundError(f"vae={source}: no such file or folder")
    with CheckpointReader(source) as reader:
        keys = reader.keys()
        prefix = _LDM_PREFIX if any(k.startswith(_LDM_PREFIX) for k in keys) else ""
        inner = [k[len(prefix):] for k in keys if k.startswith(prefix)]
        if any(k.startswith("encoder.down.") for k in inner):
            def tensors(module):
                try:
                    recipes = to_diffusers_recipes(kind, "vae", module.state_dict().keys(), module.config, inner,
                                                   prefix=prefix)
                except ValueError as e:
                    raise ModelKindError(f"vae={source}: {e} (checked against {config_origin})") from None
                return ((key, r.build([reader.get(prefix + s) for s in r.sources])) for key, r in recipes.items())
        elif any(k.startswith("encoder.down_blocks.") for k in inner):
            def tensors(module):
                missing = [k for k in module.state_dict() if k not in reader]
                if missing:
                    raise ModelKindError(f"vae={source}: diffusers VAE file lacks {', '.join(missing[:3])}")
                return ((key, reader.get(key)) for key in module.state_dict())
        else:
            raise ModelKindError(f"vae={source}: expected a VAE (keys 'encoder.down.*'/'decoder.up.*', optionally "
                                 f"under 'first_stage_model.', or diffusers 'encoder.down_blocks.*'), found "
                                 f"{classify_keys(keys)}")
        return fill_component("vae", default_config, tensors, dtype, f"vae={source}")
