"""Presets: the built-in ones, user TOML files with LyCORIS' preset keys, and the errors a bad preset gives.

Selections are checked against names computed here from the models themselves, not against lorakit's own lists.
"""

from __future__ import annotations

import copy
import logging
import os
import re

import pytest
import torch
import torch.nn as nn

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from lorakit import create_network
from lorakit.algos import OptionError
from lorakit.network.presets import (BUILTIN_DIR, Preset, builtin_presets, load_preset, preset_from_dict,
                                     preset_from_file_data)

from . import meta_model
from .sdscripts_unet import crossattention_unet, sdxl_unet
from .tiny import tiny_model

BUILTINS = ["attn-mlp", "attn-mlp-convblock", "attn-only", "full", "full-lin", "ia3", "unet-convblock-only",
            "unet-only", "unet-transformer-only"]


def counts(net):
    out = {}
    for entry in net.entries.values():
        out[entry.component] = out.get(entry.component, 0) + 1
    return out


def paths(net, component):
    return {e.path for e in net.entries.values() if e.component == component}


def by_path(net, component):
    return {e.path: net.get_submodule(n) for n, e in net.entries.items() if e.component == component}


def write(tmp_path, text, name="preset.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def under_class(model, classes, keep=lambda layer: isinstance(layer, nn.Linear) or (
        isinstance(layer, nn.Conv2d) and layer.kernel_size == (1, 1))):
    """Paths of the layers inside modules of the given classes (the way kohya and LyCORIS walk a model)."""
    out = set()
    for name, module in model.named_modules():
        if type(module).__name__ in classes:
            out |= {f"{name}.{c}" for c, child in module.named_modules() if c and keep(child)}
    return out


# ----- built-in presets ---------------------------------------------------------------------------------------------
def test_builtin_preset_list():
    assert builtin_presets() == BUILTINS


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_preset_loads(name):
    preset = load_preset(name)
    assert isinstance(preset, Preset) and preset.name == name
    data = tomllib.loads((BUILTIN_DIR / f"{name}.toml").read_text())
    assert preset == preset_from_file_data(data, name=name)
    assert preset.target_module is None  # no generic key: every layer of a generic model, as LyCORIS' default
    for key, value in data.items():
        got = getattr(preset, key)
        assert (list(got) if isinstance(got, tuple) else got) == value
    assert load_preset(BUILTIN_DIR / f"{name}.toml").name == name  # by path too
    for kind in ("sd1", "sdxl"):
        unet, tes = tiny_model(kind)
        net = create_network(unet, tes, preset=name, algo="ia3" if name == "ia3" else "lora", dim=4)
        assert len(net.names("unet")) > 0


# measured on the meta-device models with dim = conv_dim = 4 (docs/networks.md shows these numbers)
COUNTS = {
    "attn-mlp": ({"unet": 192, "text_encoder": 72}, {"unet": 722, "text_encoder": 72, "text_encoder_2": 192}),
    "attn-mlp-convblock": ({"unet": 278, "text_encoder": 72},
                           {"unet": 788, "text_encoder": 72, "text_encoder_2": 192}),
    "attn-only": ({"unet": 128, "text_encoder": 48}, {"unet": 560, "text_encoder": 48, "text_encoder_2": 128}),
    "full": ({"unet": 282, "text_encoder": 72}, {"unet": 792, "text_encoder": 72, "text_encoder_2": 192}),
    "full-lin": ({"unet": 230, "text_encoder": 72}, {"unet": 752, "text_encoder": 72, "text_encoder_2": 192}),
    "ia3": ({"unet": 80, "text_encoder": 36}, {"unet": 350, "text_encoder": 36, "text_encoder_2": 96}),
    "unet-convblock-only": ({"unet": 88}, {"unet": 68}),
    "unet-only": ({"unet": 282}, {"unet": 792}),
    "unet-transformer-only": ({"unet": 192}, {"unet": 722}),
}


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_preset_counts_on_full_size_models(name):
    for arch, expected in zip(("sd15", "sdxl"), COUNTS[name]):
        unet, tes = meta_model(arch)
        net = create_network(unet, tes, preset=name, algo="ia3" if name == "ia3" else "lora", dim=4, conv_dim=4)
        assert counts(net) == expected, arch


