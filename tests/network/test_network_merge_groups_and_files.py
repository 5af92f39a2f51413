"""Network and kohya-module behaviour checked against sd-scripts' rules written out in the tests (get_block_index
in test_block_args, the LoRA change in test_kohya_save_and_multiplier): merging at a multiplier with
block multipliers (the LoRA formula in float64), merge_to with part of a file, LoRA+ side ratios and block lr
groups as sd-scripts' networks/lora.py makes them, what a network saved in half precision records (its hash over
the bytes written, A1111's base-model keys), option checks, and gen_img's restore of a bias that a merge added."""

from __future__ import annotations

import copy
import hashlib
import json

import pytest
import torch
import torch.nn as nn

from lorakit import create_network, kohya, load_network
from lorakit.algos import OptionError
from lorakit.formats import read_metadata

from .test_block_args import kohya_block_index
from .test_kohya_save_and_multiplier import _file_change
from .tiny import randomize, tiny_model

safetensors = pytest.importorskip("safetensors")


# ----- merging -----

def test_merge_at_a_multiplier_keeps_each_adapters_block_multiplier():
    """merge(multiplier=m) adds m * (block multiplier) * dW to every layer, as the applied network computes it."""
    unet, tes = copy.deepcopy(tiny_model("sd1"))
    net = randomize(create_network(unet, tes, preset="attn-mlp", dim=4, alpha=2.0), scale=0.2)
    blocks = [0.1 * (k % 7) for k in range(25)]  # kohya's 25 blocks: IN00-IN11, MID, OUT00-OUT11
    net.set_block_multipliers(blocks)
    tensors = {k: v.detach().clone() for k, v in net.state_dict().items()}
    layers = {n: a.host for n, a in net.adapters()}
    before = {n: layer.weight.detach().double().clone() for n, layer in layers.items()}
    net.merge(multiplier=0.5)
    checked = set()
    for name, layer in layers.items():
        block = 1.0 if name.startswith("lora_te_") else blocks[kohya_block_index(name)]
        want = _file_change(tensors, name, 0.5 * block)
        got = (layer.weight.detach().double() - before[name]).flatten(1)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=name)
        checked.add(block)
    assert len(checked) > 3  # layers of several blocks, with different multipliers


def test_merge_to_merges_only_the_adapters_weights_sd_holds(tmp_path):
    """gen_img / --base_weights: merge_to(te, unet, weights_sd) changes the layers whose tensors weights_sd holds."""
    unet, tes = copy.deepcopy(tiny_model("sd1"))
    path = tmp_path / "a.safetensors"
    randomize(kohya.create_network(1.0, 4, 2.0, None, tes[0], unet), scale=0.2).save_weights(str(path), None, {})
    weights_sd = safetensors.torch.load_file(str(path))
    net, _ = kohya.create_network_from_weights(1.0, str(path), None, tes[0], unet, for_inference=True)
    te_only = {k: v for k, v in weights_sd.items() if k.startswith("lora_te_")}
    layers = {n: a.host for n, a in net.adapters()}
    before = {n: layer.weight.detach().double().clone() for n, layer in layers.items()}
    net.merge_to(tes[0], unet, te_only, torch.float32, "cpu")
    names = {k.partition(".")[0] for k in weights_sd}
    assert any(n.startswith("lora_unet_") for n in names) and any(n.startswith("lora_te_") for n in names)
    for name, layer in layers.items():
        got = (layer.weight.detach().double() - before[name]).flatten(1)
        if name.startswith("lora_te_"):
            torch.testing.assert_close(got, _file_change(weights_sd, name), rtol=1e-4, atol=1e-6, msg=name)
        else:
            assert torch.equal(got, torch.zeros_like(got)), name


