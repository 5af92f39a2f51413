"""`full` with rank_dropout: LyCORIS' FullModule masks the rows (output channels) of diff and diff_b with one keep
mask per call, drawn as torch.rand(out channels). lorakit draws the same mask from the same seed, so both the
float64 formula and LyCORIS itself (a test dependency) give the same outputs and gradients, in the merged-weight
path and in the path that adds the change to the layer's own output."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lorakit.algos import make_adapter

from .conftest import make_input, make_layer, randomize

P, M = 0.4, 0.7


def reference_mask(seed, out, rescale, dtype):
    torch.manual_seed(seed)
    keep = (torch.rand(out) >= P).to(dtype)
    return keep / keep.mean().clamp_min(1.0 / out) if rescale else keep


def dense(layer, diff, diff_b, x, rows):
    """op(x, W + m diff diag(rows), b + m diff_b rows), in float64 from the tensors alone."""
    shape = (-1,) + (1,) * (layer.weight.dim() - 1)
    w = layer.weight + M * diff * rows.view(shape)
    b = layer.bias + M * diff_b * rows
    if isinstance(layer, nn.Linear):
        return F.linear(x, w, b)
    conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[w.dim()]
    return conv(x, w, b, layer.stride, layer.padding, layer.dilation)


def hooked(layer):
    """A no-op forward pre-hook: the layer is then no longer 'plain', so the adapter adds its change to the layer's
    own output instead of running the merged weight."""
    layer.register_forward_pre_hook(lambda module, args: None)
    return layer


@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d", "conv3d"])
@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("path", ["merged", "added"])
def test_rank_dropout_masks_rows_of_the_change_once_per_call(kind, rescale, path):
    layer, x = make_layer(kind), make_input(kind).requires_grad_()
    if path == "added":
        hooked(layer)
    adapter = randomize(make_adapter("full", layer, rank_dropout=P, rank_dropout_scale=rescale).double())
    adapter.multiplier = M
    adapter.train()
    for seed in (0, 1, 2):
        rows = reference_mask(seed, layer.weight.shape[0], rescale, torch.float64)
        assert 0 < int((rows > 0).sum()) < rows.numel(), "the seed must drop some channels and keep others"
        torch.manual_seed(seed)
        y = adapter(x)
        # the merged path keeps no masked copy of diff for backward (the added path's op(x, diff rows) does)
        assert (type(y.grad_fn).__name__ == "_MergedFullBackward") == (path == "merged")
        diff, diff_b, xr = (t.detach().clone().requires_grad_() for t in (adapter.diff, adapter.diff_b, x))
        expected = dense(layer, diff, diff_b, xr, rows)
        torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
        g = torch.randn_like(y)
        got = torch.autograd.grad(y, (adapter.diff, adapter.diff_b, x), g)
        want = torch.autograd.grad(expected, (diff, diff_b, xr), g)
        for name, a, b in zip(("diff", "diff_b", "x"), got, want):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=lambda m, n=name: f"gradient of {n}: {m}")
        dropped = rows == 0
        assert torch.all(got[0][dropped] == 0) and torch.all(got[1][dropped] == 0), "a dropped row must not train"
    adapter.eval()
    keep_all = torch.ones(layer.weight.shape[0], dtype=torch.float64)
    torch.testing.assert_close(adapter(x), dense(layer, adapter.diff, adapter.diff_b, x, keep_all))


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
@pytest.mark.parametrize("rescale", [False, True])
def test_rank_dropout_draws_what_lycoris_draws(kind, rescale):
    os.environ["LYCORIS_KERNEL_BACKEND"] = "torch"
    os.environ.setdefault("LYCORIS_KERNEL_TUNE", "off")
    lycoris_modules = pytest.importorskip("lycoris.modules")
    layer, x = make_layer(kind, torch.float32), make_input(kind, torch.float32)
    adapter = randomize(make_adapter("full", layer, rank_dropout=P, rank_dropout_scale=rescale)).train()
    lyco = lycoris_modules.FullModule("lyco", copy.deepcopy(layer), rank_dropout=P, rank_dropout_scale=rescale)
    with torch.no_grad():
        lyco.weight.copy_(adapter.diff)
        lyco.bias.copy_(adapter.diff_b)
    lyco.train()
    adapter.multiplier = lyco.multiplier = M
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        y = adapter(x)
        torch.manual_seed(seed)
        y_lyco = lyco(x)
        torch.testing.assert_close(y, y_lyco, rtol=1e-5, atol=1e-5)
        g = torch.randn_like(y)
        got = torch.autograd.grad(y, (adapter.diff, adapter.diff_b), g)
        want = torch.autograd.grad(y_lyco, (lyco.weight, lyco.bias), g)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.manual_seed(0)
    assert not torch.allclose(adapter(x), adapter(x)), "two calls in training draw two masks"
