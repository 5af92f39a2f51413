"""peft_layout's rules checked against independent references: which U-Net module paths exist in SD1.5 and SDXL
(the full-size models, both name styles), PEFT's own LoKr factorisation and pattern matching, and the shapes PEFT's
layers build under the config kohya_to_peft writes."""

from __future__ import annotations

import copy
import functools
import json

import pytest
import torch

from lorakit.formats.peft_layout import (LayoutError, _peft_factorization, detect_layout, guess_arch, kohya_to_peft,
                                         peft_to_kohya, rename_unet)
from lorakit.formats.unet_paths import SD_LAYOUT, SDXL_LAYOUT, diffusers_to_ldm

# ---------------------------------------------------------------------------------------------------------
# the architecture a file's U-Net names tell


@functools.lru_cache(maxsize=None)
def _unet_paths(model: str) -> frozenset[str]:
    """The path of every Linear and Conv2d of the full-size U-Net (the modules adapters sit on), in diffusers and in
    LDM/SGM form."""
    from lorakit.models.meta import build_on_meta

    layout = SD_LAYOUT if model == "sd15" else SDXL_LAYOUT
    unet, _ = build_on_meta(model)
    paths = set()
    for p, m in unet.named_modules():
        if not isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        paths.add(p)
        try:
            paths.add(diffusers_to_ldm(p, layout))
        except ValueError:
            pass
    return frozenset(paths)


# SD1.5's LDM Upsample conv of output block 2: a path SDXL lacks that guess_arch once took for SDXL
_SD1_UPSAMPLER_2 = "output_blocks.2.1.conv"


def test_a_unet_path_tells_only_the_architecture_it_exists_in():
    """guess_arch decides from single module paths: a path of one architecture only (by the real full-size models)
    gives that architecture or nothing, a path both have gives nothing; the blocks that hold attentions or resnets
    in one of them only tell it."""
    sd1, sdxl = _unet_paths("sd15"), _unet_paths("sdxl")
    for own, paths, other in (("sd1", sd1, sdxl), ("sdxl", sdxl, sd1)):
        for p in sorted(paths - other):
            if p == _SD1_UPSAMPLER_2:
                continue
            assert guess_arch([p], set()) in (own, None), p
    for p in sorted(sd1 & sdxl):
        assert guess_arch([p], set()) is None, p
    telling = {
        "sd1": ["input_blocks.1.1.proj_in", "input_blocks.2.1.proj_in", "input_blocks.9.0.op",
                "input_blocks.10.0.in_layers.2",
                "input_blocks.11.0.out_layers.3", "output_blocks.9.1.proj_in", "output_blocks.11.1.proj_out",
                "down_blocks.0.attentions.0.proj_in", "down_blocks.3.resnets.0.conv1",
                "up_blocks.2.attentions.0.proj_in", "up_blocks.3.attentions.2.proj_out"],
        "sdxl": ["output_blocks.0.1.proj_in", "output_blocks.1.1.transformer_blocks.0.attn1.to_q",
                 "output_blocks.2.1.proj_out", "up_blocks.0.attentions.0.proj_in", "add_embedding.linear_1",
                 "label_emb.0.0"],
    }
    for arch, paths in telling.items():
        for p in paths:
            assert p in (sd1 if arch == "sd1" else sdxl), p  # a real module path of that model
            assert guess_arch([p], set()) == arch, p
    assert guess_arch(["input_blocks.8.1.proj_in"], set()) is None  # SDXL has input block 8 too
    assert guess_arch([], {"text_encoder", "text_encoder_2"}) == "sdxl"  # a second text encoder is SDXL's


def test_sd1_output_block_2_upsampler_is_not_taken_for_sdxl():
    """SD1.5's output_blocks.2 is [ResBlock, Upsample]: output_blocks.2.1.conv exists in SD1 only (SDXL's
    output_blocks.2.1 is a SpatialTransformer, with no .conv), so it cannot tell SDXL. An OMI SD1 LoCon file whose
    first telling key is that conv is read as SDXL (clip_l -> lora_te1_, SDXL U-Net map)."""
    assert _SD1_UPSAMPLER_2 in _unet_paths("sd15") and _SD1_UPSAMPLER_2 not in _unet_paths("sdxl")
    assert guess_arch([_SD1_UPSAMPLER_2], set()) in ("sd1", None)