def test_pre_calc_restore_removes_a_bias_that_the_merge_added():
    """A norm adapter on a LayerNorm without bias: merging its b_norm adds a bias; restore_weights (gen_img
    --network_pre_calc) gives the layer back as it was, without one."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8, bias=False))
    x = torch.randn(3, 8)
    with torch.no_grad():
        base = model(x)
    g = torch.Generator().manual_seed(1)
    weights_sd = {"lycoris_1.w_norm": torch.randn(8, generator=g) * 0.1,
                  "lycoris_1.b_norm": torch.randn(8, generator=g) * 0.1}
    net, _ = kohya.create_network_from_weights(1.0, None, None, None, model, weights_sd=weights_sd,
                                               for_inference=True)
    net.backup_weights()
    net.pre_calculation()
    assert model[1].bias is not None
    with torch.no_grad():  # the merged layer computes the norm adapter's formula
        n = torch.nn.functional.layer_norm(model[0](x).double(), (8,))
        want = n * (model[1].weight.double()) + model[1].bias.double()
        torch.testing.assert_close(model(x).double(), want, rtol=1e-5, atol=1e-6)
    net.restore_weights()
    assert model[1].bias is None
    with torch.no_grad():
        assert torch.equal(model(x), base)


# ----- optimizer groups -----

def test_side_loraplus_ratios_win_over_the_common_ratio():
    """sd-scripts: `loraplus_unet_lr_ratio or loraplus_lr_ratio`, `loraplus_text_encoder_lr_ratio or
    loraplus_lr_ratio`: a side's own ratio, when set, is the one used."""
    unet, tes = tiny_model("sd1")
    net = create_network(unet, tes, preset="attn-mlp", dim=4, loraplus_lr_ratio=16, loraplus_unet_lr_ratio=4,
                         loraplus_text_encoder_lr_ratio=2)
    lrs = {g["name"]: g["lr"] for g in net.optimizer_param_groups(unet_lr=1e-3, text_encoder_lr=1e-4)}
    assert lrs == pytest.approx({"text_encoder": 1e-4, "text_encoder_plus": 2e-4, "unet": 1e-3, "unet_plus": 4e-3})
    k = kohya.create_network(1.0, 4, 1.0, None, tes[0], unet, preset="attn-mlp")
    k.set_loraplus_lr_ratio(16, 4, None)  # train_network.py passes the three script arguments
    groups, descriptions = k.prepare_optimizer_params(1e-4, 1e-3)
    lrs = dict(zip(descriptions, (g["lr"] for g in groups)))
    assert lrs == pytest.approx({"textencoder": 1e-4, "textencoder plus": 1.6e-3, "unet": 1e-3, "unet plus": 4e-3})


def test_block_lr_groups_are_named_bykohya_block_index():
    """With block lr weights each U-Net group holds one kohya block (get_block_index), is named after it
    (unet_block{i}, sd-scripts' "unet block{i}" lr description) and trains at unet_lr * its weight."""
    unet, tes = tiny_model("sd1")
    down = [0.1 * (k + 1) for k in range(12)]
    up = [0.05 * (k + 1) for k in range(12)]
    net = create_network(unet, tes, preset="attn-mlp", dim=4, down_lr_weight=",".join(map(str, down)),
                         mid_lr_weight="0.7", up_lr_weight=",".join(map(str, up)))
    weights = down + [0.7] + up
    owner = {id(p): n for n, a in net.adapters() for p in a.parameters()}
    seen = set()
    for group in net.optimizer_param_groups(unet_lr=1.0, text_encoder_lr=0.5):
        blocks = {kohya_block_index(owner[id(p)]) for p in group["params"]}
        if group["name"] == "text_encoder":
            assert group["lr"] == 0.5 and blocks == {-1}
            continue
        (block,) = blocks
        assert group["name"] == f"unet_block{block}"
        assert group["lr"] == pytest.approx(weights[block])
        seen.add(block)
    assert len(seen) > 5


# ----- options -----

@pytest.mark.parametrize("kwargs,named", [({"conv_dim": -1}, "conv_dim"), ({"dim": -2}, "dim")])
def test_negative_dims_are_option_errors_before_any_layer_is_built(kwargs, named):
    """Also where the preset has no conv for the value to reach (attn-mlp: Linear and 1x1 convs)."""
    unet, tes = tiny_model("sd1")
    with pytest.raises(OptionError, match=rf"option '{named}': expected an integer >= 0"):
        create_network(unet, tes, preset="attn-mlp", **kwargs)
    with pytest.raises(OptionError, match=rf"option '{named}'"):
        kohya.create_network(1.0, 4 if named != "dim" else None, 1.0, None, tes[0], unet, preset="attn-mlp",
                             **{k: str(v) for k, v in kwargs.items()})


@pytest.mark.parametrize("key,n", [("block_dims", 25), ("block_alphas", 25), ("conv_block_dims", 25)])
def test_an_empty_item_of_a_block_list_is_an_option_error_naming_it(key, n):
    """kohya reads an empty lr weight as 0, but an empty dim or alpha is an error naming the arg."""
    unet, tes = tiny_model("sd1")
    args = {"block_dims": ",".join(["2"] * n), key: ",".join(["2"] * (n - 1) + [""])}
    with pytest.raises(OptionError, match=f"'{key}'"):
        kohya.create_network(1.0, 4, 1.0, None, tes[0], unet, **args)


