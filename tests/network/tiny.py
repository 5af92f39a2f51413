"""Tiny SD1- and SDXL-shaped models (real block structure, small widths) with random weights, for forward tests."""

from __future__ import annotations

import functools

import pytest
import torch


@functools.lru_cache(maxsize=None)
def _tiny(kind: str):
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    te_cfg = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    if kind == "sd1":
        unet = diffusers.UNet2DConditionModel(
            sample_size=8, block_out_channels=(16, 16, 32, 32), layers_per_block=2, cross_attention_dim=32,
            attention_head_dim=4, norm_num_groups=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
        tes = [transformers.CLIPTextModel(transformers.CLIPTextConfig(**te_cfg))]
    else:
        unet = diffusers.UNet2DConditionModel(
            sample_size=8, block_out_channels=(16, 32, 32), layers_per_block=2, cross_attention_dim=64,
            attention_head_dim=4, norm_num_groups=8, transformer_layers_per_block=(1, 1, 2),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=56)
        tes = [transformers.CLIPTextModel(transformers.CLIPTextConfig(**te_cfg)),
               transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**te_cfg, projection_dim=32))]
    for m in (unet, *tes):
        m.eval().requires_grad_(False)
    return unet, tes


def tiny_model(kind: str = "sd1"):
    return _tiny(kind)


def unet_inputs(unet, kind: str = "sd1", seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 8, 8, generator=g)
    cond = torch.randn(1, 5, unet.config.cross_attention_dim, generator=g)
    kwargs = {}
    if kind == "sdxl":
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(1, 32, generator=g),
                                       "time_ids": torch.randn(1, 3, generator=g)}
    return (x, torch.tensor([10]), cond), kwargs


def run_unet(unet, kind: str = "sd1"):
    args, kwargs = unet_inputs(unet, kind)
    with torch.no_grad():
        return unet(*args, **kwargs).sample


@torch.no_grad()
def randomize(network, scale=0.05, seed=1):
    g = torch.Generator().manual_seed(seed)
    for name, p in network.named_parameters():
        if name.endswith(("dora_scale", "rescale")):
            continue
        p.add_(scale * torch.randn(p.shape, generator=g))
    return network
