"""Full-size Stable Diffusion models built on ``torch.device("meta")`` from the bundled configs.

No weights are allocated and nothing is fetched: building SDXL takes a second or two. Used to test
module names, adapter target counts and shapes against the real architectures.
"""

from __future__ import annotations

from typing import Any

import torch

from .configs import canonical_name, load_config

__all__ = ["build_unet_on_meta", "build_text_encoders_on_meta", "build_vae_on_meta", "build_on_meta",
           "text_encoder_components"]


def text_encoder_components(name: str) -> list[str]:
    """The text-encoder component names of a model, in pipeline order."""
    name = canonical_name(name)
    return ["text_encoder", "text_encoder_2"] if name == "sdxl" else ["text_encoder"]


def _diffusers_model(name: str, component: str, class_name: str) -> Any:
    import diffusers

    cfg = load_config(name, component)
    cls = getattr(diffusers, cfg.get("_class_name", class_name))
    with torch.device("meta"):
        return cls.from_config(cfg)


def build_unet_on_meta(name: str) -> torch.nn.Module:
    """The diffusers ``UNet2DConditionModel`` of model ``name`` with parameters on the meta device."""
    return _diffusers_model(name, "unet", "UNet2DConditionModel")


def build_vae_on_meta(name: str) -> torch.nn.Module:
    """The diffusers ``AutoencoderKL`` of model ``name`` with parameters on the meta device."""
    return _diffusers_model(name, "vae", "AutoencoderKL")


def build_text_encoders_on_meta(name: str) -> list[torch.nn.Module]:
    """The transformers text encoders of model ``name`` (``CLIPTextModel``; plus
    ``CLIPTextModelWithProjection`` for SDXL) with float32 parameters on the meta device."""
    import transformers

    encoders = []
    for component in text_encoder_components(name):
        cfg = dict(load_config(name, component))
        arch = (cfg.get("architectures") or ["CLIPTextModel"])[0]
        cls = getattr(transformers, arch)
        # torch_dtype is the dtype the weights were saved in; transformers 5 would build the model in it.
        for key in ("architectures", "_name_or_path", "transformers_version", "model_type", "torch_dtype", "dtype"):
            cfg.pop(key, None)
        config = transformers.CLIPTextConfig(**cfg)
        config.architectures = [arch]
        with torch.device("meta"):
            model = cls(config)
        encoders.append(model.eval())
    return encoders


def build_on_meta(name: str) -> tuple[torch.nn.Module, list[torch.nn.Module]]:
    """``(unet, [text encoders])`` of model ``name`` ("sd15", "sd21", "sdxl" or an alias) on the meta
    device, built from the bundled configs with diffusers/transformers classes. No weights, no network."""
    return build_unet_on_meta(name), build_text_encoders_on_meta(name)
