"""unet_paths.ldm_to_diffusers accepts exactly the LDM/SGM module paths that diffusers_to_ldm produces: every
path it maps goes back to itself, and paths of modules that do not exist (an upsampler slot in a block's first
layers, a resnet past layers_per_block) are refused instead of being folded onto a real module."""

from __future__ import annotations

import itertools

import pytest

from lorakit.formats.unet_paths import SD_LAYOUT, SDXL_LAYOUT, diffusers_to_ldm, ldm_to_diffusers

_RESTS = ["", "conv", "op", "proj_in", "in_layers.0", "out_layers.3", "skip_connection",
          "transformer_blocks.0.attn1.to_q"]


def _ldm_paths():
    for head, k, s, rest in itertools.product(["input_blocks", "output_blocks"], range(14), range(4), _RESTS):
        yield ".".join(p for p in (head, str(k), str(s), rest) if p)
    for m, rest in itertools.product(range(4), _RESTS):
        yield ".".join(p for p in ("middle_block", str(m), rest) if p)


@pytest.mark.parametrize("layout", [SD_LAYOUT, SDXL_LAYOUT], ids=["sd", "sdxl"])
def test_every_accepted_ldm_path_round_trips(layout):
    accepted = 0
    for path in _ldm_paths():
        try:
            diffusers = ldm_to_diffusers(path, layout)
        except ValueError:
            continue
        accepted += 1
        assert diffusers_to_ldm(diffusers, layout) == path, (path, diffusers)
    assert accepted > 100


@pytest.mark.parametrize("path,layout,expected", [
    ("output_blocks.2.1.conv", SD_LAYOUT, "up_blocks.0.upsamplers.0.conv"),  # block 0 has no attention
    ("output_blocks.5.2.conv", SD_LAYOUT, "up_blocks.1.upsamplers.0.conv"),
    ("output_blocks.8.2.conv", SD_LAYOUT, "up_blocks.2.upsamplers.0.conv"),
    ("output_blocks.2.2.conv", SDXL_LAYOUT, "up_blocks.0.upsamplers.0.conv"),
    ("output_blocks.5.2.conv", SDXL_LAYOUT, "up_blocks.1.upsamplers.0.conv"),
    ("input_blocks.3.0.op", SD_LAYOUT, "down_blocks.0.downsamplers.0.conv"),
    ("input_blocks.4.1.proj_in", SD_LAYOUT, "down_blocks.1.attentions.0.proj_in"),
])
def test_samplers_and_attentions_written_out(path, layout, expected):
    assert ldm_to_diffusers(path, layout) == expected
    assert diffusers_to_ldm(expected, layout) == path


@pytest.mark.parametrize("path,layout", [
    ("output_blocks.0.1.conv", SD_LAYOUT),  # SD up block 0: resnets only, its upsampler is output_blocks.2.1
    ("output_blocks.1.1.conv", SD_LAYOUT),
    ("output_blocks.3.2.conv", SD_LAYOUT),  # up block 1's upsampler is only after its last resnet (5.2)
    ("output_blocks.11.2.conv", SD_LAYOUT),  # the last up block has no upsampler
    ("output_blocks.6.1.conv", SDXL_LAYOUT),  # SDXL up block 2: no attention, no upsampler
])
def test_paths_of_modules_that_do_not_exist_are_refused(path, layout):
    with pytest.raises(ValueError):
        ldm_to_diffusers(path, layout)


@pytest.mark.parametrize("config,label", [
    ({"addition_embed_type": "text_time"}, "add_embedding"),  # SDXL
    ({"class_embed_type": "projection"}, "class_embedding"),  # a TimestepEmbedding of a projected class vector
    ({"class_embed_type": "timestep"}, "class_embedding"),
    ({}, None),
])
def test_label_embedding_of_a_config(config, label):
    from lorakit.formats.unet_paths import UNetLayout

    base = {"down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"]}
    layout = UNetLayout.from_config({**base, **config})
    assert layout.label_emb == label
    if label is None:
        with pytest.raises(ValueError):
            ldm_to_diffusers("label_emb.0.0", layout)
    else:
        assert diffusers_to_ldm(f"{label}.linear_1", layout) == "label_emb.0.0"
        assert ldm_to_diffusers("label_emb.0.2", layout) == f"{label}.linear_2"
