"""The fused conv passes (fused_conv._ConvPlusLowRank, _ConvMergedLowRank on calls with many positions, and LoKr's
fused_conv_kron._ConvPlusKron) against the plain formula op(x, W + m dW) in float64: strided, dilated, 1x1 (the
GEMM form, on few and many positions), 1d and 3d convolutions, with and without bias."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from lorakit.algos import make_adapter

from .conftest import make_input, make_layer, randomize
from .test_contract import check_against_formula, layer_forward

CASES = [("lora", {}), ("lora", {"use_scalar": True}), ("lora", {"dora_wd": True}), ("loha", {}),
         ("lokr", {}), ("lokr", {"use_scalar": True}), ("lokr", {"dim": 1}), ("lokr", {"dim": 1, "use_tucker": True})]
KINDS = ["conv1d", "conv2d", "conv2d_1x1", "conv3d", "conv2d_1x1_nobias", "conv2d_1x1_few"]


def _layer(kind):
    if kind == "conv2d_1x1_nobias":
        torch.manual_seed(0)
        return nn.Conv2d(6, 8, 1, bias=False).double().requires_grad_(False)
    return make_layer("conv2d_1x1" if kind.startswith("conv2d_1x1") else kind)


def _input(kind):
    if kind == "conv2d_1x1_few":  # 4 positions, under 2 x 6 input channels: the pair added, not merged
        return make_input("conv2d_1x1")[:, :, :2, :2].contiguous()
    return make_input("conv2d_1x1" if kind.startswith("conv2d_1x1") else kind)


@pytest.mark.parametrize("algo,options", CASES, ids=[f"{a}-{','.join(o) or 'default'}" for a, o in CASES])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("input_grad", [True, False])
def test_fused_conv_matches_the_merged_weight(algo, options, kind, input_grad):
    layer, x = _layer(kind), _input(kind)
    adapter = randomize(make_adapter(algo, layer, bypass_mode=True, **options).double()).eval()
    adapter.multiplier = 0.7
    out = check_against_formula(adapter, layer, x, input_grad)
    assert type(out.grad_fn).__name__ == _expected_path(algo, kind)


def _expected_path(algo, kind):
    if algo == "lokr":  # Kronecker factors: merged with their gradients from the identity, else the identity alone
        return "_ConvPlusKronBackward" if kind not in ("conv1d", "conv2d_1x1_few") else "AddBackward0"
    if kind.startswith("conv2d_1x1") and algo == "loha" and kind != "conv2d_1x1_few":
        return "_RebuiltWeightOpBackward"  # LoHa's rank-dim^2 pair: the pointwise layer runs with the rebuilt weight
    # the pair merges into the layer's weight where the call has enough positions against the weight's size: not
    # on the dilated conv1d's 22 positions (18 input columns, 8 outputs) nor on the 1x1 conv's 8
    merged = kind not in ("conv1d", "conv2d_1x1_few")
    return "_ConvMergedLowRankBackward" if merged else "_ConvPlusLowRankBackward"


def test_channels_last_and_unbatched_inputs_take_the_plain_path():
    layer = make_layer("conv2d_1x1")
    adapter = randomize(make_adapter("lora", layer, bypass_mode=True).double()).eval()
    x = make_input("conv2d_1x1")
    for given in (x.contiguous(memory_format=torch.channels_last), x[0]):
        out = adapter(given)
        assert out.grad_fn is None or type(out.grad_fn).__name__ != "_ConvPlusLowRankBackward"
        expected = layer_forward(layer, given, layer.weight + adapter.delta_weight(), layer.bias)
        torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-10)