def test_attn_mlp_is_kohyas_set_and_the_others_relative_to_it():
    unet, tes = meta_model("sd15")
    kohya = under_class(unet, {"Transformer2DModel"})
    kohya_te = under_class(tes[0], {"CLIPAttention", "CLIPMLP"})
    nets = {name: create_network(unet, tes, preset=name, dim=4, conv_dim=4) for name in BUILTINS if name != "ia3"}
    assert paths(nets["attn-mlp"], "unet") == kohya and paths(nets["attn-mlp"], "text_encoder") == kohya_te
    assert paths(nets["unet-transformer-only"], "unet") == kohya and not nets["unet-transformer-only"].names(
        "text_encoder")
    attn = under_class(unet, {"Attention"})
    assert paths(nets["attn-only"], "unet") == attn < kohya
    assert paths(nets["attn-only"], "text_encoder") == under_class(tes[0], {"CLIPAttention"})
    resnet_lin = under_class(unet, {"ResnetBlock2D"})  # time_emb_proj and the 1x1 conv_shortcuts
    temb = {"time_embedding.linear_1", "time_embedding.linear_2"}
    assert paths(nets["full-lin"], "unet") == kohya | resnet_lin | temb
    convs = under_class(unet, {"ResnetBlock2D", "Downsample2D", "Upsample2D"}, keep=lambda m: isinstance(m, nn.Conv2d)
                        and m.kernel_size != (1, 1)) | {"conv_in", "conv_out"}
    assert paths(nets["full"], "unet") == kohya | resnet_lin | temb | convs
    assert paths(nets["unet-only"], "unet") == paths(nets["full"], "unet") and not nets["unet-only"].names(
        "text_encoder")
    assert paths(nets["unet-convblock-only"], "unet") == resnet_lin | convs
    assert paths(nets["attn-mlp-convblock"], "unet") == kohya | resnet_lin | convs - {"conv_in", "conv_out"}
    assert paths(nets["attn-mlp-convblock"], "text_encoder") == kohya_te
    assert set(create_network(unet, tes, preset="full", conv_dim=0).entries) == set(nets["full-lin"].entries)


def unet_names(net):
    return {n for n in net.names() if n.startswith("lora_unet_")}


@pytest.fixture(scope="module")
def sd_scripts_unets():
    """sd-scripts' SDXL U-Net and SD1.5's with CrossAttention, on meta, built once for the presets below (creating
    a network leaves a model as it was)."""
    return sdxl_unet(), crossattention_unet(meta_model("sd15")[0])


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_presets_select_the_same_layers_on_the_unets_sd_scripts_builds(name, sd_scripts_unets):
    """sd-scripts hands a --network_module its own U-Nets: SDXL's with the SGM module tree (time_embed.0, out.2,
    ...) and an attention class named CrossAttention, SD1/SD2's with diffusers' paths and that class name. Every
    built-in preset selects there the layers it selects on diffusers' U-Net (SDXL names are written in the SGM
    style either way, so the names must be equal)."""
    algo = "ia3" if name == "ia3" else "lora"
    unet, tes = meta_model("sdxl")
    expected = unet_names(create_network(unet, tes, preset=name, algo=algo, dim=4, conv_dim=4))
    got = unet_names(create_network(sd_scripts_unets[0], tes, preset=name, algo=algo, dim=4, conv_dim=4))
    assert got == expected and len(got) == COUNTS[name][1]["unet"]
    unet, tes = meta_model("sd15")
    expected = unet_names(create_network(unet, tes, preset=name, algo=algo, dim=4, conv_dim=4))
    got = unet_names(create_network(sd_scripts_unets[1], tes, preset=name, algo=algo, dim=4, conv_dim=4))
    assert got == expected and len(got) == COUNTS[name][0]["unet"]


def test_text_encoder_presets_cover_the_attention_classes_of_older_transformers():
    """transformers 4.38-4.47 build CLIP's attention as CLIPSdpaAttention or CLIPFlashAttention2 (subclasses of
    CLIPAttention); the built-in presets name them as kohya does, so the text encoders keep their adapters."""
    unet, tes = meta_model("sd15")
    for class_name in ("CLIPSdpaAttention", "CLIPFlashAttention2"):
        te = copy.deepcopy(tes[0])
        for module in te.modules():
            if type(module).__name__ == "CLIPAttention":
                module.__class__ = type(class_name, (type(module),), {})
        for name in ("attn-mlp", "attn-only", "full"):
            net = create_network(unet, [te], preset=name, dim=4, conv_dim=4)
            assert counts(net)["text_encoder"] == COUNTS[name][0]["text_encoder"], (class_name, name)


def test_a_preset_that_selects_nothing_in_a_component_is_reported(caplog):
    unet, tes = tiny_model("sd1")
    preset = {"unet_target_module": ["SelfAttention"], "text_encoder_target_module": ["CLIPMLP"]}
    with caplog.at_level("WARNING", logger="lorakit"):
        net = create_network(unet, tes, preset=preset)
    assert not net.names("unet") and net.names("text_encoder")
    warned = [r.getMessage() for r in caplog.records if "selects no layer" in r.getMessage()]
    assert len(warned) == 1 and "of the unet" in warned[0] and "SelfAttention" in warned[0]
    assert "Transformer2DModel" in warned[0]  # the classes the model has, to pick from


# ----- user presets with LyCORIS' keys ------------------------------------------------------------------------------
SD_PRESET = r"""
enable_conv = false
unet_target_module = ["Transformer2DModel"]
unet_target_name = ["conv_in", "time_embedding.linear_1", "down_blocks.0.resnets.0.time_emb_proj"]
text_encoder_target_module = ["CLIPMLP"]
text_encoder_target_name = ["layers.1.self_attn.q_proj"]
exclude_name = ["up_blocks\\.3\\.", "mid_block"]
"""


