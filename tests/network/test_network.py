"""create_network / load_network on whole models: counts, names, forward, save/load, merge, stacking, groups."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from lorakit import create_network, load_network
from lorakit.algos import OptionError

from . import meta_model
from .tiny import randomize, run_unet, tiny_model


def counts(net):
    out = {}
    for entry in net.entries.values():
        out[entry.component] = out.get(entry.component, 0) + 1
    return out


@pytest.mark.parametrize("name,expected", [("sd15", {"unet": 192, "text_encoder": 72}),
                                           ("sdxl", {"unet": 722, "text_encoder": 72, "text_encoder_2": 192})])
def test_attn_mlp_is_kohyas_default_set(name, expected):
    unet, tes = meta_model(name)
    net = create_network(unet, tes, preset="attn-mlp", dim=4)
    assert counts(net) == expected


def test_names_as_the_ecosystem_writes_them():
    unet, tes = meta_model("sdxl")
    names = set(create_network(unet, tes, preset="attn-mlp").entries)
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in names  # SGM style for SDXL
    assert "lora_te1_text_model_encoder_layers_0_self_attn_k_proj" in names
    assert "lora_te2_text_model_encoder_layers_31_mlp_fc2" in names
    unet, tes = meta_model("sd15")
    names = set(create_network(unet, tes, preset="attn-mlp").entries)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in names
    assert "lora_te_text_model_encoder_layers_0_mlp_fc1" in names


def test_presets_select_what_their_docs_say():
    unet, tes = meta_model("sd15")
    full = counts(create_network(unet, tes, preset="full", dim=4))
    lin = create_network(unet, tes, preset="full-lin", dim=4)
    attn = counts(create_network(unet, tes, preset="attn-only", dim=4))
    unet_only = counts(create_network(unet, tes, preset="unet-only", dim=4))
    conv_only = create_network(unet, tes, preset="unet-convblock-only", dim=4)
    assert attn == {"unet": 16 * 8, "text_encoder": 12 * 4}
    assert "text_encoder" not in unet_only and unet_only["unet"] == full["unet"]
    assert full["unet"] > counts(lin)["unet"] > 192
    assert all(a.spec.kernel_numel == 1 for _, a in lin.adapters())  # no kernel > 1 conv
    assert not any("attentions" in n for n in conv_only.entries)  # ResNet convs and their time_emb_proj only
    assert "lora_unet_conv_in" in conv_only.entries and "lora_unet_conv_out" in conv_only.entries
    no_conv = counts(create_network(unet, tes, preset="full", dim=4, conv_dim=0))
    assert no_conv["unet"] < full["unet"]
    ia3 = create_network(unet, tes, preset="ia3", algo="ia3")
    on_input = {n for n, a in ia3.adapters() if a.on_input}
    assert len(ia3) == 16 * 5 + 12 * 3 and all(n.endswith(("ff_net_2", "mlp_fc2")) for n in on_input)
    assert len(on_input) == 16 + 12


def test_train_norm_adds_norm_adapters():
    unet, tes = meta_model("sd15")
    net = create_network(unet, tes, preset="attn-mlp", train_norm=True)
    norms = [n for n, a in net.adapters() if a.name == "norm"]
    assert norms and all("norm" in n for n in norms)


@pytest.mark.parametrize("preset", [None, {"target_module": ["LayerNorm", "GroupNorm"]}])
def test_algo_norm_without_train_norm_names_the_option(preset):
    """Norm layers get adapters only with train_norm; algo 'norm' is refused on the Linear/Conv layers."""
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Conv1d(8, 8, 1), nn.GroupNorm(2, 8))
    kwargs = {} if preset is None else {"preset": preset}
    with pytest.raises(ValueError, match=r"LayerNorm/GroupNorm layers are trained with the option train_norm=true"):
        create_network(model, algo="norm", **kwargs)
    net = create_network(model, algo="lora", dim=0, conv_dim=0, train_norm=True, **kwargs)  # what the hint says
    assert {n: a.name for n, a in net.adapters()} == {"lycoris_1": "norm", "lycoris_3": "norm"}


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
@pytest.mark.parametrize("algo,options", [("lora", {}), ("loha", {}), ("lokr", {"factor": 4}), ("ia3", {}),
                                          ("diag-oft", {"dim": 2}), ("lora", {"dora_wd": True})])
def test_apply_save_load_merge_restore(tmp_path, kind, algo, options):
    unet, tes = tiny_model(kind)
    base = run_unet(unet, kind)
    net = randomize(create_network(unet, tes, algo=algo, preset="full", **{"dim": 4, "alpha": 2, **options}))
    net.apply()
    adapted = run_unet(unet, kind)
    assert (adapted - base).abs().max() > 1e-4
    path = tmp_path / "out.safetensors"
    net.save(path, metadata={"ss_network_dim": "4"})
    net.restore()
    torch.testing.assert_close(run_unet(unet, kind), base, rtol=0, atol=0)

    loaded = load_network(unet, path, text_encoders=tes)
    assert set(loaded.entries) == set(net.entries)
    assert loaded.metadata["ss_network_dim"] == "4" and "sshs_model_hash" in loaded.metadata
    loaded.apply()
    torch.testing.assert_close(run_unet(unet, kind), adapted, rtol=1e-5, atol=1e-6)
    loaded.restore()
    loaded.merge(keep_backup=True)
    torch.testing.assert_close(run_unet(unet, kind), adapted, rtol=1e-4, atol=1e-5)
    loaded.unmerge()
    torch.testing.assert_close(run_unet(unet, kind), base, rtol=0, atol=0)


def test_state_dict_keys_are_file_keys_and_parameters_are_the_adapters():
    unet, tes = tiny_model("sd1")
    net = create_network(unet, tes, preset="attn-mlp", dim=4)
    keys = set(net.state_dict())
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha" in keys
    model_params = {id(p) for m in (unet, *tes) for p in m.parameters()}
    assert not any(id(p) in model_params for p in net.parameters())
    assert sum(p.numel() for p in net.parameters()) == sum(
        a.lora_down.numel() + a.lora_up.numel() for _, a in net.adapters())


def test_multiplier_and_stacking():
    unet, tes = tiny_model("sd1")
    base = run_unet(unet)
    a = randomize(create_network(unet, tes, preset="attn-mlp", dim=4), seed=1).apply()
    only_a = run_unet(unet)
    a.multiplier = 0.0
    torch.testing.assert_close(run_unet(unet), base, rtol=1e-6, atol=1e-6)
    a.multiplier = 1.0
    b = randomize(create_network(unet, tes, algo="loha", preset="attn-mlp", dim=2), seed=2).apply()
    both = run_unet(unet)
    a.multiplier = 0.0
    only_b = run_unet(unet)
    a.multiplier = 1.0
    with pytest.raises(RuntimeError, match="restore in reverse order"):
        a.restore()
    b.restore()
    torch.testing.assert_close(run_unet(unet), only_a)
    a.restore()
    torch.testing.assert_close(run_unet(unet), base, rtol=0, atol=0)
    assert (both - only_a).abs().max() > 1e-5 and (both - only_b).abs().max() > 1e-5


def test_generic_model_gets_every_layer_under_lycoris_prefix(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
    x = torch.randn(2, 3, 4, 4)
    base = model(x)
    net = randomize(create_network(model, algo="lokr", dim=4, train_norm=True), scale=0.2)
    assert set(net.entries) == {"lycoris_0", "lycoris_1", "lycoris_3"}
    net.apply()
    out = model(x)
    assert (out - base).abs().max() > 1e-4
    net.save(tmp_path / "g.safetensors")
    net.restore()
    load_network(model, tmp_path / "g.safetensors").apply()
    torch.testing.assert_close(model(x), out)


def test_generic_model_leaves_out_layers_an_adapter_cannot_act_on_and_says_so(caplog, tmp_path):
    """torch's MultiheadAttention reads out_proj.weight itself (an adapter's forward there never runs: it would
    neither train nor match its merged form); a grouped conv is a layer kind the algorithms do not take. Both are
    left out of the default selection with a warning naming them. TransformerEncoderLayer's inference fast path
    would skip linear1/linear2's forward too: an applied network keeps it off, so the applied output (created or
    loaded) equals the merged one."""
    torch.manual_seed(0)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 8, 3, padding=1)
            self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
            self.encoder = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)

        def forward(self, x):
            h = self.depthwise(self.conv(x)).flatten(2).transpose(1, 2)
            return self.encoder(h)

    model = Model().eval()
    x = torch.randn(2, 4, 3, 3)
    with caplog.at_level("WARNING", logger="lorakit"):
        net = randomize(create_network(model, algo="lora", dim=2), scale=0.3)
    assert set(net.entries) == {"lycoris_conv", "lycoris_encoder_linear1", "lycoris_encoder_linear2"}
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "'encoder.self_attn.out_proj' (nn.MultiheadAttention never calls" in warned
    assert "'depthwise' (Conv2d with groups=8" in warned
    with torch.no_grad():
        net.apply()
        applied = model(x)
        net.restore()
        assert not model.encoder._forward_pre_hooks  # restore takes the fast-path guard away again
        net.merge(keep_backup=True)
        torch.testing.assert_close(model(x), applied)
        net.unmerge()
        net.save(tmp_path / "m.safetensors")
        load_network(model, tmp_path / "m.safetensors").apply()
        torch.testing.assert_close(model(x), applied)


@pytest.mark.parametrize("algo", ["lora", "loha", "ia3", "diag-oft"])
def test_a_transformer_encoder_given_a_padding_mask_hands_its_adapters_plain_tensors(algo):
    """nn.TransformerEncoder in inference with src_key_padding_mask packs its input into a nested tensor, which no
    adapter takes (they failed with "NestedTensorImpl doesn't support sizes"): an applied network keeps it off
    nesting, and the output at the unmasked positions equals the merged model's; restore gives nesting back."""
    torch.manual_seed(0)
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), 2,
                                  enable_nested_tensor=True).eval()
    x, mask = torch.randn(2, 5, 8), torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    net = randomize(create_network(model, algo=algo, dim=2), scale=0.3)
    with torch.no_grad():
        net.apply()
        applied = model(x, src_key_padding_mask=mask)
        net.restore()
        assert model.use_nested_tensor
        net.merge(keep_backup=True)
        merged = model(x, src_key_padding_mask=mask)  # the fast path, nested: masked positions come back as 0
    torch.testing.assert_close(applied[~mask], merged[~mask])


