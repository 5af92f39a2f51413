"""sd-scripts' network modules (`network_module = "networks.lora"`, ...) train as sd-scripts' own modules do, and
LyCORIS' (`lycoris.kohya`) as LyCORIS' do."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from lorakit.network.create import create_network
from lorakit.train.network_args import network_kwargs


def _train_over_eval_change(module: str, args: list[str], draws: int = 2000) -> float:
    """E[training-mode change] / eval change of one LoRA on a Linear, along the eval change."""
    kwargs = network_kwargs(module, args)
    kwargs.pop("preset", None)  # sd-scripts' U-Net layers; here a generic model (every Linear)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16))
    net = create_network(model, dim=8, alpha=8, **kwargs).apply()
    (_, adapter), = net.adapters()
    x = torch.randn(4, 16)
    with torch.no_grad():
        adapter.lora_up.normal_()
        base = nn.functional.linear(x, model[0].weight, model[0].bias)  # the layer without its adapter
        net.eval()
        eval_change = model(x) - base
        net.train()
        train_change = sum(model(x) - base for _ in range(draws)) / draws
    return float((train_change * eval_change).sum() / eval_change.square().sum())


@pytest.mark.parametrize("args", [["rank_dropout=0.5"], ["rank_dropout=0.25", "dropout=0.1"]])
def test_networks_lora_rank_dropout_trains_the_eval_change_on_average(args):
    """sd-scripts' LoRAModule.forward divides the kept rank components by (1 - rank_dropout), always: a training step
    sees the change the saved LoRA applies, on average."""
    assert _train_over_eval_change("networks.lora", args) == pytest.approx(1.0, abs=0.03)


def test_lycoris_keeps_its_rank_dropout_convention():
    """LyCORIS does not rescale unless rank_dropout_scale is set: the expected change is (1 - p) x the eval one."""
    assert _train_over_eval_change("lycoris.kohya", ["algo=lora", "rank_dropout=0.5"]) == pytest.approx(0.5, abs=0.03)
    assert _train_over_eval_change("lycoris.kohya", ["algo=lora", "rank_dropout=0.5", "rank_dropout_scale=true"]) == (
        pytest.approx(1.0, abs=0.03))


def test_networks_lora_keeps_a_rank_dropout_scale_the_user_gave():
    assert network_kwargs("networks.lora", ["rank_dropout=0.5", "rank_dropout_scale=false"])[
        "rank_dropout_scale"] == "false"
    assert "rank_dropout_scale" not in network_kwargs("networks.lora", ["dropout=0.1"])
    assert _train_over_eval_change("networks.lora", ["rank_dropout=0.5", "rank_dropout_scale=false"]) == (
        pytest.approx(0.5, abs=0.03))


def _networks_lora(args: list[str], dim: int = 8, alpha: float = 4.0):
    from ..network.tiny import tiny_model

    unet, tes = tiny_model("sd1")
    return create_network(unet, tes, dim=dim, alpha=alpha, **network_kwargs("networks.lora", args))


def _dims_alphas(net) -> dict[str, tuple[int, float]]:
    return {name: (a.lora_down.shape[0], float(a.alpha)) for name, a in net.adapters()}


def test_networks_lora_conv_block_dims_without_conv_dim_trains_the_resnet_convs():
    """kohya_ss' "Standard" LoRA writes block_dims + conv_block_dims without conv_dim: sd-scripts' LoRANetwork then
    extends its targets to the ResNets and samplers, the 3x3 convs at conv_block_dims with alpha 1 (its default)."""
    dims = _dims_alphas(_networks_lora([f"block_dims={','.join(['8'] * 25)}",
                                        f"conv_block_dims={','.join(['4'] * 25)}"]))
    assert dims["lora_unet_down_blocks_0_resnets_0_conv1"] == (4, 1.0)
    assert dims["lora_unet_down_blocks_0_downsamplers_0_conv"] == (4, 1.0)
    assert dims["lora_unet_down_blocks_0_resnets_0_time_emb_proj"] == (8, 4.0)  # a Linear: block_dims, alpha
    assert dims["lora_unet_down_blocks_0_attentions_0_proj_in"] == (8, 4.0)


def test_networks_lora_conv_block_alphas_default_to_1_with_a_preset_given():
    """sd-scripts' conv_block_alphas default is conv_alpha or 1.0, whichever layers a preset selects."""
    dims = _dims_alphas(_networks_lora(["preset=attn-mlp-convblock", f"block_dims={','.join(['8'] * 25)}",
                                        f"conv_block_dims={','.join(['4'] * 25)}"]))
    assert dims["lora_unet_down_blocks_0_resnets_0_conv1"] == (4, 1.0)


def test_networks_lora_conv_block_dims_alone_select_no_conv():
    """sd-scripts reads conv_block_dims only with block_dims or a block lr weight."""
    dims = _dims_alphas(_networks_lora([f"conv_block_dims={','.join(['4'] * 25)}"]))
    assert not any("resnets" in name for name in dims)


