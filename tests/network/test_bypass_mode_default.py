"""bypass_mode=False in network options is LyCORIS' default, which kohya_ss writes for every LoCon, LoHa and LoKr:
the network then picks the cheaper way per call (the fused low-rank products on a Linear), as without it, instead
of rebuilding dW on every call. True still forces the factors."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from lorakit import create_network, kohya

from .tiny import tiny_model


@pytest.mark.parametrize("algo", ["locon", "loha", "lokr", "dylora", "glora"])
@pytest.mark.parametrize("given,expected", [(False, None), ("False", None), (True, True), (None, None)])
def test_lycoris_default_bypass_mode_leaves_the_choice_per_call(algo, given, expected):
    model = nn.Sequential(nn.Linear(16, 16))
    net = create_network(model, algo=algo, dim=4, alpha=2, bypass_mode=given)
    assert [a.options.bypass_mode for _, a in net.adapters()] == [expected]


def test_a_kohya_ss_locon_config_runs_the_fused_low_rank_products():
    """network_args exactly as kohya_ss writes them for LyCORIS/LoCon, through lycoris.kohya's interface: a Linear
    of the U-Net runs LoRA's fused function, not the layer plus op(x, dW)."""
    unet, tes = tiny_model("sd1")
    net = kohya.create_network(1.0, 8, 4, None, tes[0], unet, algo="locon", preset="attn-mlp", conv_dim="4",
                               conv_alpha="2", use_tucker="False", rank_dropout="0", bypass_mode="False",
                               dora_wd="False", module_dropout="0", use_scalar="False", rank_dropout_scale="False")
    assert {a.options.bypass_mode for _, a in net.adapters()} == {None}
    name, adapter = next((n, a) for n, a in net.adapters() if type(a.layer) is nn.Linear and "unet" in n)
    torch.nn.init.normal_(adapter.lora_up, std=0.1)
    x = torch.randn(2, 3, adapter.layer.in_features, requires_grad=True)
    y = adapter(x)
    assert type(y.grad_fn).__name__ == "_LinearPlusLowRankBackward", name
