"""Diag-OFT/BOFT weights loaded into an adapter built with options (network_weights, a resumed state) keep the
adapter's own constraint, as LyCORIS' modules and sd-scripts' networks/oft.py keep their constructor's: the saved
alpha of an unconstrained adapter (just above |Q|, for A1111) is no training bound. An adapter built from a file
alone takes the file's alpha as its bound, as LyCORIS' make_module_from_state_dict and sd-scripts'
create_network_from_weights read it."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn

from lorakit import create_network
from lorakit.algos import adapter_from_state_dict, make_adapter

os.environ["LYCORIS_KERNEL_BACKEND"] = "torch"  # LyCORIS' eager reference bodies, as test_lycoris_interop.py


def trained(algo: str, layer: nn.Module, constraint: float = 0.0):
    """An adapter whose blocks a few training steps moved away from Q = 0."""
    torch.manual_seed(0)
    adapter = make_adapter(algo, layer, dim=4, constraint=constraint).double()
    with torch.no_grad():
        adapter.oft_blocks.normal_(0, 0.05)
    return adapter


def grow(*adapters) -> None:
    """One simulated optimiser step that takes |Q| past its saved value."""
    with torch.no_grad():
        for adapter in adapters:
            adapter.oft_blocks.mul_(3)


@pytest.mark.parametrize("algo", ["diag-oft", "boft"])
def test_an_unconstrained_adapter_resumed_from_its_file_stays_unconstrained(algo):
    layer = nn.Linear(16, 16).double().requires_grad_(False)
    before = trained(algo, layer)
    resumed = make_adapter(algo, layer, dim=4).double()  # the same options, then the saved weights
    resumed.load_state_dict(before.state_dict())
    assert resumed.bound == before.bound == 0
    grow(before, resumed)
    x = torch.randn(3, 16, dtype=torch.float64)
    torch.testing.assert_close(resumed(x), before(x), rtol=0, atol=1e-12)
    resumed(x).square().sum().backward()
    before(x).square().sum().backward()
    torch.testing.assert_close(resumed.oft_blocks.grad, before.oft_blocks.grad)


@pytest.mark.parametrize("algo", ["diag-oft", "boft"])
def test_loaded_weights_keep_the_adapters_constraint(algo):
    """An unconstrained file into a constrained adapter, and a constrained file into an unconstrained one: the
    bound is the adapter's, whatever the file's alpha."""
    layer = nn.Linear(16, 16).double().requires_grad_(False)
    for built, saved in ((1e-2, 0.0), (0.0, 1e-2)):
        adapter = make_adapter(algo, layer, dim=4, constraint=built).double()
        adapter.load_state_dict(trained(algo, layer, saved).state_dict())
        assert adapter.bound == built * 16


def test_lycoris_keeps_its_constructors_constraint_when_weights_load():
    """The reference behaviour: LyCORIS' DiagOFTModule after load_state_dict of a file with another alpha."""
    from lycoris.modules import DiagOFTModule

    layer = nn.Linear(16, 16)
    module = DiagOFTModule("m", layer, lora_dim=4, constraint=1e-2)
    sd = {k: v.float() for k, v in trained("diag-oft", layer).state_dict().items()}
    module.load_state_dict(sd)
    assert module.constraint == pytest.approx(1e-2 * 16)
    assert float(module.alpha) == float(sd["alpha"])


@pytest.mark.parametrize("algo", ["diag-oft", "boft"])
@pytest.mark.parametrize("constraint", [0.0, 1e-2])
def test_an_adapter_built_from_a_file_alone_takes_its_alpha_as_bound(algo, constraint):
    layer = nn.Linear(16, 16).double().requires_grad_(False)
    source = trained(algo, layer, constraint)
    sd = source.state_dict()
    loaded = adapter_from_state_dict(layer, sd)
    assert loaded.bound == pytest.approx(float(sd["alpha"]))
    x = torch.randn(3, 16, dtype=torch.float64)
    torch.testing.assert_close(loaded(x), source(x))


def test_network_weights_keep_the_networks_constraint():
    """What lorakit train's network_weights does: create the network from the options, load the file."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16))
    net = create_network(model, algo="diag-oft", dim=4)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.05)
    resumed = create_network(model, algo="diag-oft", dim=4)
    resumed.load_state_dict(net.state_dict())
    assert [a.bound for _, a in resumed.adapters()] == [0.0, 0.0]
