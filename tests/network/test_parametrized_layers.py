"""Layers under a weight parametrization (torch.nn.utils.parametrizations.weight_norm/spectral_norm, the old
nn.utils.weight_norm/spectral_norm hooks): their weight is computed from other parameters on each access."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn as nn
from torch.nn.utils import parametrizations

from lorakit import create_network

WRAPS = {
    "weight_norm": parametrizations.weight_norm,
    "spectral_norm": parametrizations.spectral_norm,
    "old_weight_norm": nn.utils.weight_norm,
    "old_spectral_norm": nn.utils.spectral_norm,
}


def wrapped_model(wrap):
    torch.manual_seed(0)
    return nn.Sequential(wrap(nn.Linear(6, 6)), nn.Tanh(), nn.Linear(6, 4)).eval()


def network(model, algo):
    logging.disable(logging.WARNING)  # "does not use dim" for full and ia3
    try:
        net = create_network(model, algo=algo, dim=2)
    finally:
        logging.disable(logging.NOTSET)
    with torch.no_grad():  # a non-zero change on every adapter
        for _, adapter in net.adapters():
            for p in adapter.parameters():
                p.add_(0.3 * torch.randn_like(p))
    return net


def assert_merge_gives_the_applied_output(model, net, x):
    net.apply()
    with torch.no_grad():
        applied = model(x)
    net.restore()
    net.merge()
    with torch.no_grad():
        torch.testing.assert_close(model(x), applied)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # the old nn.utils.weight_norm
@pytest.mark.parametrize("wrap", WRAPS, ids=list(WRAPS))
@pytest.mark.parametrize("algo", ["lora", "full", "ia3"])
def test_merge_into_a_parametrized_weight_is_refused(wrap, algo):
    """A write into the computed weight would be lost (merge did nothing, silently): refused, naming why."""
    model = wrapped_model(WRAPS[wrap])
    net = network(model, algo)
    x = torch.randn(3, 6)
    with torch.no_grad():
        before = model(x)
    with pytest.raises(ValueError, match="parametrization"):
        net.merge()
    with torch.no_grad():
        torch.testing.assert_close(model(x), before)  # not half merged either: the wrapped layer comes first


def test_merge_of_plain_layers_is_unchanged():
    model = wrapped_model(lambda layer: layer)
    net = network(model, "lora")
    assert_merge_gives_the_applied_output(model, net, torch.randn(3, 6))


@pytest.mark.parametrize("wrap", ["weight_norm", "spectral_norm"])
def test_restore_gives_back_the_parametrization_parameters_requires_grad(wrap):
    """apply() freezes the layer's weight, here the parametrization's originals; restore() unfreezes them."""
    model = wrapped_model(WRAPS[wrap])
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    assert any("original" in n for n in before)
    net = network(model, "lora").apply()
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.startswith("0."))
    net.restore()
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before


def test_a_network_merge_refuses_before_merging_any_layer():
    """The parametrized layer last: the plain layers before it were merged before the refusal (a half-merged
    model); the network checks every adapter first and names the refused one."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), parametrizations.weight_norm(nn.Linear(6, 4))).eval()
    net = network(model, "lora")
    x = torch.randn(3, 6)
    with torch.no_grad():
        before = model(x)
    with pytest.raises(ValueError, match=r"1 adapted layer\(s\) cannot be merged; lycoris_2: .*parametrization"):
        net.merge()
    with torch.no_grad():
        torch.testing.assert_close(model(x), before)


class _Doubled(nn.Module):
    def forward(self, b):
        return 2 * b


@pytest.mark.parametrize("algo,refused", [("lora", False), ("full", True)])
def test_a_parametrized_bias_refuses_only_the_algorithms_that_change_the_bias(algo, refused):
    """`full` writes a bias change (diff_b): into a computed bias it would be lost. LoRA writes the weight alone, so a
    parametrized bias does not stop its merge, and the merged model gives the applied one's output."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 4)).eval()
    torch.nn.utils.parametrize.register_parametrization(model[0], "bias", _Doubled())
    net = network(model, algo)
    x = torch.randn(3, 6)
    if refused:
        with pytest.raises(ValueError, match="its bias is computed by a parametrization"):
            net.merge()
        return
    assert_merge_gives_the_applied_output(model, net, x)
