"""The bundled demo models: "demo:tiny-sd" and "demo:tiny-sdxl".

Small SD1- and SDXL-shaped models (the real block structure at small widths, the real CLIP tokenizer, 64x64
images) pre-trained by ``scripts/pretrain_demo.py`` on ``demo_data``'s coloured shapes. Their weights ship in
``lorakit/models/demo/<name>.safetensors`` in the single-file (LDM/SGM) layout, their configs in
``lorakit/models/configs/<name>/``. They have never seen ``demo_data.HELD_OUT_COLOUR``: the colour a LoRA can
visibly teach them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .configs import load_config
from .meta import text_encoder_components

__all__ = ["DEMO_MODELS", "DEMO_DIR", "demo_file", "random_model"]

DEMO_DIR = Path(__file__).resolve().parent / "demo"

# demo name -> (config name, model kind)
DEMO_MODELS: dict[str, tuple[str, str]] = {
    "tiny-sd": ("tiny-sd", "sd1"),
    "tiny-sdxl": ("tiny-sdxl", "sdxl"),
}


def _key(name: str) -> str:
    key = name[len("demo:"):] if name.startswith("demo:") else name
    if key not in DEMO_MODELS:
        raise ValueError(f"unknown demo model {name!r}; known: {', '.join('demo:' + k for k in DEMO_MODELS)}")
    return key


def demo_file(name: str) -> tuple[Path, str]:
    """("demo:tiny-sd" or "tiny-sd") -> (path of its packaged weight file, its config name)."""
    key = _key(name)
    path = DEMO_DIR / f"{key}.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the weights of demo:{key} are missing (run scripts/pretrain_demo.py)")
    return path, DEMO_MODELS[key][0]


def random_model(name: str, seed: int = 0):
    """An untrained ``StableDiffusionModel`` of demo ``name``: components built from the bundled configs with
    their default (seeded) initialisation, the real CLIP tokenizers. The starting point of pre-training, and a
    small real-shaped model for tests."""
    import diffusers
    import transformers

    from .meta import component_on_meta
    from .model import StableDiffusionModel
    from .tokenizer import tokenizers_for

    key = _key(name)
    config_name, kind = DEMO_MODELS[key]
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel.from_config(load_config(config_name, "unet"))
    vae = diffusers.AutoencoderKL.from_config(load_config(config_name, "vae"))
    encoders = []
    for component in text_encoder_components(config_name):
        meta = component_on_meta(component, load_config(config_name, component))  # for the cleaned config
        encoders.append(getattr(transformers, type(meta).__name__)(meta.config))
    return StableDiffusionModel(kind=kind, v_parameterization=False, unet=unet.eval(), vae=vae.eval(),
                                text_encoders=[e.eval() for e in encoders], tokenizers=tokenizers_for(kind),
                                scheduler_config=load_config(config_name, "scheduler"), source=f"random:{key}")