def test_user_preset_selects_by_class_and_name_and_excludes(tmp_path):
    unet, tes = tiny_model("sd1")
    net = create_network(unet, tes, preset=str(write(tmp_path, SD_PRESET)), dim=4)
    expected = {p for p in under_class(unet, {"Transformer2DModel"})
                if not p.startswith(("up_blocks.3.", "mid_block."))}
    # conv_in is named but is a 3x3 conv, and enable_conv is false
    expected |= {"time_embedding.linear_1", "down_blocks.0.resnets.0.time_emb_proj"}
    assert paths(net, "unet") == expected
    assert paths(net, "text_encoder") == under_class(tes[0], {"CLIPMLP"}) | {"encoder.layers.1.self_attn.q_proj"}

    with_conv = create_network(unet, tes, preset=str(write(tmp_path, SD_PRESET.replace("false", "true"))), dim=4)
    assert paths(with_conv, "unet") == expected | {"conv_in"}
    assert create_network(unet, tes, preset=str(write(tmp_path, SD_PRESET.replace("false", "true"))), dim=4,
                          conv_dim=0).names("unet") == net.names("unet")  # conv_dim 0 leaves the 3x3 convs out


def test_names_match_whole_path_suffixes_or_patterns():
    regex, glob = Preset(), Preset(use_fnmatch=True)
    path = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    for preset in (regex, glob):
        assert preset.matches(path, path)
        assert preset.matches("to_q", path) and preset.matches("attn1.to_q", path)  # a suffix at a dot
        assert not preset.matches("o_q", path) and not preset.matches("attn1.to", path)
    assert regex.matches(r"down_blocks\.0\..*to_q", path) and not regex.matches(r"blocks\.0", path)  # re.match
    assert regex.matches("down_blocks.0", path)  # a regular expression matched at the start: a path prefix too
    assert glob.matches("down_blocks.0.*.to_q", path) and not glob.matches("down_blocks.0", path)
    assert not glob.matches(r"down_blocks\.0\..*to_q", path)
    assert not regex.matches("down_blocks.[", path)  # an invalid expression matches nothing


def test_use_fnmatch_selects_the_same_layers_as_the_regex(tmp_path):
    unet, tes = tiny_model("sd1")
    regex = create_network(unet, tes, dim=4, preset={
        "unet_target_name": [r"down_blocks\.[01]\..*\.to_[qk]$", r".*ff\.net\.2"],
        "text_encoder_target_name": [r".*fc1"]})
    glob = create_network(unet, tes, dim=4, preset={
        "use_fnmatch": True, "unet_target_name": ["down_blocks.[01].*.to_[qk]", "*ff.net.2"],
        "text_encoder_target_name": ["*fc1"]})
    assert set(regex.entries) == set(glob.entries)
    inside = under_class(unet, {"Transformer2DModel"})
    assert paths(glob, "unet") == {p for p in inside if p.startswith(("down_blocks.0.", "down_blocks.1."))
                                   and p.endswith(("to_q", "to_k"))} | {p for p in inside if p.endswith("ff.net.2")}
    assert paths(glob, "text_encoder") == {f"encoder.layers.{i}.mlp.fc1" for i in range(2)}


def test_text_encoder_names_are_matched_on_the_paths_as_built():
    """transformers 5's CLIPTextModel has no .text_model (CLIPTextModelWithProjection has): a name written with
    text_model. matches only the second SDXL encoder; the suffix form matches both."""
    unet, tes = tiny_model("sdxl")
    full = create_network(unet, tes, dim=4,
                          preset={"text_encoder_target_name": ["text_model.encoder.layers.0.mlp.fc1"]})
    assert paths(full, "text_encoder") == set() and paths(full, "text_encoder_2") == {
        "text_model.encoder.layers.0.mlp.fc1"}
    suffix = create_network(unet, tes, dim=4, preset={"text_encoder_target_name": ["encoder.layers.0.mlp.fc1"]})
    assert set(suffix.names("text_encoder")) == {"lora_te1_text_model_encoder_layers_0_mlp_fc1"}
    assert set(suffix.names("text_encoder_2")) == {"lora_te2_text_model_encoder_layers_0_mlp_fc1"}


