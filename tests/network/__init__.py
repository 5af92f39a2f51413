"""Tests of lorakit.network on full-size SD1.5, SD2.1 and SDXL built on the meta device."""

from __future__ import annotations

import functools

import pytest
import torch


@functools.lru_cache(maxsize=None)
def meta_model(name: str):
    """(unet, [text encoders]) of a bundled model config on the meta device, built once per session."""
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from lorakit.models.meta import build_on_meta

    return build_on_meta(name)


TE_COMPONENTS = ("text_encoder", "text_encoder_2")


def kohya_default_targets(unet, text_encoders):
    """sd-scripts networks/lora.py default targets, as (component, module path): every Linear and 1x1
    Conv2d inside a Transformer2DModel of the U-Net, every Linear inside CLIPAttention/CLIPSdpaAttention/
    CLIPMLP of the text encoders."""
    out = []
    for name, mod in unet.named_modules():
        if type(mod).__name__ == "Transformer2DModel":
            for child_name, child in mod.named_modules():
                if isinstance(child, torch.nn.Linear) or (
                    isinstance(child, torch.nn.Conv2d) and child.kernel_size == (1, 1)
                ):
                    out.append(("unet", f"{name}.{child_name}"))
    for k, te in enumerate(text_encoders):
        for name, mod in te.named_modules():
            if type(mod).__name__ in ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"):
                for child_name, child in mod.named_modules():
                    if isinstance(child, torch.nn.Linear):
                        out.append((TE_COMPONENTS[k], f"{name}.{child_name}"))
    return out