def test_optimizer_groups_with_loraplus_and_text_encoder_lr():
    unet, tes = tiny_model("sd1")
    net = create_network(unet, tes, preset="attn-mlp", dim=4, loraplus_lr_ratio=16)
    groups = net.optimizer_param_groups(unet_lr=1e-4, text_encoder_lr=5e-5)
    by_name = {g["name"]: g for g in groups}
    assert by_name["unet"]["lr"] == 1e-4 and by_name["unet_plus"]["lr"] == pytest.approx(1.6e-3)
    assert by_name["text_encoder"]["lr"] == 5e-5 and by_name["text_encoder_plus"]["lr"] == pytest.approx(8e-4)
    ups = {id(a.lora_up) for _, a in net.adapters()}
    assert all(id(p) in ups for p in by_name["unet_plus"]["params"])
    assert sum(len(g["params"]) for g in groups) == len(list(net.parameters()))
    # the ratio multiplies a learning rate: without one it would silently not apply
    with pytest.raises(ValueError, match=r"adapter 'lora_unet_.*' has a LoRA\+ ratio 16, which multiplies a "
                                         r"learning rate: pass unet_lr or default_lr"):
        net.optimizer_param_groups()
    assert {g["lr"] for g in net.optimizer_param_groups(default_lr=1.0)} == {1.0, 16.0}
    # text_encoder_lr 0: the text-encoder adapters are frozen and left out
    groups = net.optimizer_param_groups(unet_lr=1e-4, text_encoder_lr=0)
    assert {g["name"] for g in groups} == {"unet", "unet_plus"}


