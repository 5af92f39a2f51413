"""lorakit.create_network against lycoris-lora 4.1.3's own creation, where the rules are LyCORIS': network_dim 0
with conv_dim, an algo-map entry's alpha of 0, and preset files that leave keys out. Tiny SD1 through
lycoris.kohya.create_network (what sd-scripts calls with --network_module lycoris.kohya, string network_args), and a
generic model through lycoris.create_lycoris; each side's modules with their tensor shapes and alpha."""

from __future__ import annotations

import pytest
import torch.nn as nn

from lorakit import create_network
from lorakit.train.network_args import network_kwargs

from .test_interop import LORAKIT_FULL, lycoris, lycoris_class_state, lycoris_create_sd  # noqa: F401 (fixture)
from .test_interop import lycoris_text_encoders
from .tiny import tiny_model


def toml_of(preset: dict) -> str:
    """A preset dict as TOML: top-level keys, then one table per algo-map entry."""
    def value(v):
        return str(v).lower() if isinstance(v, bool) else repr(v).replace("'", '"')

    lines = [f"{k} = {value(v)}" for k, v in preset.items() if not isinstance(v, dict)]
    for key, entries in ((k, v) for k, v in preset.items() if isinstance(v, dict)):
        for entry, options in entries.items():
            lines += [f'[{key}."{entry}"]'] + [f"{k} = {value(v)}" for k, v in options.items()]
    return "\n".join(lines) + "\n"


def preset_file(tmp_path, preset: dict, name: str = "preset.toml") -> str:
    path = tmp_path / name
    path.write_text(toml_of(preset))
    return str(path)


def lycoris_sd(dim, alpha, preset_path, **network_args) -> dict:
    """{module: {tensor: (shape, alpha value)}} of LyCORIS' SD network on tiny SD1 (its text encoder seen with
    `text_model`, so that both sides name it lora_te_text_model_...)."""
    unet, tes = tiny_model("sd1")
    args = {k: str(v) for k, v in network_args.items()}
    lnet = lycoris_create_sd(1.0, dim, alpha, None, lycoris_text_encoders("sd1", tes), unet, preset=preset_path,
                             **args)
    return {m.lora_name: described(m.state_dict()) for m in lnet.loras}


def lorakit_modules(net) -> dict:
    tensors = net.state_dict()
    return {name: described({k.partition(".")[2]: t for k, t in tensors.items() if k.partition(".")[0] == name})
            for name in net.entries}


def described(tensors) -> dict:
    return {k: float(t) if k == "alpha" else tuple(t.shape) for k, t in tensors.items()}


def one_by_one_convs(net) -> set[str]:
    return {n for n, a in net.adapters() if a.spec.is_conv and a.spec.kernel_numel == 1}


# ----- network_dim 0 ------------------------------------------------------------------------------------------------
def test_network_dim_0_puts_the_1x1_convs_at_conv_dim_as_lycoris(tmp_path):
    """LyCORIS' create_single_module counts a 1x1 conv as a Linear only while lora_dim > 0; with dim 0 it takes
    conv_dim/conv_alpha (SD1's proj_in/proj_out and the ResNets' conv_shortcut)."""
    unet, tes = tiny_model("sd1")
    ours = create_network(unet, tes, preset="full", dim=0, alpha=1, conv_dim=4, conv_alpha=2)
    assert lorakit_modules(ours) == lycoris_sd(0, 1.0, preset_file(tmp_path, LORAKIT_FULL), conv_dim=4, conv_alpha=2)
    pointwise = one_by_one_convs(ours)
    assert pointwise and {ours.get_submodule(n).rank for n in pointwise} == {4}


def test_conv_1x1_always_linear_keeps_sd_scripts_rule():
    """sd-scripts' networks/lora.py and networks/dylora.py give a 1x1 conv the linear dim always: dim 0 leaves it
    out, whatever conv_dim is."""
    unet, tes = tiny_model("sd1")
    lycoris_rule = create_network(unet, tes, preset="full", dim=0, conv_dim=4)
    kohya_rule = create_network(unet, tes, preset="full", dim=0, conv_dim=4, conv_1x1_always_linear="true")
    assert set(kohya_rule.entries) == set(lycoris_rule.entries) - one_by_one_convs(lycoris_rule)
    with_dim = dict(preset="full", dim=2, conv_dim=4)
    assert lorakit_modules(create_network(unet, tes, **with_dim, conv_1x1_always_linear=True)) == \
        lorakit_modules(create_network(unet, tes, **with_dim))  # with a dim, both rules give 1x1 convs dim


# ----- algo-map entries ---------------------------------------------------------------------------------------------
def test_an_entry_alpha_of_0_is_the_networks_alpha_as_in_lycoris(tmp_path):
    """lycoris/kohya.py create_single_module: alpha = alpha or self.alpha (self.conv_alpha for convs), so an
    entry's alpha 0 means the network's; only the network's own alpha 0 reaches the module (alpha = dim)."""
    preset = {**LORAKIT_FULL, "module_algo_map": {"CLIPMLP": {"alpha": 0, "dim": 8}, "Attention": {"alpha": 0}},
              "name_algo_map": {"conv_in": {"alpha": 0}}}
    path = preset_file(tmp_path, preset)
    unet, tes = tiny_model("sd1")
    ours = create_network(unet, tes, preset=path, dim=4, alpha=2, conv_alpha=3)
    assert lorakit_modules(ours) == lycoris_sd(4, 2.0, path, conv_alpha=3)
    alphas = {n: float(ours.state_dict()[f"{n}.alpha"]) for n in ours.entries}
    assert alphas["lora_te_text_model_encoder_layers_0_mlp_fc1"] == 2.0 and alphas["lora_unet_conv_in"] == 3.0