def _lora(name, out_dim=8, in_dim=8, rank=2):
    return {f"{name}.lora_down.weight": torch.ones(rank, in_dim), f"{name}.lora_up.weight": torch.ones(out_dim, rank),
            f"{name}.alpha": torch.tensor(1.0)}


def test_kohya_style_follows_the_architecture_the_names_tell():
    """sd-scripts names SDXL's U-Net modules by the SGM paths and SD1/SD2's by diffusers' ones; a file tells SDXL
    by lora_te1_/lora_te2_ names, or, where no module path tells, by SGM names at all (kohya writes them only
    for SDXL). rename_unet(style "kohya") then gives the SGM name of a module both architectures have."""
    te1 = {**_lora("lora_te1_text_model_encoder_layers_0_mlp_fc1"),
           **_lora("lora_unet_down_blocks_1_attentions_0_proj_in")}
    assert {k.split(".")[0] for k in rename_unet(te1, "kohya")} == {
        "lora_te1_text_model_encoder_layers_0_mlp_fc1", "lora_unet_input_blocks_4_1_proj_in"}
    sgm = _lora("lora_unet_input_blocks_4_1_proj_in")
    assert guess_arch(["input_blocks.4.1.proj_in"], set()) is None  # SD1 and SDXL both have it
    assert set(rename_unet(sgm, "kohya")) == set(sgm)
    assert {k.split(".")[0] for k in rename_unet(sgm, "kohya", arch="sd1")} == {
        "lora_unet_down_blocks_1_attentions_0_proj_in"}
    sd1 = _lora("lora_te_text_model_encoder_layers_0_mlp_fc1")
    assert set(rename_unet({**sd1, **_lora("lora_unet_down_blocks_1_attentions_0_proj_in")}, "kohya")) == \
        set(sd1) | set(_lora("lora_unet_down_blocks_1_attentions_0_proj_in"))


@pytest.mark.parametrize("given,arch", [("sd1", "sd1"), ("SD1.5", "sd1"), ("sd2", "sd1"), ("SD-2.1", "sd1"),
                                        ("sd", "sd1"), ("sdxl", "sdxl"), ("XL", "sdxl")])
def test_arch_names_as_the_cli_takes_them(given, arch):
    """--arch takes sd1, sd2 (SD2 shares SD1's U-Net layout and name rules), sdxl, in any case, with . and -."""
    t = _lora("lora_unet_input_blocks_4_1_proj_in")
    want = "lora_unet_input_blocks_4_1_proj_in" if arch == "sdxl" else "lora_unet_down_blocks_1_attentions_0_proj_in"
    assert {k.split(".")[0] for k in rename_unet(t, "kohya", arch=given)} == {want}
    with pytest.raises(LayoutError, match=r"arch='sd3': expected sd1, sd2 or sdxl"):
        rename_unet(t, "kohya", arch="sd3")


def test_a_unet_only_omi_file_is_told_from_a_diffusers_file():
    """OneTrainer's OMI keys and diffusers' share the unet. prefix: OMI's carry the SGM path (input_blocks...),
    diffusers' the diffusers path. A U-Net-only file of either is told by its paths, not by a clip_l./clip_g. key."""
    omi = ["unet.input_blocks.4.1.proj_in.lora_down.weight", "unet.input_blocks.4.1.proj_in.lora_up.weight",
           "unet.input_blocks.4.1.proj_in.alpha"]
    diffusers = ["unet.down_blocks.1.attentions.0.proj_in.lora_A.weight",
                 "unet.down_blocks.1.attentions.0.proj_in.lora_B.weight"]
    assert detect_layout(omi) == "omi"
    assert detect_layout(diffusers) == "peft"
    assert detect_layout(["clip_l.text_model.encoder.layers.0.mlp.fc1.lora_down.weight"]) == "omi"