@pytest.mark.parametrize("algo,boosted", [
    ("lora", {"lora_up"}), ("dylora", {"lora_up"}), ("loha", {"hada_w1_a", "hada_w2_a"}),
    ("lokr", {"lokr_w2", "lokr_w2_a"}), ("glora", {"a1", "b1"}),
    ("ia3", set()), ("diag-oft", set()), ("boft", set()), ("full", set())])
def test_loraplus_boosts_each_algorithms_output_side_factors(caplog, algo, boosted):
    """LoRA+ for every algorithm: the output-side factors train at ratio x lr; an algorithm without one trains at
    the plain rate, and the log says so by name."""
    unet, tes = tiny_model("sd1")
    options = {"dim": 4} if algo in ("lora", "dylora", "loha", "lokr", "glora") else {}
    net = create_network(unet, tes, algo=algo, preset="attn-mlp", loraplus_lr_ratio=16, **options)
    with caplog.at_level("WARNING"):
        groups = net.optimizer_param_groups(unet_lr=1e-4, text_encoder_lr=5e-5)
    names = {id(p): n.rsplit(".", 1)[-1] for n, p in net.named_parameters()}
    plus = {names[id(p)] for g in groups if g["name"].endswith("_plus") for p in g["params"]}
    assert plus == boosted
    assert all(g["lr"] == pytest.approx(16 * (1e-4 if g["name"] == "unet_plus" else 5e-5))
               for g in groups if g["name"].endswith("_plus"))
    said = [r.getMessage() for r in caplog.records if "LoRA+" in r.getMessage()]
    assert said == ([] if boosted else [f"LoRA+ has no effect on {algo} adapters: they have no output-side (B) "
                                        "factor to train at the ratio, so they train at the plain learning rate"])


