"""Shared by the checkpoint-layout tests: random distinct tensors, conversion both ways, exact comparison."""

from __future__ import annotations

import torch

from lorakit.formats.checkpoint_layout import COMPONENT_PREFIXES, to_checkpoint, to_diffusers_recipes


def random_state_dict(module: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """The module's keys and shapes with random values: init values (GroupNorm ones, zero biases) repeat
    across keys and would hide a swapped mapping."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) for k, v in module.state_dict().items()}


def build(recipes, checkpoint) -> dict[str, torch.Tensor]:
    return {k: r.build([checkpoint[s] for s in r.sources]) for k, r in recipes.items()}


def assert_exact(got: dict, want: dict) -> None:
    assert set(got) == set(want), (sorted(set(got) - set(want))[:5], sorted(set(want) - set(got))[:5])
    for k, v in want.items():
        assert got[k].shape == v.shape, (k, got[k].shape, v.shape)
        if v.device.type != "meta":
            assert torch.equal(got[k], v), k


def roundtrip(kind: str, component: str, state_dict: dict, config) -> dict[str, torch.Tensor]:
    """state dict -> checkpoint (prefixed, like a file) -> our recipes -> state dict again, exact;
    then -> checkpoint again, exact. Returns the prefixed checkpoint for the reference converter."""
    ckpt = to_checkpoint(kind, component, state_dict, config)
    recipes = to_diffusers_recipes(kind, component, state_dict.keys(), config, ckpt.keys())
    back = build(recipes, ckpt)
    assert_exact(back, state_dict)
    assert_exact(to_checkpoint(kind, component, back, config), ckpt)
    prefix = COMPONENT_PREFIXES[kind][component]
    return {prefix + k: v for k, v in ckpt.items()}
