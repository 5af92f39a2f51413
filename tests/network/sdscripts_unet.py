"""The module trees that kohya sd-scripts hands a `--network_module`, for the preset tests (no forward, built on the
meta device):

- `sdxl_unet()`: the SDXL U-Net of sd-scripts' library/sdxl_original_unet.py. Its module paths are the SGM ones
  (input_blocks.4.1.transformer_blocks.0.attn1.to_q, time_embed.0, out.2, ...), its attention class is named
  `CrossAttention` and its ResNet blocks are `ResnetBlock2D` with in_layers/emb_layers/out_layers/skip_connection.
- `crossattention_unet(unet)`: sd-scripts' SD1/SD2 U-Net (library/original_unet.py) keeps diffusers' paths but
  names its attention class `CrossAttention`; emulated on a diffusers U-Net by renaming that class.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

CH, TIME, ADM, CONTEXT = 320, 1280, 2816, 2048


class ResnetBlock2D(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(32, cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(TIME, cout))
        self.out_layers = nn.Sequential(nn.GroupNorm(32, cout), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(cout, cout, 3, padding=1))
        self.skip_connection = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()


class Downsample2D(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1)


class Upsample2D(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)


class CrossAttention(nn.Module):
    def __init__(self, dim, context):
        super().__init__()
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context, dim, bias=False)
        self.to_v = nn.Linear(context, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])


class GEGLU(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.proj = nn.Linear(dim, dim * 8)


class FeedForward(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim), nn.Dropout(0.0), nn.Linear(dim * 4, dim)])


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.attn1 = CrossAttention(dim, dim)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, CONTEXT)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)


class Transformer2DModel(nn.Module):
    def __init__(self, dim, depth):
        super().__init__()
        self.norm = nn.GroupNorm(32, dim)
        self.proj_in = nn.Linear(dim, dim)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(dim) for _ in range(depth)])
        self.proj_out = nn.Linear(dim, dim)


class SdxlUNet2DConditionModel(nn.Module):
    """Channels 320/640/1280, transformer depths 0/2/10, three ResNet blocks per output level."""

    def __init__(self):
        super().__init__()
        self.time_embed = nn.Sequential(nn.Linear(CH, TIME), nn.SiLU(), nn.Linear(TIME, TIME))
        self.label_emb = nn.Sequential(nn.Sequential(nn.Linear(ADM, TIME), nn.SiLU(), nn.Linear(TIME, TIME)))
        levels = [(CH, 0), (2 * CH, 2), (4 * CH, 10)]
        self.input_blocks = nn.ModuleList([nn.Sequential(nn.Conv2d(4, CH, 3, padding=1))])
        skips, ch = [CH], CH
        for i, (out, depth) in enumerate(levels):
            for _ in range(2):
                layers = [ResnetBlock2D(ch, out)] + ([Transformer2DModel(out, depth)] if depth else [])
                self.input_blocks.append(nn.ModuleList(layers))
                ch = out
                skips.append(ch)
            if i < len(levels) - 1:
                self.input_blocks.append(nn.Sequential(Downsample2D(ch)))
                skips.append(ch)
        self.middle_block = nn.ModuleList([ResnetBlock2D(ch, ch), Transformer2DModel(ch, 10), ResnetBlock2D(ch, ch)])
        self.output_blocks = nn.ModuleList()
        for i, (out, depth) in reversed(list(enumerate(levels))):
            for j in range(3):
                layers = [ResnetBlock2D(ch + skips.pop(), out)] + ([Transformer2DModel(out, depth)] if depth else [])
                ch = out
                if i > 0 and j == 2:
                    layers.append(Upsample2D(ch))
                self.output_blocks.append(nn.ModuleList(layers))
        self.out = nn.ModuleList([nn.GroupNorm(32, CH), nn.SiLU(), nn.Conv2d(CH, 4, 3, padding=1)])


def sdxl_unet() -> nn.Module:
    with torch.device("meta"):
        return SdxlUNet2DConditionModel().requires_grad_(False)


def crossattention_unet(unet: nn.Module) -> nn.Module:
    """A copy of a diffusers U-Net whose attention modules' class is named CrossAttention (a subclass of
    diffusers' Attention, so the modules keep working)."""
    unet = copy.deepcopy(unet)
    renamed = {}
    for module in unet.modules():
        cls = type(module)
        if cls.__name__ == "Attention":
            renamed.setdefault(cls, type("CrossAttention", (cls,), {}))
            module.__class__ = renamed[cls]
    return unet