def test_block_dims_and_lr_weights():
    unet, tes = tiny_model("sd1")
    dims = [2] * 12 + [3] + [5] * 12
    net = create_network(unet, tes, preset="attn-mlp", dim=4, block_dims=",".join(map(str, dims)),
                         down_lr_weight="0,0,0,0,0,0,0,0,0,0,0,0", up_lr_weight="cosine")
    ranks = {n: a.rank for n, a in net.adapters()}
    assert not any(n.startswith("lora_unet_down_blocks") for n in ranks)  # lr weight 0: no adapter
    assert ranks["lora_unet_mid_block_attentions_0_proj_in"] == 3
    assert ranks["lora_unet_up_blocks_1_attentions_0_proj_in"] == 5
    assert ranks["lora_te_text_model_encoder_layers_0_mlp_fc1"] == 4
    groups = net.optimizer_param_groups(unet_lr=1.0, text_encoder_lr=1.0)
    lrs = sorted({g["lr"] for g in groups})
    assert lrs[-1] == 1.0 and len(lrs) > 3  # the cosine shape spreads the up blocks' lr
    with pytest.raises(ValueError, match=r"has a block lr weight .*: pass unet_lr or default_lr"):
        net.optimizer_param_groups(text_encoder_lr=1.0)


def test_block_multipliers_with_seed_003_layout():
    unet, tes = meta_model("sdxl")
    net = create_network(unet, tes, preset="attn-mlp", dim=4)
    values = [0.0] + [1.0] * 9 + [0.5] + [2.0] * 9  # BASE, IN00-08, MID, OUT00-08
    net.set_block_multipliers(values)
    got = {n: a.multiplier for n, a in net.adapters()}
    assert got["lora_te1_text_model_encoder_layers_0_mlp_fc1"] == 0.0
    assert got["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"] == 1.0
    assert got["lora_unet_middle_block_1_proj_in"] == 0.5
    assert got["lora_unet_output_blocks_0_1_proj_out"] == 2.0
    net.multiplier = 0.5
    assert net.get_submodule("lora_unet_output_blocks_0_1_proj_out").multiplier == 1.0
    net.set_block_multipliers(None)  # cleared: every adapter back at the network's multiplier
    assert {a.multiplier for _, a in net.adapters()} == {0.5}
    with pytest.raises(ValueError, match="no sdxl block layout has 7 values"):
        net.set_block_multipliers([1.0] * 7)