MAP_PRESET = r"""
use_fnmatch = true
unet_target_module = ["Attention"]
unet_target_name = ["*.proj_in", "*.proj_out", "*.ff.net.*"]   # with the attentions: all of Transformer2DModel
text_encoder_target_module = ["CLIPAttention", "CLIPMLP"]

[module_algo_map.Attention]          # diffusers' attention: to_q, to_k, to_v, to_out.0
algo = "lokr"
factor = 4
dim = 2

[module_algo_map.CLIPMLP]
algo = "loha"
dim = 8
alpha = 4
weight_decompose = true              # LyCORIS' spelling of dora_wd
wd_on_out = true                     # and of dora_axis = "out" (its module argument)

[name_algo_map."*.ff.net.2"]         # a layer selected by name takes its name entry
algo = "ia3"
train_on_input = true

[name_algo_map."*.attn2.to_k"]       # inside a class walked by module: ignored, the class entry applies
algo = "ia3"

[name_algo_map."*.proj_out"]         # no algo: the network's, with other options
dim = 6
alpha = 3
rank_dropout = 0.25
"""


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_algo_maps_change_exactly_the_matching_layers(tmp_path, kind):
    unet, tes = tiny_model(kind)
    net = create_network(unet, tes, preset=str(write(tmp_path, MAP_PRESET)), algo="lora", dim=4, alpha=1,
                         dropout=0.1)
    layers = by_path(net, "unet")
    assert set(layers) == under_class(unet, {"Transformer2DModel"})
    in_attention = under_class(unet, {"Attention"})
    for path, a in layers.items():
        if path.endswith("ff.net.2"):
            assert (a.name, a.options.train_on_input) == ("ia3", True), path
        elif path in in_attention:  # attn2.to_k included
            assert (a.name, a.options.factor, a.options.dim, a.options.alpha) == ("lokr", 4, 2, 1.0), path
            assert a.options.dropout == 0.1  # the network's own options still apply where the algo takes them
        elif path.endswith("proj_out"):
            assert (a.name, a.options.dim, a.options.alpha, a.options.rank_dropout) == ("lora", 6, 3.0, 0.25), path
        else:
            assert (a.name, a.options.dim, a.options.alpha, a.options.dropout) == ("lora", 4, 1.0, 0.1), path
    for component, te in zip(("text_encoder", "text_encoder_2"), tes):
        for path, a in by_path(net, component).items():
            if ".mlp." in path:
                assert (a.name, a.options.dim, a.options.alpha) == ("loha", 8, 4.0), path
                assert (a.options.dora_wd, a.options.dora_axis) == (True, "out") and a.dora_scale is not None
            else:
                assert (a.name, a.options.dim, a.options.dora_wd) == ("lora", 4, False), path
    # the overrides survive a save and load: the file says which algorithm each module has
    path = tmp_path / "mixed.safetensors"
    net.save(path)
    from lorakit import load_network

    loaded = load_network(unet, path, text_encoders=tes)
    assert {n: a.name for n, a in loaded.adapters()} == {n: a.name for n, a in net.adapters()}


def test_exclude_name_removes_layers_and_everything_under_them():
    unet, tes = tiny_model("sd1")
    preset = {"use_fnmatch": True, "unet_target_module": ["Transformer2DModel"],
              "text_encoder_target_module": ["CLIPAttention", "CLIPMLP"],
              "name_algo_map": {"*.attn1.to_q": {"algo": "loha"}},
              "exclude_name": ["*.attn1", "*.ff.net.2", "encoder.layers.0"]}
    net = create_network(unet, tes, dim=4, preset=preset)
    assert paths(net, "unet") == {p for p in under_class(unet, {"Transformer2DModel"})
                                  if ".attn1." not in p and not p.endswith("ff.net.2")}
    assert paths(net, "text_encoder") == {p for p in under_class(tes[0], {"CLIPAttention", "CLIPMLP"})
                                          if p.startswith("encoder.layers.1.")}
    assert {a.name for _, a in net.adapters()} == {"lora"}  # the excluded to_q's override is gone with it


# ----- generic models -----------------------------------------------------------------------------------------------
class Generic(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(nn.Conv2d(8, 8, 1), nn.GroupNorm(2, 8), nn.Conv2d(8, 8, 3, padding=1))
        self.head = nn.Linear(8, 16)
        self.aux = nn.ModuleDict({"a": nn.Linear(16, 16), "b": nn.Linear(16, 4)})


def test_generic_model_preset_keys(tmp_path):
    torch.manual_seed(0)
    model = Generic()
    everything = create_network(model, dim=4)
    assert set(everything.entries) == {"lycoris_stem", "lycoris_blocks_0", "lycoris_blocks_2", "lycoris_head",
                                       "lycoris_aux_a", "lycoris_aux_b"}
    text = r"""
target_module = ["Linear", "Sequential"]
target_name = ["stem"]
exclude_name = ["aux.b"]
lora_prefix = "mynet"

[module_algo_map.Sequential]
algo = "loha"
conv_dim = 2

[name_algo_map.head]
algo = "lokr"
factor = 2
"""
    net = create_network(model, preset=str(write(tmp_path, text)), dim=4, train_norm=True)
    assert set(net.entries) == {"mynet_stem", "mynet_blocks_0", "mynet_blocks_1", "mynet_blocks_2", "mynet_head",
                                "mynet_aux_a"}
    got = {n: (a.name, getattr(a.options, "dim", None)) for n, a in net.adapters()}
    assert got == {"mynet_stem": ("lora", 4), "mynet_blocks_0": ("loha", 4), "mynet_blocks_1": ("norm", 4),
                   "mynet_blocks_2": ("loha", 2), "mynet_head": ("lokr", 4), "mynet_aux_a": ("lora", 4)}
    assert net.get_submodule("mynet_head").options.factor == 2
    no_conv = create_network(model, preset={"target_name": ["stem", "head"], "enable_conv": False})
    assert set(no_conv.entries) == {"lycoris_head"}


def test_generic_preset_selects_what_lycoris_selects(tmp_path):
    os.environ["LYCORIS_KERNEL_BACKEND"] = "torch"
    lycoris = pytest.importorskip("lycoris")
    from lycoris.wrapper import LycorisNetwork

    saved = {k: v for k, v in vars(LycorisNetwork).items() if k.isupper()}
    text = r"""
target_module = ["Linear", "Sequential"]
target_name = ["stem"]
exclude_name = ["aux.b"]
lora_prefix = "mynet"

[module_algo_map.Sequential]
algo = "loha"
"""
    path = write(tmp_path, text)
    try:
        model = Generic()
        theirs = lycoris.create_lycoris(model, 1.0, linear_dim=4, linear_alpha=1, algo="lora", preset=str(path))
        ours = create_network(model, preset=str(path), dim=4)
        assert {m.lora_name: type(m).__name__ for m in theirs.loras} == {
            n: {"lora": "LoConModule", "loha": "LohaModule"}[a.name] for n, a in ours.adapters()}
    finally:
        for k, v in saved.items():
            setattr(LycorisNetwork, k, v)


class TwoLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)


class BlocksAndHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([TwoLinears() for _ in range(2)])
        self.head = nn.Linear(16, 4)


def test_name_algo_map_applies_to_layers_reached_by_name_only():
    """LyCORIS' create_modules looks name_algo_map up only for target_name layers: a layer inside a target class
    takes that class's module_algo_map entry even where a name entry matches it."""
    preset = {"target_module": ["TwoLinears"], "target_name": ["head"],
              "module_algo_map": {"TwoLinears": {"algo": "lokr", "dim": 3}},
              "name_algo_map": {"blocks.0.fc1": {"algo": "loha", "dim": 5}, "head": {"algo": "loha", "dim": 2}}}
    net = create_network(BlocksAndHead(), preset=preset, dim=4)
    got = {n: a.name for n, a in net.adapters()}
    assert got == {"lycoris_blocks_0_fc1": "lokr", "lycoris_blocks_0_fc2": "lokr", "lycoris_blocks_1_fc1": "lokr",
                   "lycoris_blocks_1_fc2": "lokr", "lycoris_head": "loha"}
    assert net.get_submodule("lycoris_head").rank == 2


def test_sd_name_algo_map_applies_inside_a_module_algo_map_class_that_is_not_a_target():
    """LyCORIS' kohya.py (the SD networks) walks only the target classes: a target_name layer inside a
    module_algo_map class that is not a target takes its name_algo_map entry there (LyCORIS 4.1.3 gives LoHa here),
    and a layer inside a target class takes no entry of a map class above that target (LyCORIS: LoCon)."""
    unet, tes = tiny_model("sd1")
    preset = {"use_fnmatch": True, "unet_target_module": ["Attention"], "unet_target_name": ["*.ff.net.2"],
              "text_encoder_target_module": [], "module_algo_map": {"BasicTransformerBlock": {"algo": "lokr"}},
              "name_algo_map": {"*.ff.net.2": {"algo": "loha"}}}
    net = create_network(unet, tes, preset=preset, dim=4)
    got = {n: a.name for n, a in net.adapters()}
    assert {a for n, a in got.items() if n.endswith("ff_net_2")} == {"loha"}
    # inside the target class Attention, whose walk does not look at the map class above it: the default algo
    assert {a for n, a in got.items() if n.endswith("attn1_to_q")} == {"lora"}


# ----- errors -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,message", [
    ("unet_target_modules = ['Attention']",
     r"preset file .*bad.toml: unknown preset key 'unet_target_modules' \(did you mean 'unet_target_module'\?\)"),
    ("exclude_names = ['x']", r"bad.toml: unknown preset key 'exclude_names' \(did you mean 'exclude_name'\?\)"),
    ("enable_convs = true", r"unknown preset key 'enable_convs' \(did you mean 'enable_conv'\?\)"),
    ("unet_target_module = 3", r"bad.toml: preset key 'unet_target_module' must be a list of strings, got 3"),
    ("target_name = ['a', 1]", r"preset key 'target_name' must be a list of strings, got \['a', 1\]"),
    ("exclude_name = {a = 1}", r"preset key 'exclude_name' must be a list of strings"),
    ("enable_conv = 1", r"bad.toml: preset key 'enable_conv' must be true or false, got 1"),
    ("enable_conv = 'false'", r"preset key 'enable_conv' must be true or false, got 'false'"),
    ("use_fnmatch = 'yes'", r"preset key 'use_fnmatch' must be true or false, got 'yes'"),
    ("lora_prefix = ''", r"preset key 'lora_prefix' must be a non-empty string"),
    ("lora_prefix = ['x']", r"preset key 'lora_prefix' must be a non-empty string"),
    ("module_algo_map = ['Attention']", r"preset key 'module_algo_map' must be a table"),
    ("[module_algo_map]\nAttention = 'lokr'",
     r"bad.toml: module_algo_map.Attention: expected a table such as \{ algo = \"lokr\", dim = 8 \}, got 'lokr'"),
    ("[module_algo_map.Attention]\nalgo = 'lokrr'",
     r"bad.toml: module_algo_map.Attention: unknown algo 'lokrr' \(did you mean 'lokr'\?\)"),
    ("[module_algo_map.Attention]\nalgo = 'lokr'\nfactr = 4",
     r"bad.toml: module_algo_map.Attention: unknown adapter option 'factr' \(did you mean 'factor'\?\)"),
    ("[module_algo_map.Attention]\nalgo = 'lokr'\nfactor = 'four'",
     r"module_algo_map.Attention: option 'factor': expected an integer, got 'four'"),
    ("[name_algo_map.'*.to_k']\ndropout = 'much'", r"name_algo_map.\*.to_k: option 'dropout'"),
    ("[module_algo_map.ResnetBlock2D]\nconv_dim = 'abc'",
     r"bad.toml: module_algo_map.ResnetBlock2D: option 'conv_dim': expected an integer, got 'abc'"),
    ("[module_algo_map.ResnetBlock2D]\nconv_alpha = 'x'", r"ResnetBlock2D: option 'conv_alpha'"),
    ("[name_algo_map.'*.to_k']\nmultiplier = 0.5",
     r"name_algo_map.\*.to_k: option 'multiplier' cannot be set per layer in a preset"),
])
def test_bad_preset_file(tmp_path, text, message):
    path = write(tmp_path, text, "bad.toml")
    with pytest.raises(OptionError, match=message):
        load_preset(str(path))