# ---------------------------------------------------------------------------------------------------------
# PEFT's own rules


def test_peft_factorization_is_peft_own():
    """PEFT's LoKr split of a dimension (peft.tuners.lokr.layer.factorization), by which kohya_to_peft picks
    decompose_factor: where it searches (factor -1, or one that does not divide the dimension) and where a factor
    divides it, which PEFT keeps as (factor, dim // factor), larger first or not (LyCORIS orders that pair)."""
    pytest.importorskip("peft")
    from peft.tuners.lokr.layer import factorization

    for dim in range(1, 300):
        for factor in [-1, *range(1, 40)]:
            assert _peft_factorization(dim, factor) == factorization(dim, factor), (dim, factor)


def _tiny_unet():
    from ..network.tiny import tiny_model

    return tiny_model("sd1")[0]


def _peft_shapes(config_cls, cfg, path):
    from peft import inject_adapter_in_model

    u = inject_adapter_in_model(config_cls(**cfg), copy.deepcopy(_tiny_unet()))
    module = u.get_submodule(path)
    return {k.split(".")[0]: tuple(v.shape) for k, v in module.state_dict().items() if k.startswith(("lokr_", "hada_"))}


def test_lokr_decompose_factor_larger_than_a_dimensions_root_gives_peft_the_files_shapes():
    """LyCORIS factor 16 on a 16-channel to_q gives w1 (1, 1), w2 (16, 16); on a 256 x 32 ff proj w1 (16, 2), w2
    (16, 16). kohya_to_peft must write a config under which PEFT builds these very shapes (or refuse the file):
    PEFT's factorization(16, 16) is (16, 1), so decompose_factor 16 builds w1 (16, 16), w2 (1, 1)."""
    pytest.importorskip("peft")
    from peft import LoKrConfig

    g = torch.Generator().manual_seed(0)
    shapes = {"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": ((1, 1), (16, 16)),
              "down_blocks.2.attentions.0.transformer_blocks.0.ff.net.0.proj": ((16, 2), (16, 16))}
    t = {}
    for path, (w1, w2) in shapes.items():
        name = "lora_unet_" + path.replace(".", "_")
        t[f"{name}.lokr_w1"], t[f"{name}.lokr_w2"] = torch.randn(*w1, generator=g), torch.randn(*w2, generator=g)
    try:
        _, meta = kohya_to_peft(t, {}, arch="sd1")
    except LayoutError:
        return  # refusing the file is right too
    cfg = {k[len("unet."):]: v for k, v in json.loads(meta["lora_adapter_metadata"]).items() if k.startswith("unet.")}
    for path, (w1, w2) in shapes.items():
        assert _peft_shapes(LoKrConfig, cfg, path) == {"lokr_w1": w1, "lokr_w2": w2}, path


def _lokr_tucker(name, rank):
    """A LyCORIS LoKr module of a 16 -> 16 3x3 conv, factors (4 x 4) kron (4 x 4): w1 whole, w2 a Tucker rank
    product (lokr_t2 (r, r, 3, 3), lokr_w2_a (r, 4), lokr_w2_b (r, 4))."""
    g = torch.Generator().manual_seed(0)
    return {f"{name}.lokr_w1": torch.randn(4, 4, generator=g),
            f"{name}.lokr_t2": torch.randn(rank, rank, 3, 3, generator=g),
            f"{name}.lokr_w2_a": torch.randn(rank, 4, generator=g),
            f"{name}.lokr_w2_b": torch.randn(rank, 4, generator=g),
            f"{name}.alpha": torch.tensor(1.0)}


