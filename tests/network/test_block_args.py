"""kohya's per-block network_args (block_dims/alphas, conv_block_*, down/mid/up_lr_weight) against sd-scripts'
networks/lora.py rules written out here: get_block_index for the block of an adapter name, create_modules for which
vector a layer takes, get_block_dims_and_alphas and get_block_lr_weight for the defaults and the zero threshold."""

from __future__ import annotations

import re

import pytest

from lorakit.network import create_network
from lorakit.network.blocks import kohya_block_dims_alphas, parse_kohya_block_lr_kwargs

from .tiny import tiny_model

N_SD = 25  # sd-scripts LoRANetwork.NUM_OF_BLOCKS * 2 + NUM_OF_MID_BLOCKS
RE_UPDOWN = re.compile(r"(up|down)_blocks_(\d+)_(resnets|upsamplers|downsamplers|attentions)_(\d+)_")


def kohya_block_index(lora_name: str) -> int:
    """sd-scripts networks/lora.py get_block_index for SD1/SD2 names (-1: in no block)."""
    m = RE_UPDOWN.search(lora_name)
    if m:
        side, i, kind, j = m.group(1), int(m.group(2)), m.group(3), int(m.group(4))
        idx = 3 * i + j if kind in ("resnets", "attentions") else 3 * i + 2
        return 1 + idx if side == "down" else 12 + 1 + idx
    return 12 if "mid_block_" in lora_name else -1


def _unet_adapters(net):
    """{name: (adapter, U-Net layer)} of the adapters that sd-scripts puts in a block."""
    unet = tiny_model("sd1")[0]
    return {name: (adapter, unet.get_submodule(net.entries[name].path)) for name, adapter in net.adapters()
            if net.entries[name].component == "unet" and kohya_block_index(name) >= 0}


def test_conv_block_alphas_default_to_conv_alpha():
    """get_block_dims_and_alphas: conv_block_dims without conv_block_alphas gives every conv block conv_alpha, and
    1.0 only when conv_alpha is None."""
    for conv_alpha, want in ((0.5, 0.5), (None, 1.0)):
        _, _, conv_dims, conv_alphas = kohya_block_dims_alphas(False, 8, 4.0, block_dims=[8] * N_SD,
                                                               conv_block_dims=[2] * N_SD, conv_alpha=conv_alpha)
        assert conv_dims == [2] * N_SD and conv_alphas == [want] * N_SD


def test_a_block_lr_weight_equal_to_the_zero_threshold_is_zero():
    """get_block_lr_weight keeps `w if w > zero_threshold else 0`: a weight equal to the threshold is 0, and so
    that block gets no adapter (remove_block_dims_and_alphas: dim 0 where the lr weight is 0)."""
    down = ",".join(["0.5", "0.50001"] + ["1"] * 10)
    lr = parse_kohya_block_lr_kwargs(False, {"down_lr_weight": down, "block_lr_zero_threshold": "0.5"})
    assert lr[:3] == [0, 0.50001, 1.0]
    dims, _, conv_dims, _ = kohya_block_dims_alphas(False, 4, 1.0, conv_dim=2, block_lr_weight=lr)
    assert (dims[:3], conv_dims[:3]) == ([0, 4, 4], [0, 2, 2])



def test_only_a_block_lr_weight_of_exactly_zero_removes_the_block():
    """remove_block_dims_and_alphas drops a block only where its lr weight `== 0`: with a negative
    block_lr_zero_threshold a negative weight stays (get_block_lr_weight keeps `w > zero_threshold`) and its
    block keeps its adapter, as in sd-scripts."""
    down = ",".join(["-0.5", "0"] + ["1"] * 10)
    lr = parse_kohya_block_lr_kwargs(False, {"down_lr_weight": down, "block_lr_zero_threshold": "-1"})
    assert lr[:3] == [-0.5, 0, 1.0]
    dims, _, conv_dims, _ = kohya_block_dims_alphas(False, 4, 1.0, conv_dim=2, block_lr_weight=lr)
    assert (dims[:3], conv_dims[:3]) == ([4, 0, 4], [2, 0, 2])

def test_each_adapter_takes_the_lr_weight_of_its_own_block():
    """A distinct lr weight per block (IN00-IN11, MID, OUT00-OUT11): every U-Net adapter carries the weight of the
    block get_block_index gives its name (prepare_optimizer_params: lr * get_lr_weight(block_idx))."""
    unet, _ = tiny_model("sd1")
    lr = [round(0.05 * (k + 1), 2) for k in range(N_SD)]
    net = create_network(unet, None, algo="lora", preset="attn-mlp-convblock", dim=2, conv_dim=2,
                         down_lr_weight=lr[:12], mid_lr_weight=lr[12:13], up_lr_weight=lr[13:])
    adapters = _unet_adapters(net)
    blocks = {kohya_block_index(name) for name in adapters}
    assert blocks == set(range(1, N_SD))  # every block but IN00 (conv_in, which sd-scripts' LoRA leaves out)
    assert {name: net.lr_weights.get(name) for name in adapters} == \
        {name: lr[kohya_block_index(name)] for name in adapters}


def test_linear_and_1x1_take_block_dims_convs_take_conv_block_dims():
    """create_modules with block_dims: Linear and 1x1 convs take block_dims/block_alphas[block], convs with a kernel
    > 1 conv_block_dims/conv_block_alphas[block]; distinct values per block show any mix-up."""
    unet, _ = tiny_model("sd1")
    dims, alphas = [2 + k % 3 for k in range(N_SD)], [0.5 + k for k in range(N_SD)]
    conv_dims, conv_alphas = [5 + k % 2 for k in range(N_SD)], [100.0 + k for k in range(N_SD)]
    net = create_network(unet, None, algo="lora", preset="attn-mlp-convblock", dim=4, alpha=1,
                         block_dims=dims, block_alphas=alphas, conv_block_dims=conv_dims, conv_block_alphas=conv_alphas)
    adapters = _unet_adapters(net)
    kinds = set()
    for name, (adapter, layer) in adapters.items():
        i = kohya_block_index(name)
        kxk = layer.weight.dim() == 4 and tuple(layer.weight.shape[2:]) != (1, 1)
        kinds.add((kxk, layer.weight.dim()))
        want = (conv_dims[i], conv_alphas[i]) if kxk else (dims[i], alphas[i])
        assert (adapter.lora_down.shape[0], float(adapter.alpha)) == pytest.approx(want), name
    assert kinds == {(False, 2), (False, 4), (True, 4)}  # Linear, 1x1 and 3x3 convs all checked