def test_a_string_for_a_list_is_a_list_of_one():
    """LyCORIS would iterate the characters of a string (or test substrings); lorakit reads it as one name."""
    assert load_preset({"unet_target_module": "Transformer2DModel"}).unet_target_module == ("Transformer2DModel",)
    assert load_preset({"exclude_name": "mid_block"}).exclude_name == ("mid_block",)


def test_invalid_toml_names_the_file(tmp_path):
    path = write(tmp_path, "unet_target_module = [\"Attention\"\nenable_conv = true\n", "broken.toml")
    with pytest.raises(OptionError, match=r"preset file .*broken.toml: not valid TOML \(.*line 2"):
        load_preset(str(path))
    with pytest.raises(OptionError, match=r"preset file .*broken.toml: not valid TOML"):
        create_network(*tiny_model("sd1"), preset=str(path))


def test_missing_preset_file_and_unknown_name(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"preset file .*nothere.toml does not exist"):
        load_preset(str(tmp_path / "nothere.toml"))
    with pytest.raises(OptionError, match=r"unknown preset 'ful' \(did you mean 'full'\?\).*attn-mlp"):
        load_preset("ful")


def test_an_entry_option_its_algo_does_not_take_is_ignored_with_a_warning(tmp_path, caplog):
    """LyCORIS' modules ignore options they do not take, in an entry with its own algo or with the network's: the
    entry builds, and the warning names the file, the entry and the option."""
    text = """
unet_target_module = ["BasicTransformerBlock"]
unet_target_name = ["proj_in"]
[module_algo_map.Attention]
algo = "ia3"
factor = 4
[name_algo_map.proj_in]
train_on_input = true
dim = 6
"""
    unet, tes = tiny_model("sd1")
    with caplog.at_level(logging.WARNING):
        net = create_network(unet, tes, preset=str(write(tmp_path, text, "loose.toml")), algo="lora", dim=4)
    assert re.search(r"preset file .*loose.toml: module_algo_map.Attention: algo 'ia3' does not take factor = 4; "
                     r"ignored", caplog.text)
    assert re.search(r"loose.toml: name_algo_map.proj_in: algo 'lora' does not take train_on_input = True; "
                     r"ignored", caplog.text)
    layers = by_path(net, "unet")
    assert {a.name for p, a in layers.items() if p in under_class(unet, {"Attention"})} == {"ia3"}
    assert {(a.name, a.rank) for p, a in layers.items() if p.endswith("proj_in")} == {("lora", 6)}
    # with an algo that takes the option, the same entry gives it
    net = create_network(unet, tes, preset={"unet_target_name": ["proj_in"],
                                            "name_algo_map": {"proj_in": {"factor": 2}}}, algo="lokr", dim=2)
    assert {a.options.factor for p, a in by_path(net, "unet").items() if p.endswith("proj_in")} == {2}


