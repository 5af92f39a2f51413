"""U-Net: diffusers <-> LDM/SGM checkpoint keys, checked against diffusers' own single-file converter."""

from __future__ import annotations

import functools

import pytest
import torch

from lorakit.formats.checkpoint_layout import COMPONENT_PREFIXES, to_checkpoint, to_diffusers_recipes, unused_keys

from .checkpoint_roundtrip import assert_exact, build, random_state_dict, roundtrip

diffusers = pytest.importorskip("diffusers")
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint  # noqa: E402

_COMMON = dict(sample_size=8, layers_per_block=2, norm_num_groups=8)
TINY = {
    "sd1": dict(block_out_channels=(16, 16, 32, 32), cross_attention_dim=32, attention_head_dim=4,
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
    "sd2": dict(block_out_channels=(16, 16, 32, 32), cross_attention_dim=24, attention_head_dim=(2, 4, 8, 8),
                use_linear_projection=True,
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
    "sdxl": dict(block_out_channels=(16, 32, 32), cross_attention_dim=64, attention_head_dim=4,
                 transformer_layers_per_block=(1, 1, 2), use_linear_projection=True,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=56),
}
FULL = {"sd1": "sd15", "sd2": "sd21", "sdxl": "sdxl"}


@functools.lru_cache(maxsize=None)
def _tiny(kind):
    with torch.device("meta"):  # only keys and shapes are used; values come from random_state_dict
        return diffusers.UNet2DConditionModel(**_COMMON, **TINY[kind])


@pytest.mark.parametrize("kind", list(TINY))
def test_tiny_roundtrip_matches_diffusers_converter(kind):
    unet = _tiny(kind)
    sd = random_state_dict(unet)
    ckpt = roundtrip(kind, "unet", sd, unet.config)
    # the independent reference: diffusers' loader reads our file back to the same tensors
    assert_exact(convert_ldm_unet_checkpoint(ckpt, dict(unet.config)), sd)


# Names and shapes as they appear in the released single files.
KNOWN = {
    "sd1": {"input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
            "input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
            "middle_block.1.transformer_blocks.0.attn2.to_k.weight": (1280, 768),
            "output_blocks.8.2.conv.weight": (640, 640, 3, 3),
            "input_blocks.9.0.op.weight": (1280, 1280, 3, 3), "out.2.weight": (4, 320, 3, 3)},
    "sd2": {"input_blocks.1.1.proj_in.weight": (320, 320),
            "output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024)},
    "sdxl": {"label_emb.0.0.weight": (1280, 2816), "input_blocks.3.0.op.weight": (320, 320, 3, 3),
             "input_blocks.7.1.transformer_blocks.9.ff.net.0.proj.weight": (10240, 1280),
             "middle_block.1.transformer_blocks.9.attn1.to_out.0.weight": (1280, 1280),
             "output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
             "output_blocks.5.2.conv.weight": (640, 640, 3, 3), "output_blocks.8.0.emb_layers.1.weight": (320, 1280)},
}


@pytest.mark.parametrize("kind", list(FULL))
def test_full_size_maps_one_to_one(kind):
    from lorakit.models.meta import build_unet_on_meta

    unet = build_unet_on_meta(FULL[kind])
    sd = unet.state_dict()
    prefixed = roundtrip(kind, "unet", sd, unet.config)
    assert_exact(convert_ldm_unet_checkpoint(prefixed, dict(unet.config)), sd)
    ckpt = to_checkpoint(kind, "unet", sd, unet.config)
    assert len(ckpt) == len(sd) == {"sd1": 686, "sd2": 686, "sdxl": 1680}[kind]
    assert unused_keys(to_diffusers_recipes(kind, "unet", sd, unet.config, ckpt), ckpt) == []
    for key, shape in KNOWN[kind].items():
        assert tuple(ckpt[key].shape) == shape, key


def test_missing_checkpoint_key_is_named():
    unet = _tiny("sd1")
    sd = random_state_dict(unet)
    ckpt = to_checkpoint("sd1", "unet", sd, unet.config)
    del ckpt["input_blocks.4.1.proj_out.bias"]
    with pytest.raises(ValueError, match=r"input_blocks\.4\.1\.proj_out\.bias"):
        to_diffusers_recipes("sd1", "unet", sd, unet.config, ckpt)


def test_extra_checkpoint_keys_are_reported_not_used():
    unet = _tiny("sd1")
    sd = random_state_dict(unet)
    ckpt = to_checkpoint("sd1", "unet", sd, unet.config)
    extras = ["model_ema.decay", "input_blocks.99.0.weight"]
    recipes = to_diffusers_recipes("sd1", "unet", sd, unet.config, [*ckpt, *extras])
    assert unused_keys(recipes, [*ckpt, *extras]) == extras
    assert_exact(build(recipes, ckpt), sd)


def test_unknown_kind_or_component():
    with pytest.raises(ValueError, match="sd3"):
        to_diffusers_recipes("sd3", "unet", [], {}, [])
    with pytest.raises(ValueError, match="text_encoder_2"):
        to_checkpoint("sd1", "text_encoder_2", {}, {})
    assert set(COMPONENT_PREFIXES["sdxl"]) == {"unet", "vae", "text_encoder", "text_encoder_2"}
