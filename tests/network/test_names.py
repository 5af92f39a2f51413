"""Adapter names on full-size SD1.5 / SD2.1 / SDXL (meta device): kohya's default target counts, exact
names from real kohya files, diffusers <-> SGM paths checked against diffusers' own LDM converter, and
name lookup in both styles."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from lorakit.network import names as N
from lorakit.network.names import (
    NameIndex,
    adapter_name,
    clip_model_path,
    clip_name_path,
    diffusers_to_ldm,
    ldm_to_diffusers,
    sdxl_diffusers_to_sgm,
    sdxl_sgm_to_diffusers,
    split_key,
)

from . import kohya_default_targets, meta_model

# (unet, text-encoder modules) of sd-scripts' LoRA with its default targets
EXPECTED_COUNTS = {"sd15": (192, 72), "sd21": (192, 138), "sdxl": (722, 264)}


# ---------------------------------------------------------------------------------------- basics


def test_bundled_configs_build_the_published_models():
    """The offline configs give the published parameter counts (U-Net; CLIP-L, OpenCLIP-H, OpenCLIP-bigG)."""
    from lorakit.models.configs import MODELS, components, config_dir, load_config

    assert MODELS == ("sd15", "sd21", "sdxl", "tiny-sd", "tiny-sdxl")  # the last two: lorakit's demo models
    assert config_dir("SD1.5") == config_dir("sd15") and config_dir("sdxl-base-1.0").name == "sdxl"
    assert components("sdxl") == ["scheduler", "text_encoder", "text_encoder_2", "unet", "vae"]
    assert load_config("sd21", "scheduler")["prediction_type"] == "v_prediction"
    assert load_config("sdxl", "model_index")["_class_name"] == "StableDiffusionXLPipeline"
    with pytest.raises(ValueError):
        config_dir("sd3")
    sizes = {"sd15": (859_520_964, [123_060_480]), "sd21": (865_910_724, [340_387_840]),
             "sdxl": (2_567_463_684, [123_060_480, 694_659_840])}
    for name, (unet_size, te_sizes) in sizes.items():
        unet, tes = meta_model(name)
        assert next(unet.parameters()).is_meta
        assert sum(p.numel() for p in unet.parameters()) == unet_size
        assert [sum(p.numel() for p in te.parameters()) for te in tes] == te_sizes
        assert all(next(te.parameters()).dtype == torch.float32 for te in tes)
    assert [type(te).__name__ for te in meta_model("sdxl")[1]] == ["CLIPTextModel", "CLIPTextModelWithProjection"]


def test_adapter_name_and_split_key():
    path = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    expected = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert adapter_name("lora_unet_", path) == expected
    assert adapter_name("lora_unet", path) == expected
    assert adapter_name("lycoris", "0.fc") == "lycoris_0_fc"
    assert adapter_name("lycoris_", "") == "lycoris_"  # LyCORIS: f"{prefix}_{name}"
    with pytest.raises(ValueError):
        adapter_name("", path)
    assert split_key(expected + ".lora_down.weight") == (expected, "lora_down.weight")
    assert split_key(expected + ".alpha") == (expected, "alpha")
    assert split_key(expected) == (expected, "")


def test_clip_paths_keep_text_model():
    assert clip_name_path("encoder.layers.0.mlp.fc1") == "text_model.encoder.layers.0.mlp.fc1"
    assert clip_name_path("embeddings.token_embedding") == "text_model.embeddings.token_embedding"
    assert clip_name_path("final_layer_norm") == "text_model.final_layer_norm"
    # transformers 4 CLIPTextModel and CLIPTextModelWithProjection already have it
    assert clip_name_path("text_model.encoder.layers.0.mlp.fc1") == "text_model.encoder.layers.0.mlp.fc1"
    assert clip_name_path("text_projection") == "text_projection"

    _, (te,) = meta_model("sd15")
    assert not hasattr(te, "text_model")  # transformers 5: the modules moved up one level
    assert dict(te.named_modules())["encoder.layers.0.mlp.fc1"] is not None
    assert clip_model_path("text_model.encoder.layers.0.mlp.fc1", te) == "encoder.layers.0.mlp.fc1"

    _, (_, te2) = meta_model("sdxl")
    assert isinstance(te2.text_model, torch.nn.Module)  # CLIPTextModelWithProjection keeps text_model
    assert clip_model_path("text_model.encoder.layers.0.mlp.fc1", te2) == "text_model.encoder.layers.0.mlp.fc1"


def test_prefixes_and_arch():
    assert N.text_encoder_prefixes("sd1") == ("lora_te_",)
    assert N.text_encoder_prefixes("sd2") == ("lora_te_",)
    assert N.text_encoder_prefixes("sdxl") == ("lora_te1_", "lora_te2_")
    for name, arch in (("sd15", "sd1"), ("sd21", "sd2"), ("sdxl", "sdxl")):
        unet, tes = meta_model(name)
        assert N.detect_arch(unet) == arch
        assert N.detect_arch(None, tes) == arch


# ------------------------------------------------------------------------------- kohya's names


@pytest.mark.parametrize("model", ["sd15", "sd21", "sdxl"])
def test_kohya_default_target_counts(model):
    unet, tes = meta_model(model)
    targets = kohya_default_targets(unet, tes)
    counts = Counter("unet" if c == "unet" else "te" for c, _ in targets)
    assert (counts["unet"], counts["te"]) == EXPECTED_COUNTS[model]
    index = NameIndex.for_sd(unet, tes)
    names = [index.name_of(c, p) for c, p in targets]
    assert len(set(names)) == len(names)
    # every written name resolves back to its module
    for (c, p), name in zip(targets, names):
        t = index[name]
        assert (t.component, t.path) == (c, p)


KNOWN_NAMES = {
    "sd15": {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q":
            ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"),
        "lora_unet_down_blocks_0_attentions_0_proj_in": ("unet", "down_blocks.0.attentions.0.proj_in"),
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k":
            ("unet", "mid_block.attentions.0.transformer_blocks.0.attn2.to_k"),
        "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_out_0":
            ("unet", "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0"),
        "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_0_proj":
            ("unet", "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.0.proj"),
        "lora_unet_up_blocks_3_attentions_2_proj_out": ("unet", "up_blocks.3.attentions.2.proj_out"),
        "lora_te_text_model_encoder_layers_0_mlp_fc1": ("text_encoder", "encoder.layers.0.mlp.fc1"),
        "lora_te_text_model_encoder_layers_11_self_attn_out_proj":
            ("text_encoder", "encoder.layers.11.self_attn.out_proj"),
    },
    "sd21": {
        "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_2":
            ("unet", "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.2"),
        "lora_te_text_model_encoder_layers_22_mlp_fc2": ("text_encoder", "encoder.layers.22.mlp.fc2"),
    },
    "sdxl": {
        "lora_te1_text_model_encoder_layers_0_self_attn_k_proj":
            ("text_encoder", "encoder.layers.0.self_attn.k_proj"),
        "lora_te2_text_model_encoder_layers_31_mlp_fc2":
            ("text_encoder_2", "text_model.encoder.layers.31.mlp.fc2"),
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q":
            ("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"),
        "lora_unet_input_blocks_8_1_transformer_blocks_9_ff_net_0_proj":
            ("unet", "down_blocks.2.attentions.1.transformer_blocks.9.ff.net.0.proj"),
        "lora_unet_middle_block_1_proj_in": ("unet", "mid_block.attentions.0.proj_in"),
        "lora_unet_middle_block_1_transformer_blocks_9_attn2_to_out_0":
            ("unet", "mid_block.attentions.0.transformer_blocks.9.attn2.to_out.0"),
        "lora_unet_output_blocks_0_1_transformer_blocks_0_attn1_to_k":
            ("unet", "up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"),
        "lora_unet_output_blocks_5_1_proj_out": ("unet", "up_blocks.1.attentions.2.proj_out"),
        # LoCon (conv / resnet) names of kohya's SDXL files
        "lora_unet_output_blocks_2_2_conv": ("unet", "up_blocks.0.upsamplers.0.conv"),
        "lora_unet_output_blocks_5_2_conv": ("unet", "up_blocks.1.upsamplers.0.conv"),
        "lora_unet_input_blocks_3_0_op": ("unet", "down_blocks.0.downsamplers.0.conv"),
        "lora_unet_input_blocks_6_0_op": ("unet", "down_blocks.1.downsamplers.0.conv"),
        "lora_unet_input_blocks_1_0_in_layers_2": ("unet", "down_blocks.0.resnets.0.conv1"),
        "lora_unet_input_blocks_1_0_emb_layers_1": ("unet", "down_blocks.0.resnets.0.time_emb_proj"),
        "lora_unet_input_blocks_4_0_skip_connection": ("unet", "down_blocks.1.resnets.0.conv_shortcut"),
        "lora_unet_middle_block_2_out_layers_3": ("unet", "mid_block.resnets.1.conv2"),
        "lora_unet_output_blocks_8_0_out_layers_3": ("unet", "up_blocks.2.resnets.2.conv2"),
        "lora_unet_time_embed_0": ("unet", "time_embedding.linear_1"),
        "lora_unet_label_emb_0_2": ("unet", "add_embedding.linear_2"),
        "lora_unet_input_blocks_0_0": ("unet", "conv_in"),
        "lora_unet_out_2": ("unet", "conv_out"),
    },
}


@pytest.mark.parametrize("model", ["sd15", "sd21", "sdxl"])
def test_known_kohya_names(model):
    unet, tes = meta_model(model)
    index = NameIndex.for_sd(unet, tes)
    modules = {"unet": dict(unet.named_modules())}
    for k, te in enumerate(tes):
        modules[("text_encoder", "text_encoder_2")[k]] = dict(te.named_modules())
    for name, (component, path) in KNOWN_NAMES[model].items():
        target = index.find(name)
        assert target is not None, name
        assert (target.component, target.path) == (component, path), name
        assert target.module is modules[component][path]
        assert index.name_of(component, path) == name  # and it is the name lorakit writes
        assert index.find(name + ".lora_down.weight") is target
        assert name in index


def test_kohya_names_on_default_targets_exact():
    """The full kohya name sets, summarised: SDXL U-Net names are SGM-style, per block as kohya writes."""
    unet, tes = meta_model("sdxl")
    index = NameIndex.for_sd(unet, tes)
    names = [index.name_of(c, p) for c, p in kohya_default_targets(unet, tes)]
    per_block = Counter("_".join(n.split("_")[2:5]) for n in names if n.startswith("lora_unet_"))
    assert per_block == {
        "input_blocks_4": 22, "input_blocks_5": 22, "input_blocks_7": 102, "input_blocks_8": 102,
        "middle_block_1": 102,
        "output_blocks_0": 102, "output_blocks_1": 102, "output_blocks_2": 102,
        "output_blocks_3": 22, "output_blocks_4": 22, "output_blocks_5": 22,
    }
    te = Counter(n.split("_text_model_")[0] for n in names if not n.startswith("lora_unet_"))
    assert te == {"lora_te1": 72, "lora_te2": 192}
    assert all("_text_model_encoder_layers_" in n for n in names if n.startswith("lora_te"))

    unet, tes = meta_model("sd15")
    index = NameIndex.for_sd(unet, tes)
    names = [index.name_of(c, p) for c, p in kohya_default_targets(unet, tes)]
    per_block = Counter("_".join(n.split("_")[2:6]) for n in names if n.startswith("lora_unet_"))
    assert per_block == {
        **{f"down_blocks_{i}_attentions": 24 for i in range(3)},
        "mid_block_attentions_0": 12,
        **{f"up_blocks_{i}_attentions": 36 for i in range(1, 4)},
    }
    assert sum(n.startswith("lora_te_text_model_encoder_layers_") for n in names) == 72


def test_name_styles_resolve_to_the_same_module():
    for model in ("sd15", "sdxl"):
        unet, tes = meta_model(model)
        layout = N.SDXL_LAYOUT if model == "sdxl" else N.SD_LAYOUT
        index = NameIndex.for_sd(unet, tes)
        for component, path in kohya_default_targets(unet, tes):
            if component == "unet":
                by_diffusers = index.find(adapter_name("lora_unet_", path))
                by_ldm = index.find(adapter_name("lora_unet_", diffusers_to_ldm(path, layout)))
                assert by_diffusers is by_ldm is not None
                assert by_diffusers.path == path
            else:
                prefix = index.name_of(component, path).split("_text_model_")[0]
                assert index.find(f"{prefix}_{path.replace('.', '_')}").path == path
    # diffusers-style primary names on request
    unet, tes = meta_model("sdxl")
    index = NameIndex.for_sd(unet, tes, style="diffusers")
    assert index.name_of("unet", "down_blocks.1.attentions.0.proj_in") == "lora_unet_down_blocks_1_attentions_0_proj_in"
    assert index.find("lora_unet_input_blocks_4_1_proj_in").path == "down_blocks.1.attentions.0.proj_in"


def test_unknown_names():
    unet, tes = meta_model("sdxl")
    index = NameIndex.for_sd(unet, tes)
    assert index.find("lora_unet_input_blocks_9_1_proj_in") is None
    assert index.find("lora_te_text_model_encoder_layers_0_mlp_fc1") is None  # SD1 prefix on SDXL
    assert "lora_unet_nothing" not in index
    with pytest.raises(KeyError):
        index["lora_unet_nothing.alpha"]
    found, missing = index.resolve_keys([
        "lora_unet_middle_block_1_proj_in.lora_down.weight",
        "lora_unet_middle_block_1_proj_in.alpha",
        "lora_unet_bogus.alpha",
    ])
    assert list(found) == ["lora_unet_middle_block_1_proj_in"] and missing == ["lora_unet_bogus"]


def test_find_module_and_generic_prefix():
    unet, tes = meta_model("sd15")
    t = N.find_module("lora_te_text_model_encoder_layers_3_self_attn_q_proj.lora_up.weight", unet, tes)
    assert t.component == "text_encoder" and t.path == "encoder.layers.3.self_attn.q_proj"
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1)))
    index = NameIndex.for_model(model)
    assert index.name_of("model", "1.0") == "lycoris_1_0"
    assert index.find("lycoris_1_0").module is model[1][0]
    assert index.find("lycoris_0").module is model[0]


# ------------------------------------------------------------------------------ diffusers <-> SGM


def test_sdxl_examples():
    pairs = {
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": "input_blocks.4.1.transformer_blocks.0.attn1.to_q",
        "down_blocks.1.attentions.1.proj_out": "input_blocks.5.1.proj_out",
        "down_blocks.2.attentions.0.norm": "input_blocks.7.1.norm",
        "down_blocks.0.resnets.0": "input_blocks.1.0",
        "down_blocks.0.resnets.1.norm2": "input_blocks.2.0.out_layers.0",
        "down_blocks.0.resnets.1.dropout": "input_blocks.2.0.out_layers.2",
        "down_blocks.0.downsamplers.0": "input_blocks.3.0",
        "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
        "down_blocks.1.downsamplers.0.conv": "input_blocks.6.0.op",
        "down_blocks.2.resnets.1.conv1": "input_blocks.8.0.in_layers.2",
        "mid_block.resnets.0.norm1": "middle_block.0.in_layers.0",
        "mid_block.attentions.0": "middle_block.1",
        "mid_block.resnets.1.time_emb_proj": "middle_block.2.emb_layers.1",
        "up_blocks.0.resnets.0.conv_shortcut": "output_blocks.0.0.skip_connection",
        "up_blocks.0.attentions.2.transformer_blocks.9.ff.net.2": "output_blocks.2.1.transformer_blocks.9.ff.net.2",
        "up_blocks.0.upsamplers.0.conv": "output_blocks.2.2.conv",
        "up_blocks.1.upsamplers.0": "output_blocks.5.2",
        "up_blocks.2.resnets.2.conv2": "output_blocks.8.0.out_layers.3",
        "conv_in": "input_blocks.0.0",
        "time_embedding": "time_embed",
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.act": "time_embed.1",
        "add_embedding.linear_2": "label_emb.0.2",
        "add_embedding": "label_emb.0",
        "conv_norm_out": "out.0",
        "conv_act": "out.1",
        "conv_out": "out.2",
    }
    for d, s in pairs.items():
        assert sdxl_diffusers_to_sgm(d) == s, d
        assert sdxl_sgm_to_diffusers(s) == d, s
    # SD1/SD2: upsampler of an up block without attentions sits at .1
    assert diffusers_to_ldm("up_blocks.0.upsamplers.0.conv") == "output_blocks.2.1.conv"
    assert diffusers_to_ldm("up_blocks.2.upsamplers.0.conv") == "output_blocks.8.2.conv"
    assert diffusers_to_ldm("down_blocks.0.attentions.1.proj_in") == "input_blocks.2.1.proj_in"
    assert diffusers_to_ldm("down_blocks.2.downsamplers.0.conv") == "input_blocks.9.0.op"
    assert diffusers_to_ldm("down_blocks.3.resnets.1") == "input_blocks.11.0"
    assert ldm_to_diffusers("output_blocks.11.1.proj_out") == "up_blocks.3.attentions.2.proj_out"


@pytest.mark.parametrize("path", [
    "down_blocks.0.attentions.0",          # SDXL's first down block has no attention
    "down_blocks.2.downsamplers.0",        # nor its last a downsampler
    "up_blocks.2.upsamplers.0.conv",       # last up block has no upsampler
    "up_blocks.2.attentions.0",
    "down_blocks.3.resnets.0",
    "down_blocks.0.resnets.2",
    "down_blocks.0.resnets.0.nonlinearity",  # one SiLU module used three times; three modules in SGM
    "down_blocks.0", "down_blocks.0.resnets", "mid_block", "up_blocks",
    "time_proj", "add_time_proj", "", "nonsense.0",
])
def test_sdxl_diffusers_paths_without_counterpart(path):
    with pytest.raises(ValueError):
        sdxl_diffusers_to_sgm(path)


@pytest.mark.parametrize("path", [
    "input_blocks.1.1", "input_blocks.9.0", "input_blocks.6.1", "input_blocks.3.0.conv",
    "output_blocks.8.2.conv", "output_blocks.9.0", "output_blocks.7.1", "output_blocks.2.3.conv",
    "middle_block.3", "label_emb", "label_emb.1", "out", "out.3", "time_embed.3",
    "input_blocks.4", "input_blocks.01.0", "input_blocks.1.0.in_layers.1", "input_blocks.1.0.in_layers",
])
def test_sdxl_sgm_paths_without_counterpart(path):
    with pytest.raises(ValueError):
        sdxl_sgm_to_diffusers(path)


def test_sdxl_every_module_round_trips():
    unet, _ = meta_model("sdxl")
    mapped, unmapped = {}, []
    for path, module in unet.named_modules():
        try:
            sgm = sdxl_diffusers_to_sgm(path)
        except ValueError:
            unmapped.append((path, type(module).__name__))
            continue
        assert sdxl_sgm_to_diffusers(sgm) == path
        mapped[path] = sgm
    assert len(set(mapped.values())) == len(mapped)  # injective
    # everything holding parameters, and every adapter target, has a counterpart
    for path, module in unet.named_modules():
        if any(True for _ in module.parameters(recurse=False)):
            assert path in mapped, path
    # what has none: the root, containers spanning several SGM blocks, parameter-free Timesteps and the
    # resnets' shared SiLU
    kinds = Counter(kind for _, kind in unmapped)
    assert set(kinds) == {"UNet2DConditionModel", "ModuleList", "DownBlock2D", "CrossAttnDownBlock2D",
                          "UNetMidBlock2DCrossAttn", "CrossAttnUpBlock2D", "UpBlock2D", "Timesteps", "SiLU"}
    assert kinds["SiLU"] == 17 and kinds["Timesteps"] == 2  # 17 resnets; time_proj, add_time_proj
    # and every SGM path maps back into the model
    modules = dict(unet.named_modules())
    for sgm in mapped.values():
        assert sdxl_sgm_to_diffusers(sgm) in modules


@pytest.mark.parametrize("model", ["sd15", "sd21", "sdxl"])
def test_ldm_map_agrees_with_diffusers_converter(model):
    """diffusers' own single-file converter turns our LDM keys back into exactly the U-Net's keys."""
    convert = pytest.importorskip("diffusers.loaders.single_file_utils").convert_ldm_unet_checkpoint
    unet, _ = meta_model(model)
    layout = N.UNetLayout.from_config(unet.config)
    assert layout == (N.SDXL_LAYOUT if model == "sdxl" else N.SD_LAYOUT)
    keys = list(unet.state_dict())
    checkpoint = {}
    for key in keys:
        module, _, leaf = key.rpartition(".")
        checkpoint[f"model.diffusion_model.{diffusers_to_ldm(module, layout)}.{leaf}"] = key
    converted = convert(checkpoint, dict(unet.config))
    assert converted == {k: k for k in keys}


def test_a_model_that_is_one_layer_names_its_adapter_as_lycoris_does(tmp_path):
    """LyCORIS' wrapper.py names the root module f"{prefix}_{name}" = "lycoris_" (lorakit wrote "lycoris", which
    neither loader matched to the other's file); a file of the earlier name still loads."""
    import torch
    from torch import nn

    from lorakit import create_network, load_network
    from lorakit.formats.safetensors_io import save_file

    lycoris = pytest.importorskip("lycoris")
    layer = nn.Linear(4, 4)
    net = create_network(layer, algo="lora", dim=2)
    with torch.no_grad():
        dict(net.adapters())["lycoris_"].lora_up.normal_()
    net.save(tmp_path / "root.safetensors")
    assert sorted(net.state_dict()) == ["lycoris_.alpha", "lycoris_.lora_down.weight", "lycoris_.lora_up.weight"]
    loaded, _ = lycoris.create_lycoris_from_weights(1.0, str(tmp_path / "root.safetensors"), layer)
    assert len(loaded.loras) == 1
    earlier = {k.replace("lycoris_.", "lycoris."): v for k, v in net.state_dict().items()}
    save_file(earlier, tmp_path / "earlier.safetensors")
    assert list(load_network(nn.Linear(4, 4), tmp_path / "earlier.safetensors").entries) == ["lycoris_"]


def test_a_file_of_another_prefix_names_the_prefix_option(tmp_path):
    """A generic network saved with a preset's lora_prefix loads with load_network(..., prefix=...): the error for
    its unmatched names says so."""
    from torch import nn

    from lorakit import create_network, load_network

    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    create_network(model, algo="lora", dim=2, preset={"lora_prefix": "mynet"}).save(tmp_path / "n.safetensors")
    with pytest.raises(ValueError, match=r"names start with 'mynet_': .* pass prefix='mynet'"):
        load_network(model, tmp_path / "n.safetensors")
    assert len(load_network(model, tmp_path / "n.safetensors", prefix="mynet").entries) == 2