def test_lokr_w2_rank_product_only_below_half_its_side_as_peft_builds_it():
    """PEFT's LoKr keeps a conv's w2 whole unless r < max(w2's sides) / 2 (LoKrLayer.update_layer: use_w2 = r >=
    max / 2): a 16 -> 16 3x3 conv splits (4 x 4) kron (4 x 4), so rank 1 is a rank product and rank 2 is whole. A
    kohya file with w2 as a rank-2 product there has no PEFT form and is refused; rank 1 converts to the shapes
    PEFT builds."""
    pytest.importorskip("peft")
    from peft import LoKrConfig

    path = "down_blocks.0.resnets.0.conv1"
    name = "lora_unet_" + path.replace(".", "_")
    base = {"target_modules": [path], "decompose_factor": -1, "alpha": 1.0, "use_effective_conv2d": True}
    assert _peft_shapes(LoKrConfig, {**base, "r": 2}, path) == {"lokr_w1": (4, 4), "lokr_w2": (4, 4, 3, 3)}
    assert _peft_shapes(LoKrConfig, {**base, "r": 1}, path) == {"lokr_w1": (4, 4), "lokr_t2": (1, 1, 3, 3),
                                                                "lokr_w2_a": (1, 4), "lokr_w2_b": (1, 4)}
    with pytest.raises(LayoutError, match=r"PEFT's LoKr would build w1 full and w2 full at rank 2"):
        kohya_to_peft(_lokr_tucker(name, 2), {}, arch="sd1")
    out, meta = kohya_to_peft(_lokr_tucker(name, 1), {}, arch="sd1")
    cfg = {k[len("unet."):]: v for k, v in json.loads(meta["lora_adapter_metadata"]).items() if k.startswith("unet.")}
    assert _peft_shapes(LoKrConfig, cfg, path) == {k.rsplit(".", 1)[1]: tuple(v.shape) for k, v in out.items()}