def test_every_runtime_option_reaches_a_network_from_weights(tmp_path):
    """--dim_from_weights: module_dropout and rank_dropout_scale from network_args apply as dropout does."""
    unet, tes = tiny_model("sd1")
    path = str(tmp_path / "w.safetensors")
    kohya.create_network(1.0, 4, 1.0, None, tes[0], unet, preset="attn-mlp").save_weights(path, None, None)
    net, _ = kohya.create_network_from_weights(1, path, None, tes[0], unet, module_dropout="0.3",
                                               rank_dropout="0.2", rank_dropout_scale="True")
    got = {(a.options.module_dropout, a.options.rank_dropout, a.options.rank_dropout_scale) for _, a in net.adapters()}
    assert got == {(0.3, 0.2, True)}


# ----- files -----

def _data_sha256(path) -> str:
    """sha256 of a safetensors file's tensor data (after the 8-byte length and the JSON header), by hand."""
    data = open(path, "rb").read()
    n = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[8 + n:]).hexdigest()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, None])
def test_the_saved_hash_is_that_of_the_bytes_written(tmp_path, dtype):
    """sshs_model_hash is what A1111 computes from the file: the sha256 of its tensor data, in the saved dtype."""
    unet, tes = tiny_model("sd1")
    net = randomize(create_network(unet, tes, preset="attn-mlp", dim=4))
    path = tmp_path / "n.safetensors"
    net.save(path, dtype)
    meta = read_metadata(path)
    assert meta["sshs_model_hash"] == _data_sha256(path)
    assert meta["sshs_legacy_hash"] == hashlib.sha256(b"").hexdigest()[:8]  # under 1 MiB: the hash of no bytes
    net2 = kohya.KohyaNetwork.wrap(net)
    net2.save_weights(str(tmp_path / "k.safetensors"), dtype, {"ss_network_dim": "4"})
    assert read_metadata(tmp_path / "k.safetensors")["sshs_model_hash"] == _data_sha256(tmp_path / "k.safetensors")


@pytest.mark.parametrize("kind,version", [("sd1", "sd_v1"), ("sdxl", "sdxl_base_v1-0")])
def test_a_saved_network_says_its_base_model_as_sd_scripts_does(tmp_path, kind, version):
    """ss_v2 and ss_base_model_version, which A1111 sorts LoRAs by; the caller's own keys win."""
    unet, tes = tiny_model(kind)
    net = create_network(unet, tes, preset="attn-mlp", dim=2)
    net.save(tmp_path / "a.safetensors")
    meta = read_metadata(tmp_path / "a.safetensors")
    assert (meta["ss_v2"], meta["ss_base_model_version"]) == ("False", version)
    net.save(tmp_path / "b.safetensors", metadata={"ss_base_model_version": "sd_v1_v"})
    meta = read_metadata(tmp_path / "b.safetensors")
    assert meta["ss_base_model_version"] == "sd_v1_v" and "ss_v2" not in meta


def test_a_saved_network_records_its_algorithm_unless_the_caller_gives_its_own_args(tmp_path):
    """sd-scripts records a network as ss_network_module and ss_network_args, where `lorakit resize` reads the
    algorithm (tests/tools/test_resize_dylora_files.py); the caller's own ss_network_args (train_network.py's
    network_args) are kept as given, and train_norm's norm adapters do not hide a loaded network's algorithm."""
    unet, tes = tiny_model("sd1")
    net = randomize(create_network(unet, tes, algo="loha", preset="attn-mlp", dim=2, train_norm=True))
    net.save(tmp_path / "a.safetensors")
    net.save(tmp_path / "b.safetensors", metadata={"ss_network_args": '{"preset": "attn-mlp"}'})
    meta = read_metadata(tmp_path / "b.safetensors")
    assert meta["ss_network_args"] == '{"preset": "attn-mlp"}' and "ss_network_module" not in meta
    loaded = load_network(unet, tmp_path / "a.safetensors", text_encoders=tes)
    assert {a.name for _, a in loaded.adapters()} == {"loha", "norm"}
    loaded.save(tmp_path / "c.safetensors")
    assert json.loads(read_metadata(tmp_path / "c.safetensors")["ss_network_args"]) == {"algo": "loha"}


def test_a_file_naming_modules_by_dotted_paths_is_refused_as_such(tmp_path):
    unet, tes = tiny_model("sd1")
    key = "lora_unet_down_blocks_0.attentions.0.transformer_blocks.0.attn1.to_q"
    path = tmp_path / "dotted.safetensors"
    safetensors.torch.save_file({f"{key}.lora_down.weight": torch.zeros(4, 16),
                                 f"{key}.lora_up.weight": torch.zeros(16, 4)}, str(path))
    with pytest.raises(ValueError, match=r"dotted.safetensors: keys like .* give the module as a dotted path"):
        load_network(unet, path, text_encoders=tes)