def test_block_alphas_and_conv_block_options_alone_are_ignored_with_a_warning(caplog):
    """sd-scripts' create_network reads block_alphas and conv_block_* only with block_dims or a block lr weight."""
    ramp = ",".join(str(i) for i in range(25))
    with caplog.at_level("WARNING"):
        dims = _dims_alphas(_networks_lora([f"block_alphas={ramp}", f"conv_block_dims={ramp}", "conv_dim=4"]))
    assert dims["lora_unet_down_blocks_0_attentions_0_proj_in"] == (8, 4.0)
    assert dims["lora_unet_down_blocks_0_resnets_0_conv1"] == (4, 1.0)  # conv_dim, not conv_block_dims' 1
    assert "block_alphas, conv_block_dims ignored: as in sd-scripts' networks.lora, they apply only with block_dims" \
        in caplog.text
    # with an lr weight they apply
    dims = _dims_alphas(_networks_lora([f"block_alphas={ramp}", "mid_lr_weight=1"]))
    assert dims["lora_unet_down_blocks_0_attentions_0_proj_in"] == (8, 1.0)


def test_ss_network_args_are_the_given_strings_as_sd_scripts_writes_them():
    """train_network.py: json.dumps(net_kwargs) only with network_args, net_kwargs the key=value strings plus
    "dropout" = network_dropout when they give none (not with dim_from_weights)."""
    import json

    from lorakit.train.network_args import ss_network_args

    assert ss_network_args([], None) is None
    assert json.loads(ss_network_args(["conv_dim=8"], None)) == {"conv_dim": "8", "dropout": None}
    assert json.loads(ss_network_args(["rank_dropout=0.1", "a=b=c"], 0.1)) == {"rank_dropout": "0.1", "a": "b=c",
                                                                                "dropout": 0.1}
    assert json.loads(ss_network_args(["dropout=0.2"], None)) == {"dropout": "0.2"}
    assert json.loads(ss_network_args(["conv_dim=8"], 0.1, dim_from_weights=True)) == {"conv_dim": "8"}


def test_networks_lora_conv_dim_0_trains_the_resnets_linear_and_1x1_layers():
    """sd-scripts: conv_dim=0 is given (not None), so the ResNets are targets; their time_emb_proj and 1x1
    conv_shortcut train at network_dim and only the 3x3 convs (dim 0) are skipped (kohya_ss' conv-rank slider at 0)."""
    dims = _dims_alphas(_networks_lora(["conv_dim=0"]))
    assert dims["lora_unet_down_blocks_0_resnets_0_time_emb_proj"] == (8, 4.0)
    assert dims["lora_unet_down_blocks_2_resnets_0_conv_shortcut"] == (8, 4.0)
    assert not any(name.endswith(("_conv1", "_conv2")) for name in dims)


def test_networks_dylora_trains_as_sd_scripts_dylora_module(monkeypatch):
    """sd-scripts' DyLoRAModule.forward, in float64: every rank component, only the drawn block (a multiple of unit)
    learning, at scale alpha/dim x sqrt(dim / (block end)); networks.dylora trains that step."""
    import math

    from lorakit.algos import make_adapter

    assert network_kwargs("networks.dylora", ["unit=2"])["dylora_all_ranks"] == "true"
    assert "dylora_all_ranks" not in network_kwargs("lorakit", ["algo=dylora"])  # LyCORIS' DyLoRA stays
    torch.manual_seed(0)
    layer = nn.Linear(6, 5).double().requires_grad_(False)
    adapter = make_adapter("dylora", layer, dim=8, alpha=4.0, block_size=2, dylora_all_ranks=True).double()
    with torch.no_grad():
        adapter.lora_up.normal_()
    adapter.apply().train()
    x = torch.randn(3, 6, dtype=torch.float64)
    for block in range(4):
        monkeypatch.setattr(torch, "randint", lambda high, size, _b=block: torch.tensor(_b))
        adapter.zero_grad()
        y = layer(x)
        (y * torch.arange(5, dtype=torch.float64)).sum().backward()
        down, up = (p.detach().clone().requires_grad_() for p in (adapter.lora_down, adapter.lora_up))
        lo, hi = 2 * block, 2 * block + 2
        ref = x @ layer.weight.T + layer.bias + (x @ down.T @ up.T) * (4.0 / 8) * math.sqrt(8 / hi)
        (ref * torch.arange(5, dtype=torch.float64)).sum().backward()
        torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
        keep = torch.zeros(8, dtype=torch.float64)
        keep[lo:hi] = 1  # sd-scripts: requires_grad only on the drawn block
        torch.testing.assert_close(adapter.lora_down.grad, down.grad * keep[:, None], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(adapter.lora_up.grad, up.grad * keep[None, :], rtol=1e-12, atol=1e-12)
