"""Meta builds skip torch.nn.init on meta tensors only, and give torch.nn.init back as it was."""

from __future__ import annotations

import math

import torch

from lorakit.models.configs import load_config
from lorakit.models.meta import _meta_init_skipped, component_on_meta


def test_init_functions_are_the_originals_after_a_build():
    before = dict(vars(torch.nn.init))
    unet = component_on_meta("unet", load_config("tiny-sd", "unet"))
    assert all(p.is_meta for p in unet.parameters())
    assert {n: f for n, f in vars(torch.nn.init).items() if f is not before.get(n)} == {}


def test_tensors_off_meta_are_still_initialised_during_a_build():
    with _meta_init_skipped():
        layer = torch.nn.Linear(256, 64, device="cpu")  # as another thread building a real model would
        filled = torch.nn.init.constant_(torch.zeros(3, device="cpu"), 2.0)
        on_meta = torch.empty(4, 4)
        assert torch.nn.init.normal_(on_meta) is on_meta and on_meta.is_meta
    assert torch.equal(filled, torch.full((3,), 2.0))
    # kaiming_uniform_(a=sqrt(5)) gives U(-1/sqrt(fan_in), 1/sqrt(fan_in)): std 1/sqrt(3 fan_in)
    bound = 1 / math.sqrt(256)
    assert layer.weight.abs().max() <= bound and abs(layer.weight.std().item() - bound / math.sqrt(3)) < 0.1 * bound