# KohakuBlueleaf/LyCORIS example_configs/preset_configs/example.toml, verbatim
LYCORIS_EXAMPLE_PRESET = """enable_conv = true

# An example for use different algo/settings in "full" preset
unet_target_module = [
  "Transformer2DModel",
  "ResnetBlock2D",
  "Downsample2D",
  "Upsample2D",
  "HunYuanDiTBlock",
  "DoubleStreamBlock",
  "SingleStreamBlock",
  "SingleDiTBlock",
  "MMDoubleStreamBlock",       #HunYuanVideo
  "MMSingleStreamBlock",       #HunYuanVideo
  "JointTransformerBlock",     # lumina-image-2
  "FinalLayer",                # lumina-image-2
  "QwenImageTransformerBlock", # Qwen
  "LensTransformerBlock",      # Lens
  "Ideogram4TransformerBlock", # Ideogram 4
  "ZImageTransformerBlock",
  "AceStepEncoderLayer",
  "AceStepDiTLayer",
  "TextFusionBlock",          # Krea 2
]
unet_target_name = [
  "conv_in",
  "conv_out",
  "time_embedding.linear_1",
  "time_embedding.linear_2",
]
text_encoder_target_module = [
  "CLIPAttention",
  "CLIPSdpaAttention",
  "CLIPMLP",
  "MT5Block",
  "BertLayer",
  "Gemma2Attention",
  "Gemma2FlashAttention2",
  "Gemma2SdpaAttention",
  "Gemma2MLP",
]
text_encoder_target_name = [
  # "token_embedding", # not supported, Embedding module in CLIP
]


[module_algo_map]
[module_algo_map.CrossAttention] # Attention Layer in UNet
algo = "lokr"
dim = 10000000000000
factor = 64          # Try to fit the head dim (doesn't have special effect)

[module_algo_map.FeedForward] # MLP Layer in UNet
algo = "lokr"
dim = 100000000000 # Trigger full matrix
factor = 12

[module_algo_map.ResnetBlock2D] # ResBlock in UNet
algo = "lora"
dim = 4
alpha = 1
use_tucker = true # Use tucker decomposition for convolution
factor = 8

[module_algo_map.CLIPAttention] # Attention Layer in TE
algo = "lora"
dim = 8
alpha = 1

[module_algo_map.CLIPMLP] # MLP Layer in TE
algo = "lokr"
dim = 100000000000 # Trigger full matrix
"""


def test_lycoris_example_preset_builds(tmp_path, caplog):
    """LyCORIS' own example preset (a `lora` entry with `factor = 8`, which LyCORIS' LoCon ignores) builds with
    each entry's algorithm and dim, and the ignored option is named."""
    unet, tes = tiny_model("sd1")
    with caplog.at_level(logging.WARNING):
        net = create_network(unet, tes, preset=str(write(tmp_path, LYCORIS_EXAMPLE_PRESET, "example.toml")),
                             dim=2, alpha=2)
    assert re.search(r"preset file .*example.toml: module_algo_map.ResnetBlock2D: algo 'lora' does not take "
                     r"factor = 8; ignored", caplog.text)
    any_layer = lambda layer: isinstance(layer, (nn.Linear, nn.Conv2d))  # noqa: E731
    classes = {"Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"}
    names = {"conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"}
    unet_layers = by_path(net, "unet")
    assert set(unet_layers) == under_class(unet, classes, any_layer) | names
    in_resnets, in_ff = under_class(unet, {"ResnetBlock2D"}, any_layer), under_class(unet, {"FeedForward"}, any_layer)
    for path, a in unet_layers.items():
        if path in in_ff:
            assert a.name == "lokr" and "lokr_w2" in a.state_dict(), path  # the huge dim: full-matrix LoKr
        elif path in in_resnets:
            assert (a.name, a.rank, a.alpha, a.options.use_tucker) == ("lora", 4, 1.0, True), path
        else:  # no entry: the network's (CrossAttention is no class of a current diffusers U-Net)
            assert (a.name, a.rank, a.alpha, a.options.use_tucker) == ("lora", 2, 2.0, False), path
    te = by_path(net, "text_encoder")
    assert set(te) == under_class(tes[0], {"CLIPAttention", "CLIPMLP"}, any_layer)
    assert {(a.name, a.rank, a.alpha) for p, a in te.items() if ".self_attn." in p} == {("lora", 8, 1.0)}
    assert {a.name for p, a in te.items() if ".mlp." in p} == {"lokr"}


def test_lycoris_option_spellings_reach_the_adapters():
    """kohya/LyCORIS spellings given to create_network apply (they were once accepted and silently dropped)."""
    unet, tes = tiny_model("sd1")
    net = create_network(unet, tes, preset="attn-mlp", weight_decompose=True, wd_on_output=True)
    assert all((a.options.dora_wd, a.options.dora_axis) == (True, "out") for _, a in net.adapters())
    net = create_network(unet, tes, preset="full", use_cp=True, conv_dim=2)
    assert any(a.options.use_tucker and "lora_mid.weight" in a.state_dict() for _, a in net.adapters())
    net = create_network(unet, tes, preset="attn-only", algo="diag-oft", dim=2, constrain=0.01)
    assert all(a.options.constraint == 0.01 for _, a in net.adapters())
    with pytest.raises(OptionError, match=r"algo 'lora' does not accept option 'constrain' \(= constraint, given "
                                          r"0.1\)"):
        create_network(unet, tes, algo="lora", constrain=0.1)


