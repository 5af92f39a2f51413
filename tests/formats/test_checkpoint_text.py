"""Text encoders: transformers CLIP <-> the HF-CLIP (SD1, SDXL first) and OpenCLIP (SD2, SDXL second) layouts
of single files, checked against diffusers' own converters."""

from __future__ import annotations

import pytest
import torch

from lorakit.formats.checkpoint_layout import COMPONENT_PREFIXES, to_checkpoint, to_diffusers_recipes, unused_keys

from .checkpoint_roundtrip import assert_exact, build, random_state_dict, roundtrip

transformers = pytest.importorskip("transformers")
pytest.importorskip("diffusers")
from diffusers.loaders.single_file_utils import (SD_2_TEXT_ENCODER_KEYS_TO_IGNORE,  # noqa: E402
                                                 convert_ldm_clip_checkpoint, convert_open_clip_checkpoint)

CASES = [("sd1", "text_encoder"), ("sd2", "text_encoder"), ("sdxl", "text_encoder"), ("sdxl", "text_encoder_2")]
OPENCLIP = {("sd2", "text_encoder"), ("sdxl", "text_encoder_2")}


def _tiny(component="text_encoder", layers=2):
    # projection_dim != hidden_size, so a missing transpose of text_projection cannot pass
    cfg = transformers.CLIPTextConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                                      num_attention_heads=2, max_position_embeddings=12, projection_dim=16)
    cls = transformers.CLIPTextModelWithProjection if component == "text_encoder_2" else transformers.CLIPTextModel
    with torch.device("meta"):  # keys and shapes only
        return cls(cfg)


def _reference(kind, component, model, prefixed):
    """diffusers' reading of our file, in the model's own key spelling (transformers 5's CLIPTextModel has
    no ``text_model.`` level; diffusers' converters always write it)."""
    if (kind, component) not in OPENCLIP:
        ref = convert_ldm_clip_checkpoint(prefixed)
    else:
        ref = convert_open_clip_checkpoint(model, prefixed, prefix=COMPONENT_PREFIXES[kind][component])
    keys = set(model.state_dict())
    return {k if k in keys else k.removeprefix("text_model."): v for k, v in ref.items()}


@pytest.mark.parametrize("kind,component", CASES)
def test_tiny_roundtrip_matches_diffusers_converter(kind, component):
    model = _tiny(component)
    sd = random_state_dict(model)
    prefixed = roundtrip(kind, component, sd, model.config)
    assert_exact(_reference(kind, component, model, prefixed), sd)


def test_openclip_layout_of_projection_and_fused_qkv():
    model = _tiny("text_encoder_2")
    sd = random_state_dict(model)
    ckpt = to_checkpoint("sdxl", "text_encoder_2", sd, model.config)
    assert torch.equal(ckpt["text_projection"], sd["text_projection.weight"].T)
    p = "text_model.encoder.layers.1.self_attn."
    assert torch.equal(ckpt["transformer.resblocks.1.attn.in_proj_weight"],
                       torch.cat([sd[p + "q_proj.weight"], sd[p + "k_proj.weight"], sd[p + "v_proj.weight"]]))
    assert torch.equal(ckpt["transformer.resblocks.1.attn.in_proj_bias"][32:64], sd[p + "k_proj.bias"])


def test_sd2_file_with_one_more_layer_and_projection():
    """SD2 files hold OpenCLIP's 24 layers, text_projection and logit_scale; diffusers' SD2 encoder has 23."""
    full = random_state_dict(_tiny(layers=3))
    ckpt = to_checkpoint("sd2", "text_encoder", full, None)
    ckpt["text_projection"], ckpt["logit_scale"] = torch.randn(32, 16), torch.tensor(4.6)
    model = _tiny(layers=2)
    recipes = to_diffusers_recipes("sd2", "text_encoder", model.state_dict(), model.config, ckpt)
    want = {k: v for k, v in full.items() if ".layers.2." not in k}
    assert_exact(build(recipes, ckpt), want)
    extras = [k for k in ckpt if k.startswith("transformer.resblocks.2.")] + ["text_projection", "logit_scale"]
    assert len(extras) == 14 and sorted(unused_keys(recipes, ckpt)) == sorted(extras)


