"""Application rates (network/rates.py): the rated forward against block multipliers (its independent reference:
set_block_multipliers, whose outputs other tests check against merged weights), and the rates' gradient against
central finite differences of that reference, in float64, for every algorithm."""

from __future__ import annotations

import copy

import pytest
import torch

from lorakit import create_network
from lorakit.network.blocks import LBW17
from lorakit.network.rates import ApplicationRates, rate_layout

from .tiny import randomize, tiny_model, unet_inputs

ALGOS = [
    ("lora", dict(conv_dim=2, conv_alpha=1)),
    ("lora", dict(dora_wd=True)),
    ("loha", {}),
    ("lokr", dict(factor=4)),
    ("ia3", {}),
    ("diag-oft", {}),
    ("boft", dict(dim=2)),
    ("glora", {}),
    ("full", {}),
]


def _models(kind):
    unet, tes = tiny_model(kind)
    return copy.deepcopy(unet).double(), [copy.deepcopy(t).double() for t in tes]


def _loss(unet, tes, kind):
    """A scalar that every block and both text encoders reach: the U-Net output and the text encoders' last states,
    each against a fixed random probe."""
    args, kwargs = unet_inputs(unet, kind)
    args = tuple(a.double() if a.is_floating_point() else a for a in args)
    if "added_cond_kwargs" in kwargs:
        kwargs = {"added_cond_kwargs": {k: v.double() for k, v in kwargs["added_cond_kwargs"].items()}}
    out = unet(*args, **kwargs).sample
    g = torch.Generator().manual_seed(5)
    total = (out * torch.randn(out.shape, generator=g, dtype=out.dtype)).sum()
    ids = torch.tensor([[0, 5, 7, 9, 1]])
    for te in tes:
        h = te(ids).last_hidden_state
        total = total + (h * torch.randn(h.shape, generator=g, dtype=h.dtype)).sum()
    return total


@pytest.mark.parametrize("algo,options", ALGOS, ids=lambda v: v if isinstance(v, str) else "")
def test_rates_act_as_block_multipliers_with_their_gradient(algo, options):
    kind = "sdxl"
    unet, tes = _models(kind)
    torch.manual_seed(0)  # the adapters' initial values (then randomized), whatever tests ran before
    net = create_network(unet, tes, algo=algo, **{"dim": 4, "alpha": 2, "preset": "full", **options})
    randomize(net.double(), scale=0.1)
    net.apply()
    net.eval()
    layout = rate_layout("sdxl", None)
    rates = ApplicationRates([net], layout).double()
    g = torch.Generator().manual_seed(2)
    values = torch.rand(len(layout), generator=g, dtype=torch.float64) * 1.5 - 0.25
    with torch.no_grad():
        rates.weights.copy_(values)
    loss = _loss(unet, tes, kind)
    loss.backward()
    grad = rates.weights.grad.clone()

    rates.release()
    with torch.no_grad():
        net.set_block_multipliers(values.tolist(), layout)
        reference = _loss(unet, tes, kind)
        assert loss.item() == pytest.approx(reference.item(), rel=1e-10, abs=1e-10)
        eps = 1e-4  # the derivative along random directions (every rate moves): two forwards each
        for seed in (3, 4):
            v = torch.randn(len(layout), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
            net.set_block_multipliers((values + eps * v).tolist(), layout)
            hi = _loss(unet, tes, kind).item()
            net.set_block_multipliers((values - eps * v).tolist(), layout)
            lo = _loss(unet, tes, kind).item()
            assert (grad @ v).item() == pytest.approx((hi - lo) / (2 * eps), rel=1e-6, abs=1e-8)
    assert grad[0] != 0 and grad[1:].abs().sum() > 0  # BASE (the text encoders) and the U-Net blocks both learn
    net.restore()


def test_several_networks_get_their_own_rates_and_a_smaller_layout_fixes_the_rest():
    kind = "sd1"
    unet, tes = _models(kind)
    first = randomize(create_network(unet, tes, dim=4, alpha=2).double(), scale=0.1, seed=1)
    second = randomize(create_network(unet, tes, algo="loha", dim=2, alpha=1).double(), scale=0.1, seed=2)
    first.apply()
    second.apply()
    rates = ApplicationRates([first, second], LBW17).double()
    assert rates.weights.shape == (34,) and torch.all(rates.weights == 0.5)
    # LBW17 has no IN03/IN06/OUT00-02...: adapters there run at weight 0, as its block-weight vectors give them
    # (LoRA Block Weight's to26()); the time embedding, in no block, at 1
    assert rates.outside and all("attentions" not in n for n in rates.outside)
    assert rates.outside["lora_unet_up_blocks_0_resnets_0_time_emb_proj"] == 0.0
    values = torch.linspace(-0.2, 1.2, 34, dtype=torch.float64)
    with torch.no_grad():
        rates.weights.copy_(values)
        got = _loss(unet, tes, kind)
        rates.release()
        first.set_block_multipliers(values[:17].tolist(), LBW17)
        second.set_block_multipliers(values[17:].tolist(), LBW17)
        assert got.item() == pytest.approx(_loss(unet, tes, kind).item(), rel=1e-10)
    assert rates.penalty().item() == pytest.approx(values.abs().sum().item() + 10 * values.clamp(max=0).abs().sum().item())
    assert rates.values()[1]["BASE"] == pytest.approx(values[17].item())
    second.restore()
    first.restore()


def test_rate_layout_names_and_refusals():
    assert len(rate_layout("sdxl", None)) == 20 and len(rate_layout("sd1", None)) == 26
    assert rate_layout("sd1", "17").key == "lbw17" and rate_layout("sdxl", "lbw12").key == "lbw12"
    with pytest.raises(ValueError, match=r"application_layout='lbw17': not a sdxl block layout \(known: .*sdxl20 \(20\)"):
        rate_layout("sdxl", "lbw17")


def test_describe_prints_each_networks_rates_as_sd_scripts():
    """The line docs/training.md shows (sd-scripts' print of the rates): `Network <n> (<file>) weights: ` and the
    network's rates in layout order, 3 decimals, comma-separated, each network its own slice of the vector."""
    unet, tes = tiny_model("sd1")
    nets = [create_network(unet, tes, dim=2, alpha=1) for _ in range(2)]
    rates = ApplicationRates(nets, LBW17)
    with torch.no_grad():
        rates.weights.copy_(torch.arange(34) / 8 - 1)
    first, second = rates.describe(["a.safetensors"]).split("\n")
    assert first == "Network 0 (a.safetensors) weights: " + ",".join(f"{k / 8 - 1:.3f}" for k in range(17))
    assert second == "Network 1 weights: " + ",".join(f"{k / 8 - 1:.3f}" for k in range(17, 34))
    assert first.startswith("Network 0 (a.safetensors) weights: -1.000,-0.875,-0.750,")
    assert rates.values()[1]["OUT11"] == 33 / 8 - 1