# the LoRA Block Weight extension (hako-mikan/sd-webui-lora-block-weight, scripts/lora_block_weight.py):
# to26() spreads a 17/12/20-value vector onto its 26 blocks, [0] * 26 for the blocks the vector leaves out,
# and a module takes the value of its block among the 26 (1 for modules in none: time embedding, conv_out)
BLOCKID26 = ["BASE", *(f"IN{i:02d}" for i in range(12)), "MID", *(f"OUT{i:02d}" for i in range(12))]


def lbw_extension_weight(values, layout, path, component):
    from lorakit.network.blocks import LBW26

    full = [0.0] * 26
    for name, value in zip(layout.names, values):
        full[BLOCKID26.index(name)] = value
    at = LBW26.index(path, component)
    return 1.0 if at is None else full[at]


@pytest.mark.parametrize("model,n", [("sd15", 17), ("sdxl", 12), ("sd15", 26), ("sdxl", 20)])
def test_block_multipliers_of_lbw_vectors_are_the_extensions(model, n):
    """Every module of the full preset (resnets, samplers, conv_in, conv_out, time embedding, text encoders)."""
    from lorakit.network.blocks import layout_for

    unet, tes = meta_model(model)
    net = create_network(unet, tes, preset="full", dim=1, conv_dim=1)
    values = [0.1 + 0.01 * i for i in range(n)]
    net.set_block_multipliers(values)
    layout = layout_for("sdxl" if model == "sdxl" else "sd", n)
    got = {name: a.multiplier for name, a in net.adapters()}
    want = {name: lbw_extension_weight(values, layout, e.path, e.component) for name, e in net.entries.items()}
    assert got == pytest.approx(want, abs=1e-12)
    if n < 20:  # the blocks the short vector leaves out (resnet-only blocks, samplers, conv_in) are off
        assert 0.0 in got.values()


def test_bad_network_options():
    unet, tes = tiny_model("sd1")
    with pytest.raises(OptionError, match="unknown network option 'conv_dimm'.*did you mean 'conv_dim'"):
        create_network(unet, tes, conv_dimm=4)
    with pytest.raises(OptionError, match="algo 'ia3' does not accept option 'dropout'"):
        create_network(unet, tes, algo="ia3", dropout=0.1)
    # the option as the user spelt it (LyCORIS' 'constrain'), whatever else was given beside it
    refused = r"algo 'lora' does not accept option 'constrain' \(= constraint, given 0.1\)"
    with pytest.raises(OptionError, match=refused):
        create_network(unet, tes, algo="lora", dropout=0.1, constrain=0.1)
    with pytest.raises(OptionError, match="unknown preset 'attn_mlp'.*did you mean 'attn-mlp'"):
        create_network(unet, tes, preset="attn_mlp")
    with pytest.raises(OptionError, match="'dim'"):
        create_network(unet, tes, dim="many")


def test_lycoris_and_sd_scripts_spellings_of_network_options_mean_what_they_say():
    """LycorisNetwork's conv_lora_dim, LyCORIS kohya.py's use_conv_cp / disable_conv_cp (its negative spelling of
    use_tucker), sd-scripts' neuron_dropout (--network_dropout) and an algo in any case select the same as
    lorakit's own names."""
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.Flatten(), nn.Linear(8, 8))
    net = create_network(model, algo="LoHa", dim=4, conv_lora_dim=2, neuron_dropout=0.25, disable_conv_cp="False")
    conv, linear = net.lycoris_0, net.lycoris_2
    assert (conv.name, conv.options.dim, linear.name, linear.options.dim) == ("loha", 2, "loha", 4)
    assert conv.options.dropout == linear.options.dropout == 0.25
    assert conv.options.use_tucker  # disable_conv_cp=False: Tucker on
    assert not create_network(model, disable_conv_cp="True").lycoris_0.options.use_tucker
    assert create_network(model, use_conv_cp="True").lycoris_0.options.use_tucker


