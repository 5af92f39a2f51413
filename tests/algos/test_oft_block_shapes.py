"""Diag-OFT with blocks larger than their count (sd-scripts' networks/oft.py: `dim` blocks of out_dim / dim channels,
4 by default), which LyCORIS' split never makes: an adapter read from such tensors keeps their shape, and every path
(the folded and the one-function Linear forwards, the batched output rotation, the per-channel and the dense
operator, merge) computes sd-scripts' W' = blockdiag(R^T) W, float64 against a formula written apart."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lorakit.algos import adapter_from_state_dict, make_adapter
from lorakit.algos.oft_base import OrthogonalAdapter

COUNT = 2  # blocks; out_dim 32: blocks of 16 channels


def layers():
    torch.manual_seed(0)
    return {"linear": nn.Linear(6, 32).double(), "conv1x1": nn.Conv2d(5, 32, 1).double(),
            "conv3x3": nn.Conv2d(5, 32, 3, padding=1).double()}


def blocks(out_dim: int, seed: int = 1) -> torch.Tensor:
    size = out_dim // COUNT
    return torch.randn(COUNT, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 0.1


def reference_weight(b: torch.Tensor, bound: float, weight: torch.Tensor, m: float) -> torch.Tensor:
    """W + m (R^T W - W) per block, R the Cayley transform of Q = B - B^T shrunk to |Q| <= bound (0: no bound)."""
    count, size, _ = b.shape
    q = b - b.mT
    if bound > 0:
        q = q * torch.clamp(bound / torch.linalg.vector_norm(q), max=1.0)
    eye = torch.eye(size, dtype=b.dtype)
    r = (eye + q) @ torch.linalg.inv(eye - q)
    w = weight.reshape(count, size, -1)
    turned = torch.einsum("knm,kn...->km...", r, w)
    return (w + m * (turned - w)).reshape(weight.shape)


def reference_forward(layer: nn.Module, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight, layer.bias)
    return F.conv2d(x, weight, layer.bias, padding=layer.padding)


def inputs(kind: str, positions: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    shape = (positions, 6) if kind == "linear" else (2, 5, 4, 4)
    return torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)


def adapter_of(layer: nn.Module, bound: float, m: float):
    sd = {"oft_blocks": blocks(layer.weight.shape[0]), "alpha": torch.tensor(bound, dtype=torch.float64)}
    return adapter_from_state_dict(layer, sd, dtype=torch.float64, multiplier=m)


@pytest.mark.parametrize("bound", [0.0, 0.3], ids=["unconstrained", "shrunk"])
@pytest.mark.parametrize("m", [1.0, 0.6])
@pytest.mark.parametrize("kind, positions", [("linear", 3), ("linear", 40), ("conv1x1", 0), ("conv3x3", 0)],
                         ids=["linear-few", "linear-many", "conv1x1", "conv3x3"])
def test_forward_backward_and_merge_keep_the_saved_split(kind, positions, m, bound):
    layer = layers()[kind]
    adapter = adapter_of(layer, bound, m)
    assert adapter.oft_blocks.shape == (COUNT, 16, 16)
    saved_blocks = adapter.oft_blocks.detach().clone().requires_grad_(True)
    base = layer.weight.detach().clone()
    expected_weight = reference_weight(saved_blocks, bound, base, m)

    x = inputs(kind, positions)
    x_ref = x.detach().clone().requires_grad_(True)
    expected = reference_forward(layer, expected_weight, x_ref)
    adapter.apply()
    y = layer(x)
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-12)

    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    expected.backward(grad_out)
    torch.testing.assert_close(adapter.oft_blocks.grad, saved_blocks.grad, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-10, atol=1e-12)

    with torch.no_grad():
        y0 = reference_forward(layer, base, x.detach())  # the per-channel rotation (dropouts) or dense operator
        torch.testing.assert_close(OrthogonalAdapter.output_from(adapter, y0), expected, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(adapter.delta_weight(m), expected_weight - base, rtol=1e-10, atol=1e-12)
        adapter.merge()
    torch.testing.assert_close(layer.weight, expected_weight.detach(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("rescaled", [False, True])
def test_state_dict_round_trip_keeps_the_saved_split(rescaled):
    layer = layers()["linear"]
    sd = {"oft_blocks": blocks(32), "alpha": torch.tensor(0.3, dtype=torch.float64)}
    if rescaled:
        sd["rescale"] = 1 + 0.1 * torch.randn(32, 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    adapter = adapter_from_state_dict(layer, sd, dtype=torch.float64)
    again = adapter_from_state_dict(layers()["linear"], adapter.state_dict(), dtype=torch.float64)
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in sd.items()}
    # the blocks are saved shrunk into the bound: equal up to rounding
    torch.testing.assert_close(again.delta_weight(0.8), adapter.delta_weight(0.8), rtol=1e-12, atol=1e-15)
    x = inputs("linear", 5)
    adapter.apply()
    y = layer(x)
    expected = F.linear(x, layer.weight + again.delta_weight(1.0), layer.bias)
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dim, split", [(4, (8, 4)), (16, (16, 2)), (6, (8, 4))])
def test_a_fresh_adapter_splits_as_lycoris_does(dim, split):
    """`dim` the block size, split as LyCORIS' factorization: never the saved split's size > count."""
    adapter = make_adapter("diag-oft", nn.Linear(6, 32), dim=dim)
    count, size = split
    assert adapter.oft_blocks.shape == (count, size, size)


def test_saved_split_is_no_user_option():
    """Only from_state_dict passes the saved split; network_args go through parse_options, which refuses it."""
    from lorakit.algos import OptionError, parse_options

    with pytest.raises(OptionError, match="saved_split"):
        parse_options({"saved_split": (2, 16)})