def test_hf_file_without_text_model_level_loads():
    model = _tiny()
    sd = random_state_dict(model)
    ckpt = {k.removeprefix("text_model."): v for k, v in to_checkpoint("sd1", "text_encoder", sd, None).items()}
    ckpt["embeddings.position_ids"] = torch.arange(12)[None]
    recipes = to_diffusers_recipes("sd1", "text_encoder", sd, model.config, ckpt)
    assert_exact(build(recipes, ckpt), sd)
    assert unused_keys(recipes, ckpt) == ["embeddings.position_ids"]


FULL = {("sd1", "text_encoder"): ("sd15", 0), ("sd2", "text_encoder"): ("sd21", 0),
        ("sdxl", "text_encoder"): ("sdxl", 0), ("sdxl", "text_encoder_2"): ("sdxl", 1)}
# Names and shapes as they appear in the released single files.
KNOWN = {
    ("sd1", "text_encoder"): {"text_model.embeddings.token_embedding.weight": (49408, 768),
                              "text_model.encoder.layers.11.mlp.fc1.weight": (3072, 768),
                              "text_model.final_layer_norm.bias": (768,)},
    ("sd2", "text_encoder"): {"token_embedding.weight": (49408, 1024), "positional_embedding": (77, 1024),
                              "transformer.resblocks.22.attn.in_proj_weight": (3072, 1024),
                              "transformer.resblocks.22.attn.in_proj_bias": (3072,),
                              "transformer.resblocks.0.mlp.c_fc.weight": (4096, 1024), "ln_final.weight": (1024,)},
    ("sdxl", "text_encoder"): {"text_model.encoder.layers.11.self_attn.q_proj.weight": (768, 768)},
    ("sdxl", "text_encoder_2"): {"text_projection": (1280, 1280),
                                 "transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
                                 "transformer.resblocks.31.mlp.c_proj.weight": (1280, 5120)},
}


@pytest.mark.parametrize("kind,component", CASES)
def test_full_size_maps_one_to_one(kind, component):
    from lorakit.models.meta import build_text_encoders_on_meta

    name, index = FULL[kind, component]
    model = build_text_encoders_on_meta(name)[index]
    sd = model.state_dict()
    prefixed = roundtrip(kind, component, sd, model.config)
    assert_exact(_reference(kind, component, model, prefixed), sd)
    ckpt = to_checkpoint(kind, component, sd, model.config)
    fused = 4 * model.config.num_hidden_layers if (kind, component) in OPENCLIP else 0  # 6 q/k/v keys -> 2
    assert len(ckpt) == len(sd) - fused
    for key, shape in KNOWN[kind, component].items():
        assert tuple(ckpt[key].shape) == shape, key
    if kind == "sd2":
        # a released SD2 file: our unused keys are exactly what diffusers ignores, plus logit_scale
        prefix = COMPONENT_PREFIXES[kind][component]
        released = {*ckpt, "logit_scale", *(k.removeprefix(prefix) for k in SD_2_TEXT_ENCODER_KEYS_TO_IGNORE)}
        recipes = to_diffusers_recipes(kind, component, sd, model.config, released)
        assert set(unused_keys(recipes, released)) == {"logit_scale",
                                                        *(k.removeprefix(prefix) for k in SD_2_TEXT_ENCODER_KEYS_TO_IGNORE)}


def test_missing_checkpoint_key_is_named():
    model = _tiny("text_encoder_2")
    sd = random_state_dict(model)
    ckpt = to_checkpoint("sdxl", "text_encoder_2", sd, model.config)
    del ckpt["transformer.resblocks.1.attn.in_proj_bias"]
    with pytest.raises(ValueError, match=r"transformer\.resblocks\.1\.attn\.in_proj_bias"):
        to_diffusers_recipes("sdxl", "text_encoder_2", sd, model.config, ckpt)


def test_partial_qkv_is_an_error():
    sd = random_state_dict(_tiny())
    del sd["encoder.layers.0.self_attn.v_proj.weight"]
    with pytest.raises(ValueError, match="q/k/v"):
        to_checkpoint("sd2", "text_encoder", sd, None)