def test_conv_dim_and_conv_alpha_left_unset_are_dim_and_alpha_as_in_lycoris():
    """LyCORIS' create_network: conv_dim = kwargs.get("conv_dim", network_dim), conv_alpha likewise from alpha."""
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.Flatten(), nn.Linear(8, 8))
    net = create_network(model, dim=4, alpha=2.0)
    assert [(a.options.dim, a.options.alpha) for _, a in net.adapters()] == [(4, 2.0), (4, 2.0)]
    net = create_network(model, dim=4, alpha=2.0, conv_dim=2, conv_alpha=0.5)
    assert [(a.options.dim, a.options.alpha) for _, a in net.adapters()] == [(2, 0.5), (4, 2.0)]


def test_a_name_of_a_container_suggests_its_first_layer(tmp_path):
    """kohya's to_out is to_out_0 (a ModuleList around the Linear): the error says so."""
    from safetensors.torch import save_file

    unet, tes = tiny_model("sd1")
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out"
    width = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_out[0].in_features
    save_file({f"{name}.lora_down.weight": torch.zeros(2, width), f"{name}.lora_up.weight": torch.zeros(width, 2)},
              str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match=rf"module '{name}': .*did you mean '{name}_0', its first layer\?"):
        load_network(unet, tmp_path / "x.safetensors", text_encoders=tes)
    # a module that is no container (an attention block, whose first child is a Linear) gets no such hint
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1"
    save_file({f"{name}.lora_down.weight": torch.zeros(2, width), f"{name}.lora_up.weight": torch.zeros(width, 2)},
              str(tmp_path / "y.safetensors"))
    with pytest.raises(ValueError, match=rf"module '{name}': ") as caught:
        load_network(unet, tmp_path / "y.safetensors", text_encoders=tes)
    assert "its first layer" not in str(caught.value)


def test_applying_freezes_the_adapted_layers_and_restore_gives_their_flags_back():
    """Every adapter path treats the layer's weight and bias as constants; while applied they are frozen (no
    weight-sized .grad each step), the rest of the model keeps its flags, and restore() gives them back, in
    the reverse order of stacked networks."""
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4), nn.LayerNorm(4))
    model[2].bias.requires_grad_(False)  # a flag of the user's own, given back as it was
    first = create_network(model, algo="lora", dim=2, preset={"target_name": ["0", "2"]}).apply()
    second = create_network(model, algo="ia3", preset={"target_name": ["0"]}).apply()
    assert not any(p.requires_grad for p in [*model[0].parameters(), *model[2].parameters()])
    assert all(p.requires_grad for p in model[3].parameters())
    model(torch.randn(3, 8)).sum().backward()
    assert all(p.grad is None for p in [*model[0].parameters(), *model[2].parameters()])
    second.restore()
    assert not model[0].weight.requires_grad  # the first network still adapts it
    first.restore()
    assert model[0].weight.requires_grad and model[0].bias.requires_grad and model[2].weight.requires_grad
    assert not model[2].bias.requires_grad


def _gpt2(seed=0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=8, bos_token_id=0,
                                     eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).double().eval()


def _conv1d_as_linear(model):
    """The same model with every transformers Conv1D replaced by the nn.Linear it computes (weight transposed)."""
    import copy

    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if type(module).__name__ == "Conv1D":
            n_in, n_out = module.weight.shape
            linear = nn.Linear(n_in, n_out).double()
            with torch.no_grad():
                linear.weight.copy_(module.weight.t())
                linear.bias.copy_(module.bias)
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, linear)
    return model


