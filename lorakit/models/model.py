"""The loaded Stable Diffusion model: diffusers/transformers components plus what the file said about them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["KINDS", "StableDiffusionModel"]

# sd1: SD1.x (CLIP ViT-L text encoder); sd2: SD2.x (OpenCLIP ViT-H, penultimate layer); sdxl: SDXL base
# (CLIP ViT-L + OpenCLIP ViT-bigG, size/crop conditioning).
KINDS = ("sd1", "sd2", "sdxl")


@dataclass
class StableDiffusionModel:
    """One Stable Diffusion model in memory.

    ``text_encoders`` and ``tokenizers`` are in pipeline order (one for SD1/SD2, two for SDXL).
    ``extras`` holds the checkpoint tensors that have no diffusers counterpart (SD2's unused last text layer,
    ``text_projection``, the noise-schedule buffers...), kept so that saving back writes the file it came from.
    """

    kind: str
    v_parameterization: bool
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list[torch.nn.Module]
    tokenizers: list[Any]
    scheduler_config: dict[str, Any]
    source: str = ""
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"model kind {self.kind!r} is not one of {', '.join(KINDS)}")
        expected = 2 if self.kind == "sdxl" else 1
        if len(self.text_encoders) != expected or len(self.tokenizers) != expected:
            raise ValueError(f"a {self.kind} model has {expected} text encoder(s) and tokenizer(s); got "
                             f"{len(self.text_encoders)} and {len(self.tokenizers)}")

    @property
    def is_sdxl(self) -> bool:
        return self.kind == "sdxl"

    def components(self) -> list[tuple[str, torch.nn.Module]]:
        """``[("unet", ...), ("vae", ...), ("text_encoder", ...), ("text_encoder_2", ...)]`` as diffusers names them."""
        names = ["text_encoder", "text_encoder_2"][: len(self.text_encoders)]
        return [("unet", self.unet), ("vae", self.vae), *zip(names, self.text_encoders)]

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent pixel along each side (8 for every released SD model)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def noise_scheduler(self):
        """A fresh ``DDPMScheduler`` with this model's training schedule and prediction type."""
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(self.scheduler_config)