def test_an_entry_conv_alpha_of_0_is_the_networks_conv_alpha():
    """lorakit's entry conv_alpha (LyCORIS' modules ignore it) reads 0 as its alpha does: the network's."""
    unet, tes = tiny_model("sd1")
    preset = {**LORAKIT_FULL, "name_algo_map": {"conv_in": {"conv_dim": 8, "conv_alpha": 0}}}
    net = create_network(unet, tes, preset=preset, dim=4, alpha=2, conv_alpha=3)
    assert net.get_submodule("lora_unet_conv_in").rank == 8
    assert float(net.state_dict()["lora_unet_conv_in.alpha"]) == 3.0


# ----- conv_dim / conv_alpha of 0 ------------------------------------------------------------------------------------
@pytest.mark.parametrize("args", [["conv_dim=0"], ["conv_alpha=0"], ["conv_dim=0", "conv_alpha=0"]], ids=str)
def test_conv_dim_and_conv_alpha_of_0_under_lycoris_kohya_are_lycoris_reading(tmp_path, args):
    """sd-scripts hands lycoris.kohya.create_network the network_args as strings: its int(conv_dim or network_dim)
    keeps "0" (a non-empty string), so conv_dim=0 leaves the kxk convs out and conv_alpha=0 gives them alpha =
    conv_dim, as lorakit reads 0 with every network_module."""
    path = preset_file(tmp_path, LORAKIT_FULL)
    unet, tes = tiny_model("sd1")
    ours = create_network(unet, tes, dim=4, alpha=8.0, **network_kwargs("lycoris.kohya", [f"preset={path}", *args]))
    assert lorakit_modules(ours) == lycoris_sd(4, 8.0, path, **dict(arg.split("=") for arg in args))
    conv_alphas = {float(ours.state_dict()[f"{n}.alpha"]) for n, a in ours.adapters() if a.spec.kernel_numel > 1}
    assert conv_alphas == (set() if "conv_dim=0" in args else {4.0})


def test_lycoris_python_api_reads_a_number_0_as_not_given():
    """The one reader that differs: create_lycoris given the number 0 (int(0 or linear_dim)) trains the convs at
    the network's dim and alpha; lorakit's create_network leaves them out, as sd-scripts' networks/lora.py."""
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.Flatten(), nn.Linear(8, 2))
    theirs = lycoris.create_lycoris(model, 1.0, linear_dim=2, linear_alpha=1.0, conv_dim=0)
    ours = create_network(model, dim=2, conv_dim=0)
    assert {m.lora_name for m in theirs.loras} == {"lycoris_0", "lycoris_2"}
    assert set(ours.entries) == {"lycoris_2"}


# ----- preset files that leave keys out -----------------------------------------------------------------------------
def test_a_preset_file_without_the_text_encoder_keys_keeps_lycoris_defaults(tmp_path):
    """LyCORIS' apply_preset sets only the keys the file has (lycoris/kohya.py): a U-Net-only file still trains
    the text encoders, and conv_in/conv_out/time_embedding by the default target names."""
    path = preset_file(tmp_path, {"unet_target_module": ["Transformer2DModel"]})
    unet, tes = tiny_model("sd1")
    ours = create_network(unet, tes, preset=path, dim=4)
    assert lorakit_modules(ours) == lycoris_sd(4, 1.0, path)
    assert ours.names("text_encoder") and "lora_unet_conv_in" in ours.entries


class BlocksAndHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Conv1d(8, 8, 1))
        self.head = nn.Linear(8, 2)


def test_a_generic_preset_file_with_target_name_only_keeps_every_layer_kind(tmp_path):
    """lycoris/wrapper.py: target_module left out keeps LycorisNetwork's default, every Linear/Conv/norm layer."""
    path = preset_file(tmp_path, {"target_name": ["head"]})
    model = BlocksAndHead()
    theirs = lycoris.create_lycoris(model, 1.0, linear_dim=2, linear_alpha=1.0, preset=path)
    ours = create_network(model, preset=path, dim=2)
    assert lorakit_modules(ours) == {m.lora_name: described(m.state_dict()) for m in theirs.loras}
    assert set(ours.entries) == {"lycoris_blocks_0", "lycoris_blocks_2", "lycoris_head"}


# ----- algo-map entries where the network's dim is 0 -----------------------------------------------------------------
def test_entry_dims_where_the_network_dim_is_0_follow_lycoris(tmp_path):
    """LyCORIS' create_single_module: a Linear with network dim 0 is left out even when an entry gives it a dim,
    and a kxk conv with conv dim 0 (or enable_conv = false) is adapted when an entry gives it one."""
    preset = {**LORAKIT_FULL, "enable_conv": False,
              "name_algo_map": {"conv_in": {"dim": 4}, "time_embedding.linear_1": {"dim": 4}}}
    unet, tes = tiny_model("sd1")
    ours = create_network(unet, tes, preset=preset_file(tmp_path, preset), dim=0, alpha=1)
    theirs = lycoris_sd(0, 1.0, preset_file(tmp_path, preset))
    assert lorakit_modules(ours) == theirs
    assert "lora_unet_conv_in" in theirs and "lora_unet_time_embedding_linear_1" not in theirs
