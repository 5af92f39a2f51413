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
