"""lorakit.kohya driven the way sd-scripts' train_network.py (and gen_img) drive a --network_module."""

from __future__ import annotations

import copy
import importlib
import re
import statistics
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from lorakit import kohya
from lorakit.algos import OptionError
from lorakit.formats import read_metadata, save_file
from lorakit.network.names import adapter_name

from .tiny import randomize, tiny_model


def fresh(kind):
    """A private copy of the tiny model (tests that apply or merge must not touch the shared one), and the
    text_encoder argument as sd-scripts passes it: one model for SD1, a list for SDXL."""
    unet, tes = copy.deepcopy(tiny_model(kind))
    return unet, tes, (tes if kind == "sdxl" else tes[0])


def forward(unet, tes, kind, seed=0):
    """Text encoders -> U-Net, as a training step runs them (SDXL: both hidden states, te2's pooled output)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 100, (1, 5), generator=g)
    x, t = torch.randn(1, 4, 16, 16, generator=g), torch.tensor([10])  # 16: the mid block sees 2x2 tokens
    if kind == "sdxl":
        o1, o2 = tes[0](ids), tes[1](ids)
        cond = torch.cat([o1.last_hidden_state, o2.last_hidden_state], dim=-1)
        extra = {"added_cond_kwargs": {"text_embeds": o2.text_embeds, "time_ids": torch.randn(1, 3, generator=g)}}
        return unet(x, t, cond, **extra).sample
    return unet(x, t, tes[0](ids).last_hidden_state).sample


def run(unet, tes, kind):
    with torch.no_grad():
        return forward(unet, tes, kind)


def model_state(unet, tes):
    return {f"{i}.{k}": v.clone() for i, m in enumerate((unet, *tes)) for k, v in m.state_dict().items()}


def train_like_sd_scripts(args, unet, text_encoder, kind, steps=2):
    """NetworkTrainer.train's network calls, in its order (train_network.py, sd-scripts 0010c81)."""
    network_module = importlib.import_module(args.network_module)
    net_kwargs = {}
    for net_arg in args.network_args or []:
        key, value = net_arg.split("=", 1)
        net_kwargs[key] = value
    if "dropout" not in net_kwargs:
        net_kwargs["dropout"] = args.network_dropout  # "workaround for LyCORIS"
    network = network_module.create_network(1.0, args.network_dim, args.network_alpha, None, text_encoder, unet,
                                            neuron_dropout=args.network_dropout, **net_kwargs)
    assert hasattr(network, "set_multiplier") and hasattr(network, "apply_max_norm_regularization")
    network.initial = {n: p.detach().clone() for n, p in network.named_parameters()}  # for the test
    train_unet = not args.network_train_text_encoder_only
    train_text_encoder = not args.network_train_unet_only
    network.apply_to(text_encoder, unet, train_text_encoder, train_unet)
    network.enable_gradient_checkpointing()

    support_multiple_lrs = hasattr(network, "prepare_optimizer_params_with_multiple_te_lrs")
    text_encoder_lr = args.text_encoder_lr
    if not support_multiple_lrs and isinstance(text_encoder_lr, list):
        text_encoder_lr = None if len(text_encoder_lr) == 0 else text_encoder_lr[0]
    try:
        if support_multiple_lrs:
            results = network.prepare_optimizer_params_with_multiple_te_lrs(text_encoder_lr, args.unet_lr,
                                                                            args.learning_rate)
        else:
            results = network.prepare_optimizer_params(text_encoder_lr, args.unet_lr, args.learning_rate)
        trainable_params, lr_descriptions = results if type(results) is tuple else (results, None)
    except TypeError:
        trainable_params, lr_descriptions = network.prepare_optimizer_params(text_encoder_lr, args.unet_lr), None
    optimizer = torch.optim.AdamW(trainable_params, lr=args.learning_rate, weight_decay=0.0)
    network.prepare_grad_etc(text_encoder, unet)
    tes = text_encoder if isinstance(text_encoder, list) else [text_encoder]

    norms = None
    network.on_epoch_start(text_encoder, unet)
    for step in range(steps):
        network.on_step_start(text_encoder, unet)
        with torch.set_grad_enabled(True):
            pred = forward(unet, tes, kind, seed=step)
        loss = F.mse_loss(pred, torch.randn(pred.shape, generator=torch.Generator().manual_seed(99)))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(network.get_trainable_params(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if args.scale_weight_norms:
            norms = network.apply_max_norm_regularization(args.scale_weight_norms, "cpu")
    network.save_weights(args.output, None, {"ss_network_module": args.network_module, "ss_steps": str(steps)})
    return network, trainable_params, lr_descriptions, norms


def sd_args(tmp_path, **over):
    args = dict(network_module="lorakit.kohya", network_dim=4, network_alpha=1.0, network_dropout=None,
                network_args=None, network_train_unet_only=False, network_train_text_encoder_only=False,
                text_encoder_lr=None, unet_lr=None, learning_rate=1e-2, scale_weight_norms=None,
                output=str(tmp_path / "last.safetensors"))
    return SimpleNamespace(**{**args, **over})


# ----- a training run, as train_network.py does it -----

@pytest.mark.parametrize("kind,over", [
    ("sd1", {"network_args": ["algo=lokr", "conv_dim=2", "conv_alpha=1", "factor=4", "preset=full"]}),
    ("sdxl", {"network_args": ["algo=lora", "dora_wd=True", "rank_dropout=0.1", "preset=attn-mlp",
                               "loraplus_lr_ratio=4"], "network_dropout": 0.1, "text_encoder_lr": [1e-3, 2e-3],
              "scale_weight_norms": 1.0}),
    ("sd1", {"network_args": ["algo=loha", "use_scalar=True"], "network_train_unet_only": True, "unet_lr": 1e-3}),
])
def test_training_run_changes_only_the_network(tmp_path, kind, over):
    unet, tes, te_arg = fresh(kind)
    before = model_state(unet, tes)
    args = sd_args(tmp_path, **over)
    net, params, descriptions, norms = train_like_sd_scripts(args, unet, te_arg, kind)

    assert len(descriptions) == len(params) and all(isinstance(d, str) for d in descriptions)
    after = model_state(unet, tes)
    assert all(torch.equal(before[k], after[k]) for k in before)  # the models are frozen
    moved = {n.split(".")[0] for n, p in net.named_parameters() if not torch.equal(p, net.initial[n])}
    assert moved == set(net.entries)  # every adapter trained
    assert bool(net.text_encoder_loras) != args.network_train_unet_only
    assert set(read_metadata(args.output)) >= {"sshs_model_hash", "sshs_legacy_hash", "ss_network_module"}
    if norms is not None:
        keys_scaled, mean_norm, maximum_norm = norms
        assert isinstance(keys_scaled, int) and 0 < mean_norm <= maximum_norm <= args.scale_weight_norms * (1 + 1e-5)

    # resume from the saved file (--network_weights): same adapters, same numbers
    net.restore()
    net2 = kohya.create_network(1.0, args.network_dim, args.network_alpha, None, te_arg, unet,
                                **dict(a.split("=", 1) for a in args.network_args))
    net2.apply_to(te_arg, unet, not args.network_train_unet_only, True)
    info = net2.load_weights(args.output)
    assert not info.missing_keys and not info.unexpected_keys
    saved = net2.state_dict()
    for key, value in net.state_dict().items():
        torch.testing.assert_close(saved[key], value)


def test_unet_only_leaves_the_text_encoder_alone(tmp_path):
    unet, tes, te_arg = fresh("sd1")
    net = kohya.create_network(1.0, 4, 1.0, None, te_arg, unet)
    net.apply_to(te_arg, unet, False, True)
    assert not net.text_encoder_loras and net.unet_loras
    assert all(n.startswith("lora_unet_") for n in net.state_dict())
    randomize(net)
    with torch.no_grad():
        ids = torch.arange(2, 7)[None]
        assert torch.equal(tes[0](ids).last_hidden_state, tiny_model("sd1")[1][0](ids).last_hidden_state)
    net.restore()
    te_only = kohya.create_network(1.0, 4, 1.0, None, te_arg, unet)
    te_only.apply_to(te_arg, unet, True, False)
    assert te_only.text_encoder_loras and not te_only.unet_loras


# ----- network_args -----

@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_string_network_args_are_typed(kind):
    unet, tes = tiny_model(kind)  # created, never applied: the shared model stays untouched
    te_arg = tes if kind == "sdxl" else tes[0]
    net = kohya.create_network(1.0, 4, 2.0, None, te_arg, unet, neuron_dropout=0.1, dropout=0.1, algo="lora",
                               preset="attn-mlp", dora_wd="True", rank_dropout="0.1", module_dropout="0",
                               use_tucker="False")
    opts = {a.options for _, a in net.adapters()}
    assert len(opts) == 1
    o = opts.pop()
    assert (o.dora_wd, o.rank_dropout, o.dropout, o.module_dropout, o.dim, o.alpha) == (True, 0.1, 0.1, 0.0, 4, 2.0)
    assert all(a.spec.kernel_numel == 1 for _, a in net.adapters())  # attn-mlp: no 3x3 convs
    assert len(net.text_encoder_loras) > 0 and len(net.unet_loras) > 0

    lokr = kohya.create_network(0.5, None, 2, None, te_arg, unet, dropout=None, algo="lokr", conv_dim="2",
                                conv_alpha="1", factor="4", preset="full")
    convs = [a for _, a in lokr.adapters() if a.spec.kernel_numel > 1]
    assert convs and all(a.name == "lokr" for _, a in lokr.adapters())
    assert {(a.options.dim, a.options.alpha) for a in convs} == {(2, 1.0)}
    assert {a.options.dim for _, a in lokr.adapters() if a.spec.kernel_numel == 1} == {4}  # network_dim None: 4
    assert lokr.multiplier == 0.5
    # network_dim left unset: network_args dim is taken
    assert {a.options.dim for _, a in kohya.create_network(1.0, None, 1.0, None, te_arg, unet, dim="8").adapters()} \
        == {8}


@pytest.mark.parametrize("kwargs,named", [
    ({"conv_dim": "abc"}, "'conv_dim'"),
    ({"dropout": "x"}, "'dropout'"),
    ({"conv_dimm": "4"}, "'conv_dimm'"),
    ({"dora_wd": "maybe"}, "'dora_wd'"),
    ({"rank_dropout": "1.5"}, "'rank_dropout'"),
    ({"algo": "lorra"}, "'lorra'"),
    ({"preset": "attn_mlp"}, "'attn_mlp'"),
    ({"algo": "lokr", "factor": "2.5"}, "'factor'"),
    ({"train_norm": "yes please"}, "'train_norm'"),
    ({"block_dims": ",".join(["2"] * 24 + ["x"])}, "'block_dims'"),
    ({"down_lr_weight": "1,y,1"}, "'down_lr_weight'"),
    ({"loraplus_lr_ratio": "fast"}, "'loraplus_lr_ratio'"),
    ({"dim": "8"}, "network_dim"),  # repeats --network_dim
    ({"network_dim": "8"}, "'network_dim=8' repeats the script argument network_dim"),  # the script's own names
    ({"network_alpha": "2"}, "'network_alpha=2' repeats the script argument network_alpha"),
    # sd-scripts' --network_alpha defaults to 1: the message says so, and what to write instead
    ({"alpha": "8"}, r"sets --network_alpha to 1 when it is not given; give it as --network_alpha 8$"),
    ({"multiplier": "0.5"}, "'multiplier=0.5' repeats the script argument multiplier"),
    ({"dropout": "0.2"}, "--network_dropout"),  # disagrees with neuron_dropout below
])
def test_bad_network_args_are_errors_naming_the_arg(kwargs, named):
    unet, tes = tiny_model("sd1")
    with pytest.raises(OptionError, match=named):
        kohya.create_network(1.0, 4, 1.0, None, tes[0], unet, neuron_dropout=0.1, **kwargs)


def test_a_network_arg_of_none_is_not_given():
    # as train_network.py's dropout=args.network_dropout, None when unset: any arg at None is left out, so it
    # neither fails a type check nor repeats a script argument
    unet, tes = tiny_model("sd1")
    net = kohya.create_network(1.0, 4, 2.0, None, tes[0], unet, preset="attn-mlp", dropout=None, rank_dropout=None,
                               network_alpha=None, conv_dim=None)
    assert {(a.options.alpha, a.options.dropout, a.options.rank_dropout) for _, a in net.adapters()} == {(2.0, 0, 0)}


@pytest.mark.parametrize("algo", ["diag-oft", "boft", "glora", "ia3", "full"])
def test_lycoris_defaults_of_options_an_algo_does_not_use_are_ignored(caplog, algo):
    """LyCORIS reads bypass_mode (default False), block_size (default 4) and wd_on_output (default True) for every
    algorithm; given at those defaults to an algorithm that does not use them they change nothing, in lorakit.kohya
    and in `lorakit train` with network_module lycoris.kohya. Another value stays an error. (GLoRA uses bypass_mode,
    as in LyCORIS: there False is the default, and True is taken.)"""
    from lorakit.train.network_args import check_network_args

    unet, tes = tiny_model("sd1")
    args = {"algo": algo, "preset": "attn-mlp", "bypass_mode": "False", "block_size": "4", "wd_on_output": "True"}
    with caplog.at_level("WARNING"):
        net = kohya.create_network(1.0, 4, 1.0, None, tes[0], unet, **args)
    assert net.unet_loras and {a.name for _, a in net.adapters()} == {algo}
    assert ("bypass_mode=False" in caplog.text) == (algo != "glora") and "block_size=4" in caplog.text
    assert {a.options.bypass_mode for _, a in net.adapters()} == {None}
    values = {"network_module": "lycoris.kohya", "network_args": [f"{k}={v}" for k, v in args.items()],
              "loraplus_lr_ratio": None, "loraplus_unet_lr_ratio": None, "loraplus_text_encoder_lr_ratio": None}
    check_network_args(values, frozenset())
    if algo == "glora":
        net = kohya.create_network(1.0, 4, 1.0, None, tes[0], unet, algo=algo, bypass_mode="True")
        assert {a.options.bypass_mode for _, a in net.adapters()} == {True}
        return
    with pytest.raises(OptionError, match="'bypass_mode'"):
        kohya.create_network(1.0, 4, 1.0, None, tes[0], unet, algo=algo, bypass_mode="True")
    with pytest.raises(OptionError, match="'bypass_mode'"):
        check_network_args({**values, "network_args": [f"algo={algo}", "bypass_mode=True"]}, frozenset())


def test_bad_script_values_and_bad_args_from_weights(tmp_path):
    unet, tes = tiny_model("sd1")
    with pytest.raises(OptionError, match="'dim'"):
        kohya.create_network(1.0, "abc", 1.0, None, tes[0], unet)
    with pytest.raises(OptionError, match="'network_dropout'"):
        kohya.create_network(1.0, 4, 1.0, None, tes[0], unet, neuron_dropout="lots")
    path = tmp_path / "n.safetensors"
    kohya.create_network(1.0, 4, 1.0, None, tes[0], unet).save_weights(str(path), None, {})
    with pytest.raises(OptionError, match="'dropuot'"):
        kohya.create_network_from_weights(1.0, str(path), None, tes[0], unet, dropuot="0.1")
    with pytest.raises(OptionError, match="'rank_dropout'"):
        kohya.create_network_from_weights(1.0, str(path), None, tes[0], unet, rank_dropout="x")


def test_errors_of_create_network_from_weights_name_the_file(tmp_path):
    """gen_img and --base_weights pass several files: an error says which one."""
    unet, tes = tiny_model("sd1")
    sdxl_file = tmp_path / "for_sdxl.safetensors"
    sdxl_unet, sdxl_tes = tiny_model("sdxl")
    kohya.create_network(1.0, 4, 1.0, None, sdxl_tes, sdxl_unet).save_weights(str(sdxl_file), None, None)
    peft_file = tmp_path / "peft.safetensors"
    save_file({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(4, 16)}, peft_file)
    for path, what in ((sdxl_file, "match no module"), (peft_file, "PEFT")):
        with pytest.raises(ValueError, match=f"^{re.escape(str(path))}: .*{what}"):
            kohya.create_network_from_weights(1.0, str(path), None, [tes[0]], unet, for_inference=True)


def test_embeddings_bundled_in_a_lora_file_are_left_out_with_a_warning(tmp_path):
    """A1111 reads bundle_emb.<name>.* in a LoRA file as textual inversions; kohya's gen_img reports them as
    unexpected keys. The adapters load; the warning names the embeddings."""
    from lorakit import load_network

    unet, tes = tiny_model("sd1")
    net = kohya.create_network(1.0, 4, 1.0, None, tes[0], unet, preset="attn-mlp")
    tensors = {**net.state_dict(), "bundle_emb.mytoken.string_to_param.*": torch.randn(2, 32)}
    path = tmp_path / "bundled.safetensors"
    save_file(tensors, path)
    with pytest.warns(UserWarning, match=f"^{re.escape(str(path))}: .*embedding.*mytoken"):
        loaded, weights_sd = kohya.create_network_from_weights(1.0, str(path), None, [tes[0]], unet,
                                                               for_inference=True)
    assert set(loaded.state_dict()) == set(net.state_dict())
    assert "bundle_emb.mytoken.string_to_param.*" in weights_sd  # gen_img: load_state_dict(weights_sd, False)
    with pytest.warns(UserWarning, match="mytoken"):
        assert set(load_network(unet, path, text_encoders=tes).state_dict()) == set(net.state_dict())


# ----- optimizer params -----

def test_prepare_optimizer_params_in_every_calling_convention():
    unet, tes, te_arg = fresh("sdxl")
    net = kohya.create_network(1.0, 4, 1.0, None, te_arg, unet, loraplus_unet_lr_ratio="4")
    net.apply_to(te_arg, unet, True, True)
    ids = {c: {id(p) for n, a in net.adapters() if net.entries[n].component == c for p in a.parameters()}
           for c in ("unet", "text_encoder", "text_encoder_2")}

    # newer sd-scripts: a list of text-encoder lrs
    groups, descriptions = net.prepare_optimizer_params_with_multiple_te_lrs([1e-5, 2e-5], 1e-4, 1e-3)
    by = dict(zip(descriptions, groups))
    assert set(by) == {"unet", "unet plus", "textencoder", "textencoder_2"}
    assert (by["unet"]["lr"], by["textencoder"]["lr"], by["textencoder_2"]["lr"]) == (1e-4, 1e-5, 2e-5)
    assert by["unet plus"]["lr"] == pytest.approx(4e-4)
    assert {id(p) for p in by["textencoder_2"]["params"]} == ids["text_encoder_2"]
    assert sum(len(g["params"]) for g in groups) == len(list(net.parameters()))
    # one value serves both text encoders; an empty list means the default lr
    groups, descriptions = net.prepare_optimizer_params_with_multiple_te_lrs([3e-5], None, 1e-3)
    lrs = {d: g["lr"] for d, g in zip(descriptions, groups)}
    assert lrs["textencoder"] == lrs["textencoder_2"] == 3e-5 and lrs["unet"] == 1e-3
    groups, descriptions = net.prepare_optimizer_params_with_multiple_te_lrs([], None, 1e-3)
    assert {d: g["lr"] for d, g in zip(descriptions, groups)}["textencoder_2"] == 1e-3

    # older: (text_encoder_lr, unet_lr, default_lr) -> (params, descriptions)
    results = net.prepare_optimizer_params(5e-5, 1e-4, 1e-3)
    assert type(results) is tuple and len(results[0]) == len(results[1]) == 4
    # oldest: two arguments; a group without an lr takes the optimizer's
    groups, _ = net.prepare_optimizer_params(None, 1e-4)
    optimizer = torch.optim.AdamW(groups, lr=7e-4)
    assert sorted({g["lr"] for g in optimizer.param_groups}) == [1e-4, 4e-4, 7e-4]

    # an lr of 0 freezes those adapters and leaves them out; a later call brings them back
    groups, descriptions = net.prepare_optimizer_params(0.0, 1e-4, 1e-3)
    assert descriptions == ["unet", "unet plus"]
    assert {id(p) for p in net.get_trainable_params()} == ids["unet"]
    net.prepare_grad_etc(te_arg, unet)
    assert not any(p.requires_grad for a in net.text_encoder_loras for p in a.parameters())
    groups, descriptions = net.prepare_optimizer_params(1e-5, 1e-4, 1e-3)
    assert len(descriptions) == 4 and all(p.requires_grad for p in net.parameters())

    net.set_loraplus_lr_ratio(None, None, "2")  # text encoders get LoRA+ too
    groups, descriptions = net.prepare_optimizer_params(1e-5, 1e-4)
    assert {d: g["lr"] for d, g in zip(descriptions, groups)}["textencoder plus"] == pytest.approx(2e-5)
    net.restore()


def test_set_multiplier_and_gen_img_calls():
    unet, tes, te_arg = fresh("sd1")
    base = run(unet, tes, "sd1")
    net = kohya.create_network(1.0, 4, 1.0, None, te_arg, unet)
    net.apply_to(te_arg, unet)  # gen_img's call: both parts by default
    randomize(net)
    net.eval()
    applied = run(unet, tes, "sd1")
    net.set_multiplier(0.0)  # train_network's differential output preservation
    torch.testing.assert_close(run(unet, tes, "sd1"), base, rtol=0, atol=1e-6)
    net.set_multiplier(0.5)
    assert {a.multiplier for _, a in net.adapters()} == {0.5}
    net.set_multiplier(1.0)
    # --network_pre_calc: merged into the weights, then restored exactly
    weights = model_state(unet, tes)
    assert net.is_mergeable()
    net.backup_weights()
    net.pre_calculation()
    torch.testing.assert_close(run(unet, tes, "sd1"), applied, rtol=1e-4, atol=1e-5)
    assert not torch.equal(model_state(unet, tes)["0.conv_in.weight"], weights["0.conv_in.weight"])
    net.restore_weights()
    assert all(torch.equal(v, weights[k]) for k, v in model_state(unet, tes).items())
    torch.testing.assert_close(run(unet, tes, "sd1"), applied)
    net.restore()


@pytest.mark.parametrize("restore_order", [1, -1])
def test_pre_calc_with_several_networks_restores_the_original_weights(tmp_path, restore_order):
    """gen_img --network_pre_calc with two files on the same layers. Before every batch gen_img calls
    set_multiplier, then restore_weights of every network, then pre_calculation of every network."""
    unet, tes, te_arg = fresh("sd1")
    weights = model_state(unet, tes)
    paths = []
    for seed, args in enumerate(({"algo": "lora", "conv_dim": "2"}, {"algo": "loha", "train_norm": "True"})):
        made = kohya.create_network(1.0, 4, 1.0, None, te_arg, unet, **args)
        randomize(made, seed=seed)
        paths.append(str(tmp_path / f"{seed}.safetensors"))
        made.save_weights(paths[-1], None, None)
    nets = []
    for path in paths:  # gen_img's load: a list of text encoders, apply_to, load_state_dict, backup_weights
        net, weights_sd = kohya.create_network_from_weights(1.0, path, None, tes, unet, for_inference=True)
        net.apply_to(tes, unet)
        net.load_state_dict(weights_sd, False)
        net.eval()
        net.backup_weights()
        nets.append(net)
    batches = [(1.0, 1.0), (0.5, 1.0), (1.0, -0.7)]  # prompts' --am multipliers
    applied = {}
    for muls in batches:
        for net, m in zip(nets, muls):
            net.set_multiplier(m)
        applied[muls] = run(unet, tes, "sd1")
    for muls in batches:
        for net, m in zip(nets, muls):
            net.set_multiplier(m)
        for net in nets[::restore_order]:
            net.restore_weights()
        assert all(torch.equal(v, weights[k]) for k, v in model_state(unet, tes).items())
        for net in nets:
            net.pre_calculation()
        torch.testing.assert_close(run(unet, tes, "sd1"), applied[muls], rtol=1e-4, atol=1e-5)
    for net in nets[::restore_order]:
        net.restore_weights()
    assert all(torch.equal(v, weights[k]) for k, v in model_state(unet, tes).items())
    torch.testing.assert_close(run(unet, tes, "sd1"), applied[batches[-1]])  # applied again, unmerged


def test_gen_img_regions_are_refused_naming_the_option():
    """gen_img calls set_region (networks with --mask_path) and set_current_generation; lorakit.kohya has no
    regional networks, and says which gen_img option asks for them."""
    unet, tes = tiny_model("sd1")
    net = kohya.create_network(1.0, 4, 1.0, None, tes[0], unet)
    with pytest.raises(NotImplementedError, match="--mask_path.*regional prompts"):
        net.set_region(0, True, torch.ones(8, 8))
    with pytest.raises(NotImplementedError, match="--mask_path"):
        net.set_current_generation(1, 1, 64, 64, {}, None)


def test_each_adapter_carries_kohyas_lora_name():
    """sd-scripts' LoRAModule.lora_name, which scripts read from network.unet_loras / text_encoder_loras, is the
    name its tensors are saved under (SGM names for SDXL)."""
    unet, tes = tiny_model("sdxl")
    net = kohya.create_network(1.0, 4, 1.0, None, tes, unet, preset="attn-mlp")
    names = [a.lora_name for a in net.text_encoder_loras + net.unet_loras]
    assert len(names) == len(net.entries) and set(names) == {k.split(".")[0] for k in net.state_dict()}
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in names
    assert "lora_te2_text_model_encoder_layers_0_mlp_fc1" in names


def test_on_epoch_start_puts_the_network_back_in_training_mode():
    # train_network.py calls network.on_epoch_start(text_encoder, unet) every epoch; networks/lora.py's is
    # self.train(), so dropouts act again after anything left the network in eval mode
    unet, tes = tiny_model("sd1")
    net = kohya.create_network(1.0, 4, 1.0, None, tes[0], unet, preset="attn-mlp", dropout="0.1")
    net.eval()
    net.on_epoch_start(tes[0], unet)
    assert net.training and all(a.training for _, a in net.adapters())


# ----- scale_weight_norms -----

@pytest.mark.parametrize("algo,args", [
    ("lora", {}), ("lora", {"use_tucker": "True"}), ("lora", {"dora_wd": "True"}), ("dylora", {"block_size": "2"}),
    ("loha", {"train_norm": "True"}), ("lokr", {"factor": "4"}), ("lokr", {"decompose_both": "True", "dim": "2"}),
    ("ia3", {}), ("glora", {}), ("full", {}), ("diag-oft", {}), ("boft", {}),
])
def test_max_norm_regularization_bounds_every_change(algo, args):
    unet, tes = tiny_model("sd1")  # adapters are never applied: the shared model stays untouched
    dim = int(args.pop("dim", 4))
    net = randomize(kohya.create_network(1.0, dim, 2.0, None, tes[0], unet, algo=algo, **args), scale=0.3)
    net.train()  # as during training: DyLoRA must still measure its full rank

    def changes():
        with torch.no_grad():
            net.eval()
            out = {n: (a._delta_weight() * a._scalar()).float() for n, a in net.adapters()}
            net.train()
            return out

    before = changes()
    norms = {n: float(d.norm()) for n, d in before.items()}
    max_norm = statistics.median(norms.values())
    keys_scaled, mean_norm, maximum_norm = net.apply_max_norm_regularization(max_norm, "cpu")
    after = changes()
    new = {n: float(d.norm()) for n, d in after.items()}

    assert keys_scaled == sum(v > max_norm for v in norms.values()) > 0
    assert mean_norm == pytest.approx(statistics.mean(new.values()), rel=1e-5)
    assert maximum_norm == pytest.approx(max(new.values()), rel=1e-5)
    assert maximum_norm <= max_norm * (1 + 1e-5)
    for n, v in norms.items():
        if v <= max_norm:
            assert torch.equal(after[n], before[n])
        else:
            assert new[n] == pytest.approx(max_norm, rel=1e-4)
            if "oft" not in algo:  # linear in its factors: same direction, shorter
                torch.testing.assert_close(after[n], before[n] * (max_norm / v), rtol=1e-4, atol=1e-6)


# ----- files -----

@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
@pytest.mark.parametrize("args", [
    {"algo": "lora", "dora_wd": "True", "rank_dropout": "0.1"},
    {"algo": "lokr", "conv_dim": "2", "conv_alpha": "1", "factor": "4"},
    {"algo": "loha", "preset": "attn-mlp", "use_scalar": "True"},
])
def test_save_weights_then_from_weights_gives_the_same_outputs(tmp_path, kind, args):
    unet, tes, te_arg = fresh(kind)
    base = run(unet, tes, kind)
    net = kohya.create_network(1.0, 4, 2.0, None, te_arg, unet, neuron_dropout=None, dropout=None, **args)
    net.apply_to(te_arg, unet, True, True)
    randomize(net, seed=3)
    net.eval()
    out = run(unet, tes, kind)
    assert (out - base).abs().max() > 1e-4
    path = str(tmp_path / "net.safetensors")
    net.save_weights(path, torch.float32, {"ss_network_module": "lorakit.kohya"})
    assert {"sshs_model_hash", "sshs_legacy_hash", "ss_network_module"} <= set(read_metadata(path))
    net.restore()
    torch.testing.assert_close(run(unet, tes, kind), base, rtol=0, atol=0)

    loaded, weights_sd = kohya.create_network_from_weights(1.0, path, None, te_arg, unet)
    assert set(weights_sd) == set(net.state_dict()) == set(loaded.state_dict())
    loaded.apply_to(te_arg, unet, True, True)
    loaded.eval()
    torch.testing.assert_close(run(unet, tes, kind), out, rtol=1e-5, atol=1e-6)
    loaded.restore()

    again = kohya.create_network(1.0, 4, 2.0, None, te_arg, unet, **args)  # --network_weights on a new network
    again.apply_to(te_arg, unet, True, True)
    info = again.load_weights(path)
    assert not info.missing_keys and not info.unexpected_keys
    again.eval()
    torch.testing.assert_close(run(unet, tes, kind), out, rtol=1e-5, atol=1e-6)
    again.restore()


def test_save_weights_in_other_formats_and_dtypes(tmp_path):
    unet, tes = tiny_model("sd1")
    net = kohya.create_network(1.0, 4, 1.0, None, tes[0], unet)
    net.save_weights(str(tmp_path / "a.safetensors"), torch.float16, None)  # kohya passes None when unset
    tensors = kohya.create_network_from_weights(1.0, str(tmp_path / "a.safetensors"), None, tes[0], unet)[1]
    assert {t.dtype for t in tensors.values()} == {torch.float16}
    net.save_weights(str(tmp_path / "a.pt"), torch.bfloat16, {})  # --save_model_as pt
    pt = torch.load(tmp_path / "a.pt", weights_only=True)
    assert set(pt) == set(net.state_dict()) and {t.dtype for t in pt.values()} == {torch.bfloat16}


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_merge_to_equals_the_applied_network(tmp_path, kind):
    unet, tes, te_arg = fresh(kind)
    net = kohya.create_network(1.0, 4, 2.0, None, te_arg, unet, conv_dim="2", algo="loha")
    randomize(net, seed=5)
    path = str(tmp_path / "base.safetensors")
    net.save_weights(path, None, None)

    applied_net, weights_sd = kohya.create_network_from_weights(0.7, path, None, te_arg, unet, for_inference=True)
    applied_net.apply_to(te_arg, unet)
    applied_net.eval()
    applied = run(unet, tes, kind)
    applied_net.restore()

    # --base_weights: merged into the models before training
    merged_net, weights_sd = kohya.create_network_from_weights(0.7, path, None, te_arg, unet, for_inference=True)
    merged_net.merge_to(te_arg, unet, weights_sd, torch.float32, "cpu")
    torch.testing.assert_close(run(unet, tes, kind), applied, rtol=1e-4, atol=1e-5)


def test_load_weights_reads_either_sdxl_name_style(tmp_path):
    unet, tes, te_arg = fresh("sdxl")
    net = kohya.create_network(1.0, 4, 1.0, None, te_arg, unet, conv_dim="2")
    net.apply_to(te_arg, unet, True, True)
    randomize(net)
    net.eval()
    out = run(unet, tes, "sdxl")
    sgm = net.state_dict()
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in sgm  # as kohya writes
    diffusers = {}
    for key, value in sgm.items():
        name, _, suffix = key.partition(".")
        entry = net.entries[name]
        if entry.component == "unet":
            name = adapter_name("lora_unet_", entry.path)
        diffusers[f"{name}.{suffix}"] = value
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.alpha" in diffusers
    path = str(tmp_path / "diffusers_names.safetensors")
    save_file(diffusers, path)
    net.restore()

    again = kohya.create_network(1.0, 4, 1.0, None, te_arg, unet, conv_dim="2")
    again.apply_to(te_arg, unet, True, True)
    info = again.load_weights(path)
    assert not info.missing_keys and not info.unexpected_keys
    again.eval()
    torch.testing.assert_close(run(unet, tes, "sdxl"), out)
    again.restore()

    # gen_img: create_network_from_weights, apply_to, load_state_dict(weights_sd, False)
    loaded, weights_sd = kohya.create_network_from_weights(1.0, path, None, te_arg, unet, for_inference=True)
    assert set(loaded.state_dict()) == set(sgm)  # written back in kohya's style
    loaded.apply_to(te_arg, unet)
    info = loaded.load_state_dict(weights_sd, False)
    assert not info.missing_keys and not info.unexpected_keys
    loaded.eval()
    torch.testing.assert_close(run(unet, tes, "sdxl"), out)
    loaded.restore()


def _module(model, path):
    modules = dict(model.named_modules())
    return modules.get(path) or modules[path.removeprefix("text_model.")]  # transformers 5 CLIPTextModel


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_a_kohya_lora_file_built_by_hand_loads(tmp_path, kind):
    """sd-scripts networks/lora.py's layout: lora_down/lora_up (conv: kxk down, 1x1 up) and a 0-d alpha; old
    files without alpha mean alpha = rank. Saved in fp16, as kohya usually saves."""
    unet, tes, te_arg = fresh(kind)
    if kind == "sd1":
        targets = {
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q":
                (unet, "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"),
            "lora_unet_down_blocks_0_attentions_0_proj_in": (unet, "down_blocks.0.attentions.0.proj_in"),
            "lora_unet_down_blocks_0_resnets_0_conv1": (unet, "down_blocks.0.resnets.0.conv1"),
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj":
                (tes[0], "text_model.encoder.layers.0.self_attn.q_proj"),
        }
    else:
        targets = {
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q":
                (unet, "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"),
            "lora_unet_input_blocks_1_0_in_layers_2": (unet, "down_blocks.0.resnets.0.conv1"),
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj":
                (tes[0], "text_model.encoder.layers.0.self_attn.q_proj"),
            "lora_te2_text_model_encoder_layers_1_mlp_fc2": (tes[1], "text_model.encoder.layers.1.mlp.fc2"),
        }
    g = torch.Generator().manual_seed(0)
    sd, expected = {}, {}
    for k, (name, (model, path)) in enumerate(targets.items()):
        layer, r = _module(model, path), 2
        w = layer.weight
        down = torch.randn(r, *w.shape[1:], generator=g).half()
        up = torch.randn(w.shape[0], r, *([1] * (w.dim() - 2)), generator=g).half() * 0.1
        alpha = 1.0 if k else None  # the first one is an old file's module, without alpha
        sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"] = down, up
        if alpha is not None:
            sd[f"{name}.alpha"] = torch.tensor(alpha).half()
        scale = (alpha or r) / r
        dw = torch.einsum("or,ri...->oi...", up.float().flatten(1), down.float()) * scale
        expected[name] = (layer, w.detach().clone(), dw)
    path = str(tmp_path / "kohya_lora.safetensors")
    save_file(sd, path, metadata={"ss_network_module": "networks.lora"})

    net, weights_sd = kohya.create_network_from_weights(1.0, path, None, te_arg, unet)
    assert set(net.entries) == set(targets) and weights_sd.keys() == sd.keys()
    net.apply_to(te_arg, unet, True, True)
    net.set_multiplier(0.5)
    for name, (layer, w, dw) in expected.items():
        x = torch.randn(2, w.shape[1], 8, 8) if w.dim() == 4 else torch.randn(2, 3, w.shape[1])
        with torch.no_grad():
            want = (F.conv2d(x, w + 0.5 * dw, layer.bias, layer.stride, layer.padding) if w.dim() == 4
                    else F.linear(x, w + 0.5 * dw, layer.bias))
            torch.testing.assert_close(layer(x), want, rtol=1e-4, atol=1e-5, msg=name)
    net.restore()

    merged, weights_sd = kohya.create_network_from_weights(1.0, path, None, te_arg, unet, for_inference=True)
    merged.merge_to(te_arg, unet, weights_sd, torch.float32, "cpu")
    for name, (layer, w, dw) in expected.items():
        torch.testing.assert_close(layer.weight.detach(), w + dw, rtol=1e-5, atol=1e-6, msg=name)


def test_network_args_still_apply_to_a_network_from_weights(tmp_path):
    """--dim_from_weights: the file gives the layout; dropouts, LoRA+ and block lr weights come from network_args."""
    unet, tes = tiny_model("sd1")
    path = str(tmp_path / "w.safetensors")
    kohya.create_network(1.0, 4, 1.0, None, tes[0], unet, conv_dim="2").save_weights(path, None, None)
    net, _ = kohya.create_network_from_weights(1, path, None, tes[0], unet, dropout="0.1", rank_dropout="0.2",
                                               loraplus_lr_ratio="8", up_lr_weight="0,0,0,0,0,0,0,0,0,0,0,0",
                                               algo="loha")  # algo: ignored, the file is LoRA
    assert {(a.name, a.options.dropout, a.options.rank_dropout) for _, a in net.adapters()} == {("lora", 0.1, 0.2)}
    groups, descriptions = net.prepare_optimizer_params(None, 1e-4, 1e-3)
    by = dict(zip(descriptions, groups))
    assert by["unet plus"]["lr"] == pytest.approx(8e-4)
    trained = {id(p) for p in net.get_trainable_params()}
    up_blocks = [a for n, a in net.adapters() if n.startswith("lora_unet_up_blocks")]
    assert up_blocks and not any(id(p) in trained for a in up_blocks for p in a.parameters())


@pytest.mark.parametrize("algo,dim,alpha,unused", [
    ("ia3", 32, 16.0, "dim=32, alpha=16.0"), ("full", 8, 1.0, "dim=8"), ("diag-oft", 8, 16.0, "alpha=16.0"),
    ("boft", 4, 2.0, "alpha=2.0"), ("diag-oft", 8, 1.0, None), ("lora", 32, 16.0, None)])
def test_network_dim_and_alpha_an_algo_does_not_use_are_named(caplog, algo, dim, alpha, unused):
    """network_dim/network_alpha reach every algorithm (sd-scripts always passes them): one that does not use them
    is told so by name when they are not at their defaults (4 and 1), and the network is built anyway."""
    unet, tes = tiny_model("sd1")
    with caplog.at_level("WARNING"):
        net = kohya.create_network(1.0, dim, alpha, None, tes[0], unet, algo=algo, preset="attn-mlp")
    assert net.unet_loras
    said = [r.getMessage() for r in caplog.records if "does not use" in r.getMessage()]
    assert said == ([f"algo '{algo}' does not use {unused}; ignored"] if unused else [])