def test_pattern_keys_match_module_paths_as_peft_does():
    """PEFT resolves rank_pattern/alpha_pattern keys as whole dotted suffixes of a module path
    (peft.utils.other.get_pattern_key: ``(.*\\.)?key$``): a diffusers/PEFT file whose config has alpha_pattern
    {"proj": 16} scales ff.net.0.proj by 16 / r, but not time_emb_proj (its name only ends in "proj")."""
    pytest.importorskip("peft")
    from peft.utils.other import get_pattern_key

    paths = ["down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj", "down_blocks.0.resnets.0.time_emb_proj",
             "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
    t = {}
    for p in paths:
        t[f"unet.{p}.lora_A.weight"], t[f"unet.{p}.lora_B.weight"] = torch.ones(4, 8), torch.ones(8, 4)
    patterns = {"proj": 16}
    config = {"unet.peft_type": "LORA", "unet.r": 4, "unet.lora_alpha": 4, "unet.alpha_pattern": patterns,
              "unet.rank_pattern": {}, "unet.target_modules": paths}
    out, _ = peft_to_kohya(t, {"lora_adapter_metadata": json.dumps(config)}, arch="sd1")
    for p in paths:
        key = get_pattern_key(patterns.keys(), p)
        want = patterns.get(key, 4)
        assert float(out[f"lora_unet_{p.replace('.', '_')}.alpha"]) == want, p
    assert float(out["lora_unet_down_blocks_0_resnets_0_time_emb_proj.alpha"]) == 4.0


# ---------------------------------------------------------------------------------------------------------
# names and alphas on the way back


def test_text_encoder_paths_of_transformers_5_get_kohya_names_with_text_model():
    """kohya names text-encoder modules by transformers 4's paths (lora_te_text_model_encoder_...,
    lora_te_text_model_embeddings_...); a PEFT file saved from transformers 5's CLIPTextModel, which has no
    text_model level, gets the same names."""
    t = {}
    for path in ("encoder.layers.0.mlp.fc1", "embeddings.token_embedding", "text_model.encoder.layers.1.mlp.fc2"):
        t[f"text_encoder.{path}.lora_A.weight"] = torch.ones(2, 8)
        t[f"text_encoder.{path}.lora_B.weight"] = torch.ones(8, 2)
    out, _ = peft_to_kohya(t, {}, arch="sd1")
    assert {k.split(".")[0] for k in out} == {"lora_te_text_model_encoder_layers_0_mlp_fc1",
                                              "lora_te_text_model_embeddings_token_embedding",
                                              "lora_te_text_model_encoder_layers_1_mlp_fc2"}


def test_a_peft_file_without_config_or_alphas_keeps_peft_scale_of_one():
    """Without lora_adapter_metadata and .alpha keys diffusers loads a LoRA at lora_alpha = r (get_peft_kwargs),
    scale 1: each kohya alpha is its module's rank, whatever the rank."""
    t = {}
    for path, rank in (("down_blocks.0.attentions.0.proj_in", 2), ("down_blocks.0.attentions.0.proj_out", 4)):
        t[f"unet.{path}.lora_A.weight"], t[f"unet.{path}.lora_B.weight"] = torch.ones(rank, 8), torch.ones(8, rank)
    out, meta = peft_to_kohya(t, {}, arch="sd1")
    assert float(out["lora_unet_down_blocks_0_attentions_0_proj_in.alpha"]) == 2.0
    assert float(out["lora_unet_down_blocks_0_attentions_0_proj_out.alpha"]) == 4.0
    assert meta == {}


def test_a_kohya_files_stale_side_metadata_does_not_reach_the_peft_file():
    """lorakit_kohya holds what a PEFT config cannot carry for the tensors it was written with. A kohya file that
    still carries one (metadata copied from an earlier conversion) must not pass it on: the way back would drop
    the alphas it names."""
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    t = _lora(name)
    stale = {"lorakit_kohya": json.dumps({"no_alpha": [name]}), "ss_network_dim": "2"}
    peft, meta = kohya_to_peft(t, stale, arch="sd1")
    assert "lorakit_kohya" not in meta and meta["ss_network_dim"] == "2"
    back, _ = peft_to_kohya(peft, meta, arch="sd1")
    assert set(back) == set(t) and all(torch.equal(back[k], t[k]) for k in t)


def test_peft_own_files_name_the_text_encoder_by_its_module_paths(tmp_path):
    """PEFT's save_pretrained of a CLIP text model writes base_model.model.<module path> with no component: a
    text_model. (transformers 4) or encoder. (transformers 5) path is the text encoder's, and gets kohya's
    lora_te_text_model_ names; another path is the U-Net's."""
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file as st_load

    from ..network.tiny import tiny_model

    te = copy.deepcopy(tiny_model("sd1")[1][0])
    get_peft_model(te, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path)
    saved = st_load(tmp_path / "adapter_model.safetensors")
    assert saved and all(k.startswith("base_model.model.") for k in saved)
    layers = {k.split(".")[0] for k in peft_to_kohya(saved, {}, arch="sd1")[0]}
    assert layers == {f"lora_te_text_model_encoder_layers_{i}_self_attn_q_proj" for i in range(2)}
    t4 = {f"base_model.model.text_model.encoder.layers.0.self_attn.q_proj.{k}": v for k, v in
          (("lora_A.weight", torch.ones(2, 32)), ("lora_B.weight", torch.ones(32, 2)))}
    unet = {f"base_model.model.down_blocks.0.attentions.0.proj_in.{k}": v for k, v in
            (("lora_A.weight", torch.ones(2, 16)), ("lora_B.weight", torch.ones(16, 2)))}
    assert {k.split(".")[0] for k in peft_to_kohya({**t4, **unet}, {}, arch="sd1")[0]} == {
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj", "lora_unet_down_blocks_0_attentions_0_proj_in"}


def test_a_file_of_mixed_layouts_is_none_of_them():
    """detect_layout names a layout only when every key has it: kohya keys next to diffusers/PEFT or lycoris_ keys
    are "unknown" (no converter reads such a file whole)."""
    kohya = ["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight",
             "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight"]
    assert detect_layout(kohya) == "kohya"
    assert detect_layout(kohya + ["unet.down_blocks.0.attentions.0.proj_out.lora_A.weight"]) == "unknown"
    assert detect_layout(kohya + ["lycoris_blocks_0.lora_down.weight"]) == "unknown"
    assert detect_layout([]) == "unknown"
