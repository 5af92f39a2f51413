"""VAE: diffusers AutoencoderKL <-> LDM first_stage_model keys, checked against diffusers' own converter."""

from __future__ import annotations

import pytest
import torch

from lorakit.formats.checkpoint_layout import to_checkpoint, to_diffusers_recipes, unused_keys

from .checkpoint_roundtrip import assert_exact, build, random_state_dict, roundtrip

diffusers = pytest.importorskip("diffusers")
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint  # noqa: E402


def _tiny(levels=3, layers=1):
    with torch.device("meta"):  # keys and shapes only
        return diffusers.AutoencoderKL(
            block_out_channels=(8, 16, 24)[:levels], layers_per_block=layers, norm_num_groups=4, latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels)


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("levels,layers", [(3, 1), (2, 2)])
def test_tiny_roundtrip_matches_diffusers_converter(kind, levels, layers):
    vae = _tiny(levels, layers)
    sd = random_state_dict(vae)
    ckpt = roundtrip(kind, "vae", sd, vae.config)
    assert_exact(convert_ldm_vae_checkpoint(ckpt, dict(vae.config)), sd)
    # attention linears are 1x1 convs in the file, as in the released checkpoints
    assert ckpt["first_stage_model.decoder.mid.attn_1.q.weight"].shape == (8 * levels, 8 * levels, 1, 1)


def test_file_with_linear_attention_weights_loads():
    """Some re-saved files already hold the attention weights as linears (2-d); those load too."""
    vae = _tiny()
    sd = random_state_dict(vae)
    ckpt = {k: (v[:, :, 0, 0] if v.ndim == 4 and ".attn_1." in k else v)
            for k, v in to_checkpoint("sd1", "vae", sd, vae.config).items()}
    assert_exact(build(to_diffusers_recipes("sd1", "vae", sd, vae.config, ckpt), ckpt), sd)


# Names and shapes as they appear in the released single files (same VAE architecture in SD1/SD2/SDXL).
KNOWN = {"encoder.down.0.block.0.conv1.weight": (128, 128, 3, 3), "encoder.down.1.block.0.nin_shortcut.weight":
         (256, 128, 1, 1), "encoder.down.2.downsample.conv.weight": (512, 512, 3, 3),
         "encoder.mid.attn_1.proj_out.weight": (512, 512, 1, 1), "encoder.norm_out.weight": (512,),
         "decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1), "decoder.up.0.block.2.conv2.weight":
         (128, 128, 3, 3), "decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
         "decoder.mid.block_2.norm1.weight": (512,), "quant_conv.weight": (8, 8, 1, 1),
         "post_quant_conv.weight": (4, 4, 1, 1)}


@pytest.mark.parametrize("name,kind", [("sd15", "sd1"), ("sdxl", "sdxl")])
def test_full_size_maps_one_to_one(name, kind):
    from lorakit.models.meta import build_vae_on_meta

    vae = build_vae_on_meta(name)
    sd = vae.state_dict()
    prefixed = roundtrip(kind, "vae", sd, vae.config)
    assert_exact(convert_ldm_vae_checkpoint(prefixed, dict(vae.config)), sd)
    ckpt = to_checkpoint(kind, "vae", sd, vae.config)
    assert len(ckpt) == len(sd) == 248
    assert unused_keys(to_diffusers_recipes(kind, "vae", sd, vae.config, ckpt), ckpt) == []
    for key, shape in KNOWN.items():
        assert tuple(ckpt[key].shape) == shape, key


def test_missing_checkpoint_key_is_named():
    vae = _tiny()
    sd = random_state_dict(vae)
    ckpt = to_checkpoint("sd2", "vae", sd, vae.config)
    del ckpt["decoder.mid.attn_1.k.weight"]
    with pytest.raises(ValueError, match=r"decoder\.mid\.attn_1\.k\.weight"):
        to_diffusers_recipes("sd2", "vae", sd, vae.config, ckpt)


def test_key_without_counterpart_is_named():
    with pytest.raises(ValueError, match=r"encoder\.extra\.weight"):
        to_checkpoint("sd1", "vae", {"encoder.extra.weight": torch.zeros(1)}, dict(up_block_types=["x"]))


def test_without_a_config_the_up_blocks_are_counted_from_the_keys():
    vae = _tiny(3, 1)
    sd = random_state_dict(vae)
    ckpt = to_checkpoint("sd1", "vae", sd, {})  # a config without up_block_types
    assert ckpt.keys() == to_checkpoint("sd1", "vae", sd, vae.config).keys()
    # the decoder's first up block (diffusers up_blocks.0, lowest resolution) is LDM up.2 of 3, the last up.0
    assert torch.equal(ckpt["decoder.up.2.block.0.conv1.weight"], sd["decoder.up_blocks.0.resnets.0.conv1.weight"])
    assert torch.equal(ckpt["decoder.up.0.block.0.conv1.weight"], sd["decoder.up_blocks.2.resnets.0.conv1.weight"])
    assert_exact(build(to_diffusers_recipes("sd1", "vae", sd, {}, ckpt), ckpt), sd)
