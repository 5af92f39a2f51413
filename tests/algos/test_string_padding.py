"""Convs with string padding ('same', 'valid'): every algorithm trains on them, its output and gradients those of
the layer with W + dW (LyCORIS computes F.conv(x, W + dW, padding='same') through autograd). torch's conv
gradients, which the rebuilt-weight and fused paths call, take numeric padding only."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lorakit.algos import make_adapter

from .conftest import CASES, randomize

CONVS = {
    "conv1d-dilated": lambda p: nn.Conv1d(6, 8, 3, padding=p, dilation=2),
    "conv2d": lambda p: nn.Conv2d(6, 8, 3, padding=p),
    "conv2d-even-kernel": lambda p: nn.Conv2d(6, 8, (2, 3), padding=p),  # 'same' pads one more on the far side
}
INPUTS = {"conv1d-dilated": (2, 6, 11), "conv2d": (2, 6, 7, 7), "conv2d-even-kernel": (2, 6, 6, 7)}
CONV_CASES = [(algo, options) for algo, options, layers in CASES if "conv2d" in layers]
OPS = {1: F.conv1d, 2: F.conv2d}


def params():
    for algo, options in CONV_CASES:
        tag = ",".join(f"{k}={v}" for k, v in options.items()) or "default"
        for kind in CONVS:
            for padding in ("same", "valid"):
                yield pytest.param(algo, options, kind, padding, id=f"{algo}-{tag}-{kind}-{padding}")


def reference(layer, adapter, x):
    """The layer's conv with W + dW (and b + db) at the layer's own string padding, by autograd in float64."""
    bias, db = layer.bias, adapter.delta_bias()
    bias = db if bias is None else (bias if db is None else bias + db)
    op = OPS[layer.weight.dim() - 2]
    return op(x, layer.weight + adapter.delta_weight(), bias, stride=layer.stride, padding=layer.padding,
              dilation=layer.dilation)


def trainable(adapter):
    return [p for p in adapter.parameters() if p.requires_grad]


@pytest.mark.parametrize("algo,options,kind,padding", list(params()))
def test_string_padding_trains_as_the_merged_weight(algo, options, kind, padding):
    torch.manual_seed(0)
    layer = CONVS[kind](padding).double().requires_grad_(False)
    adapter = randomize(make_adapter(algo, layer, **options).double()).eval()
    x = torch.randn(INPUTS[kind], dtype=torch.float64, requires_grad=True)

    out = adapter(x)
    got = torch.autograd.grad(out.sin().sum(), [x, *trainable(adapter)], allow_unused=True)
    want_out = reference(layer, adapter, x)
    want = torch.autograd.grad(want_out.sin().sum(), [x, *trainable(adapter)], allow_unused=True)

    torch.testing.assert_close(out, want_out, rtol=1e-9, atol=1e-10)
    for g, w in zip(got, want):
        if w is None:
            assert g is None or not g.any()
        else:
            torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-9)