def test_override_spellings_of_dim_and_alpha_apply():
    """lora_dim / network_dim / network_alpha in an algo map are dim and alpha (they were accepted, then replaced by
    the network's own values)."""
    unet, tes = tiny_model("sd1")
    for entry in ({"lora_dim": 8, "network_alpha": 2}, {"network_dim": 8, "alpha": 2}, {"dim": 8, "alpha": 2}):
        preset = {"unet_target_module": ["ResnetBlock2D"], "unet_target_name": ["attn1.to_q"],
                  "name_algo_map": {"attn1.to_q": entry}, "module_algo_map": {"ResnetBlock2D": {"conv_dim": 3}}}
        net = create_network(unet, tes, preset=preset, dim=4, alpha=1, conv_dim=2)
        assert any(p.endswith("attn1.to_q") for p in paths(net, "unet"))
        for path, a in by_path(net, "unet").items():
            conv_k = isinstance(a.layer, nn.Conv2d) and a.layer.kernel_size != (1, 1)
            expected = (8, 2.0) if path.endswith("attn1.to_q") else (3, 1.0) if conv_k else (4, 1.0)
            assert (a.rank, a.alpha) == expected, (entry, path)


def test_a_dict_is_the_whole_preset_while_a_file_keeps_lycoris_defaults(tmp_path):
    """A file's keys left out keep LyCORIS' defaults (tests/network/test_lycoris_creation_parity.py); a dict given
    in Python is the whole preset: what it leaves out is empty."""
    unet, tes = tiny_model("sd1")
    from_dict = create_network(unet, tes, preset={"unet_target_module": ["Transformer2DModel"]}, dim=4)
    path = write(tmp_path, 'unet_target_module = ["Transformer2DModel"]\n')
    from_file = create_network(unet, tes, preset=str(path), dim=4)
    assert not from_dict.names("text_encoder") and from_file.names("text_encoder")
    assert set(from_file.entries) - set(from_dict.entries) == set(from_file.names("text_encoder")) | {
        "lora_unet_conv_in", "lora_unet_conv_out", "lora_unet_time_embedding_linear_1",
        "lora_unet_time_embedding_linear_2"}


def test_name_algo_map_takes_the_exact_path_first_then_the_first_matching_entry():
    """LyCORIS' find_conf_for_name: a key equal to the module path wins; else the first entry of the table whose
    pattern matches (in the table's order)."""
    path = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    exact_last = preset_from_dict({"name_algo_map": {".*attn1.*": {"algo": "loha"}, path: {"algo": "lokr"}}})
    assert exact_last.override_for_name(path) == {"algo": "lokr"}
    two_patterns = preset_from_dict({"name_algo_map": {"down_blocks\\.0\\..*": {"algo": "loha"},
                                                       ".*to_q": {"algo": "lokr"}}})
    assert two_patterns.override_for_name(path) == {"algo": "loha"}
    assert two_patterns.override_for_name("up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q") == {
        "algo": "lokr"}


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)


class _BlockModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.block, self.other, self.head = _Block(), nn.Linear(4, 4), nn.Linear(4, 2)


def test_an_empty_target_module_in_a_file_selects_nothing_by_it_and_a_map_class_is_a_target(tmp_path):
    """LyCORIS' wrapper.py targets target_module + the module_algo_map classes: a file's `target_module = []` with
    a map class selects that class's layers alone (it selected every layer), and with nothing else, nothing."""
    mapped = tmp_path / "map.toml"
    mapped.write_text('target_module = []\n[module_algo_map._Block]\nalgo = "loha"\n')
    net = create_network(_BlockModel(), algo="lora", dim=2, preset=str(mapped))
    assert {name: a.name for name, a in net.adapters()} == {"lycoris_block_fc": "loha"}
    empty = tmp_path / "empty.toml"
    empty.write_text("target_module = []\ntarget_name = []\n")
    with pytest.raises(ValueError, match="selected no layer"):
        create_network(_BlockModel(), algo="lora", dim=2, preset=str(empty))
    # a single string is a list of one there too (it was split into letters, selecting nothing)
    single = tmp_path / "single.toml"
    single.write_text('target_module = "Linear"\n')
    assert load_preset(str(single)).target_module == ("Linear",)
    # a dict that names no generic target still selects every layer; one naming a map class, that class's layers
    assert len(dict(create_network(_BlockModel(), algo="lora", dim=2, preset={}).adapters())) == 3
    net = create_network(_BlockModel(), algo="lora", dim=2,
                         preset={"target_module": [], "module_algo_map": {"_Block": {"algo": "loha"}}})
    assert [name for name, _ in net.adapters()] == ["lycoris_block_fc"]


def test_a_missing_preset_file_in_network_args_is_an_option_error(tmp_path):
    """The kohya_ss GUI takes a custom preset path: a moved file or a folder is one line under `lorakit train` (an
    OptionError, which the command reports), not a traceback; it is still a FileNotFoundError for Python callers."""
    from lorakit.train.config import OptionError as TrainOptionError, load_train_config

    (tmp_path / "folder.toml").mkdir()
    for name, what in (("gone.toml", "does not exist"), ("folder.toml", "is a folder")):
        with pytest.raises(TrainOptionError, match=rf"preset file .*{name} {what}"):
            load_train_config(overrides={"network_module": "lycoris.kohya",
                                         "network_args": [f"preset={tmp_path / name}"]})
        with pytest.raises(FileNotFoundError):
            load_preset(str(tmp_path / name))