@pytest.mark.parametrize("algo,options", [("lora", {}), ("lora", {"dora_wd": True}), ("loha", {}),
                                          ("lokr", {"factor": 4}), ("ia3", {}), ("diag-oft", {"dim": 4}),
                                          ("boft", {"dim": 6}), ("glora", {}), ("full", {})],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_gpt2_conv1d_layers_are_adapted_as_the_linears_they_compute(algo, options, caplog):
    """transformers' Conv1D (GPT-2's attention and MLP) stores a Linear's weight transposed. Reference: the same
    model with each Conv1D replaced by that nn.Linear, carrying the same adapters (loaded from the state dict):
    the outputs agree, and merge/unmerge and restore act on the Conv1D's own weight."""
    model = _gpt2()
    reference = _conv1d_as_linear(model)
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    original = model(ids).logits
    options = {"dim": 2, "alpha": 1, **options, "preset": {"exclude_name": ["lm_head"]}}
    with caplog.at_level("WARNING", logger="lorakit"):
        net = create_network(model, algo=algo, **options)
    assert "left without an adapter" not in caplog.text
    assert {"lycoris_transformer_h_0_attn_c_attn", "lycoris_transformer_h_0_attn_c_proj",
            "lycoris_transformer_h_0_mlp_c_fc", "lycoris_transformer_h_0_mlp_c_proj"} <= set(net.entries)
    randomize(net.double(), scale=0.2)
    same = create_network(reference, algo=algo, **options).double()
    same.load_state_dict(net.state_dict())
    net.apply()
    same.apply()
    adapted = model(ids).logits
    assert torch.allclose(adapted, reference(ids).logits, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(adapted, original)
    c_attn = model.transformer.h[0].attn.c_attn
    weight = c_attn.weight.clone()
    net.merge(keep_backup=True)
    assert torch.allclose(model(ids).logits, adapted, rtol=1e-9, atol=1e-9)
    assert not torch.equal(c_attn.weight, weight)
    net.unmerge()
    assert torch.equal(c_attn.weight, weight)
    net.restore()
    assert "forward" not in c_attn.__dict__ and torch.equal(model(ids).logits, original)


def test_layers_no_algorithm_takes_are_named_when_a_preset_asks_for_them(caplog):
    """An embedding is named when a preset asks for it, and left out quietly by the default selection; GPT-2's
    head is tied to its embedding (named, see the tied-weights test)."""
    model = _gpt2()
    with caplog.at_level("WARNING", logger="lorakit"):
        net = create_network(model, algo="lora", dim=2)
    assert "lycoris_lm_head" in net.entries and "lycoris_transformer_h_0_attn_c_attn" in net.entries
    assert "'transformer.wte' (" not in caplog.text
    assert net.tied == {"lycoris_lm_head": ["transformer.wte.weight", "lm_head.weight"]}  # GPT-2 ties the head
    caplog.clear()
    with caplog.at_level("WARNING", logger="lorakit"):
        create_network(model, algo="lora", dim=2, preset={"target_name": ["c_attn", "transformer.wte"]})
    assert "'transformer.wte' (Embedding is not a layer kind" in caplog.text and "match nothing" not in caplog.text


def test_tied_weights_are_named_and_merging_them_is_refused(caplog):
    """A head tied to the embedding (GPT-2's lm_head and wte): the applied network changes the head alone, but a
    merge would write into the shared weight and change the embedding too; it is refused, naming both."""
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 6)
            self.body = nn.Linear(6, 6)
            self.head = nn.Linear(6, 10, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            return self.head(self.body(self.emb(ids)))

    model = Tied()
    with caplog.at_level("WARNING", logger="lorakit"):
        net = randomize(create_network(model, algo="lora", dim=2), scale=0.3)
    assert net.tied == {"lycoris_head": ["emb.weight", "head.weight"]}
    assert "share their weights with another module (tied), e.g. lycoris_head: emb.weight, head.weight" in caplog.text
    before = model.emb.weight.clone()
    with pytest.raises(ValueError, match="merge: 1 adapted layer.*lycoris_head: emb.weight, head.weight"):
        net.merge()
    assert torch.equal(model.emb.weight, before)
    untied = create_network(nn.Sequential(nn.Linear(4, 4)), algo="lora", dim=2)
    assert untied.tied == {}


def test_one_layer_reached_by_two_paths_is_not_tied():
    """The same module object under two names (self.b = self.a) changes with its adapter everywhere it is used,
    merged or applied alike: it was reported as tied and its merge refused."""
    class TwoPaths(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = self.a

        def forward(self, x):
            return self.b(self.a(x))

    model = TwoPaths()
    net = randomize(create_network(model, algo="lora", dim=2), scale=0.3)
    assert net.tied == {}
    x = torch.randn(3, 4)
    with torch.no_grad():
        net.apply()
        applied = model(x)
        net.restore()
        net.merge()
        torch.testing.assert_close(model(x), applied)


def test_oft_blocks_of_size_one_are_named(caplog):
    model = nn.Sequential(nn.Linear(8, 7), nn.Linear(7, 8))  # 7 outputs: blocks of 1, which rotate nothing
    with caplog.at_level("WARNING", logger="lorakit"):
        net = create_network(model, algo="diag-oft", dim=4)
    assert dict(net.adapters())["lycoris_0"].oft_blocks.shape[-1] == 1
    assert "1 OFT adapter(s) have blocks of size 1" in caplog.text and "lycoris_0" in caplog.text


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_optimizer_groups_put_the_text_encoders_first(kind):
    """sd-scripts' prepare_optimizer_params appends the text-encoder groups before the U-Net's; DAdaptAdan and
    DAdaptAdaGrad step every group with the first group's lr."""
    unet, tes = tiny_model(kind)
    net = create_network(unet, tes, preset="attn-mlp", dim=4, loraplus_lr_ratio=4)
    names = [g["name"] for g in net.optimizer_param_groups(unet_lr=1.0, text_encoder_lr=0.5)]
    encoders = ["text_encoder", "text_encoder_plus"] + (["text_encoder_2", "text_encoder_2_plus"] if kind == "sdxl"
                                                        else [])
    assert names == encoders + ["unet", "unet_plus"]


def test_a_loraplus_side_ratio_of_0_falls_back_to_the_common_ratio():
    """sd-scripts: `loraplus_text_encoder_lr_ratio or loraplus_lr_ratio` (0 is falsy); all 0: no LoRA+."""
    unet, tes = tiny_model("sd1")
    net = create_network(unet, tes, preset="attn-mlp", dim=4, loraplus_lr_ratio=16, loraplus_text_encoder_lr_ratio=0)
    lrs = {g["name"]: g["lr"] for g in net.optimizer_param_groups(unet_lr=1e-3, text_encoder_lr=5e-5)}
    assert lrs == pytest.approx({"text_encoder": 5e-5, "text_encoder_plus": 8e-4, "unet": 1e-3, "unet_plus": 1.6e-2})
    net = create_network(unet, tes, preset="attn-mlp", dim=4, loraplus_lr_ratio=0)
    assert [g["name"] for g in net.optimizer_param_groups(unet_lr=1e-3)] == ["text_encoder", "unet"]


@pytest.mark.parametrize("algo,options", [("diag-oft", {}), ("diag-oft", {"constraint": 1e-3, "rescaled": True}),
                                          ("boft", {}), ("boft", {"rescaled": True})])
def test_an_oft_network_on_the_meta_device_lists_its_file_keys(algo, options):
    """As every other algorithm (and LyCORIS' OFT modules) does: key and shape checks of full-size models on meta."""
    def model():
        return nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Conv1d(16, 8, 3))

    real = create_network(model(), algo=algo, dim=4, **options).state_dict()
    with torch.device("meta"):
        layers = model()
    on_meta = create_network(layers, algo=algo, dim=4, **options).state_dict()
    assert {k: t.shape for k, t in on_meta.items()} == {k: t.shape for k, t in real.items()}
    assert {k: float(t) for k, t in on_meta.items() if k.endswith("alpha")} == \
        {k: float(t) for k, t in real.items() if k.endswith("alpha")}  # untrained blocks: the same alpha


@pytest.mark.parametrize("name,part", [("train_t5xxl", "T5-XXL"), ("train_llm_adapter", "LLM adapter")])
def test_lycoris_options_for_other_models_text_encoders(caplog, name, part):
    """LyCORIS' train_t5xxl and train_llm_adapter: off (LyCORIS' default) they change nothing here, with a warning
    naming them; on, an error naming the option, as SD1/SD2/SDXL have no such encoder."""
    unet, tes = tiny_model("sd1")
    with caplog.at_level("WARNING"):
        net = create_network(unet, tes, preset="attn-mlp", **{name: "False"})
    assert name in caplog.text and part in caplog.text
    assert {n for n, _ in net.adapters()} == {n for n, _ in create_network(unet, tes, preset="attn-mlp").adapters()}
    with pytest.raises(OptionError, match=f"network option '{name}' .*no {part}"):
        create_network(unet, tes, **{name: True})
