"""Layers, inputs and the algorithm x option matrix shared by the algorithm tests."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

LAYERS = {
    "linear": lambda: nn.Linear(12, 8),
    # wide enough that LoHa's Khatri-Rao factors cost less than rebuilding dW (the small layers rebuild it)
    "linear_wide": lambda: nn.Linear(64, 64),
    "conv1d": lambda: nn.Conv1d(6, 8, 3, padding=2, dilation=2),
    "conv2d": lambda: nn.Conv2d(6, 8, 3, stride=2, padding=1),
    "conv2d_1x1": lambda: nn.Conv2d(6, 8, 1),
    "conv3d": lambda: nn.Conv3d(4, 8, (3, 1, 3), stride=(2, 1, 1), padding=(1, 0, 2), dilation=(1, 1, 2)),
    "layernorm": lambda: nn.LayerNorm(8),
    "groupnorm": lambda: nn.GroupNorm(2, 8),
}
INPUTS = {
    "linear": (3, 5, 12),
    "linear_wide": (2, 4, 64),
    "conv1d": (2, 6, 11),
    "conv2d": (2, 6, 9, 9),
    "conv2d_1x1": (2, 6, 5, 5),
    "conv3d": (2, 4, 5, 3, 5),
    "layernorm": (3, 5, 8),
    "groupnorm": (2, 8, 4, 4),
}
WEIGHTED = ["linear", "conv1d", "conv2d", "conv2d_1x1", "conv3d"]
CONVS_K = ["conv1d", "conv2d", "conv3d"]  # kernels > 1: where Tucker applies

# (algo, options, layers): every algorithm with the option combinations that change its math.
CASES = [
    ("lora", {}, WEIGHTED),
    ("lora", {"use_tucker": True}, CONVS_K),
    ("lora", {"dora_wd": True}, WEIGHTED),
    ("lora", {"dora_wd": True, "dora_axis": "out"}, WEIGHTED),
    ("lora", {"use_scalar": True}, WEIGHTED),
    ("lora", {"rs_lora": True}, ["linear", "conv2d"]),
    ("lora", {"bypass_mode": False}, WEIGHTED),
    ("lora", {"bypass_mode": True, "use_tucker": True, "dora_wd": True}, ["conv2d"]),
    ("loha", {}, WEIGHTED),
    ("loha", {"use_tucker": True}, CONVS_K),
    ("loha", {"dora_wd": True}, WEIGHTED),
    ("loha", {"use_scalar": True}, ["linear", "conv2d"]),
    ("loha", {"bypass_mode": False}, ["linear", "conv2d"]),
    ("loha", {"bypass_mode": True}, ["linear", "conv2d"]),  # its factor path on these small layers too
    ("loha", {"dora_wd": True, "dora_axis": "out"}, ["linear", "conv2d"]),
    ("loha", {"rs_lora": True}, ["linear", "conv2d"]),
    ("loha", {"use_tucker": True, "dora_wd": True}, ["conv2d", "conv3d"]),
    ("lokr", {}, WEIGHTED),
    ("lokr", {"dim": 1}, WEIGHTED),
    ("lokr", {"dim": 1, "decompose_both": True, "factor": 2}, ["linear", "conv2d"]),
    ("lokr", {"dim": 1, "use_tucker": True}, CONVS_K),
    # factor 1 leaves w2 the whole layer: Tucker at rank 2 (where w2_a and its transpose differ), scale 1/2
    ("lokr", {"dim": 2, "alpha": 1, "use_tucker": True, "factor": 1}, ["conv1d", "conv2d"]),
    ("lokr", {"full_matrix": True}, ["linear", "conv2d"]),
    ("lokr", {"full_matrix": True, "rs_lora": True, "alpha": 2}, ["linear"]),  # both full: scale 1 all the same
    ("lokr", {"unbalanced_factorization": True, "dim": 1}, ["linear", "conv2d"]),
    ("lokr", {"dora_wd": True, "dim": 1}, ["linear", "conv2d"]),
    ("lokr", {"use_scalar": True, "dim": 1}, ["linear"]),
    # w1 a product too (the small layers keep w1 full at dim 1: dim < max(a, b) / 2 needs a side of 3 or more,
    # here w1 8 x 8), with the scalar, which the file then holds in w1_a
    ("lokr", {"use_scalar": True, "dim": 1, "decompose_both": True}, ["linear_wide"]),
    ("lokr", {"bypass_mode": False, "dim": 1}, ["linear", "conv2d"]),
    ("lokr", {"dora_wd": True, "dora_axis": "out", "dim": 1}, ["linear", "conv2d"]),
    ("lokr", {"rs_lora": True, "dim": 1, "alpha": 2}, ["linear", "conv2d"]),
    ("lokr", {"dim": 1, "use_tucker": True, "dora_wd": True}, ["conv2d"]),
    ("lokr", {"dim": 1, "decompose_both": True, "factor": 2, "use_tucker": True}, ["conv2d"]),
    ("ia3", {}, WEIGHTED),
    ("ia3", {"train_on_input": True}, WEIGHTED),
    ("dylora", {"dim": 4, "block_size": 2}, WEIGHTED),
    ("dylora", {"dim": 4, "block_size": 2, "bypass_mode": False}, ["linear", "conv2d"]),
    ("glora", {}, WEIGHTED),
    ("glora", {"use_scalar": True}, ["linear", "conv2d"]),
    ("glora", {"rs_lora": True}, ["linear", "conv2d"]),
    ("glora", {"bypass_mode": False}, ["linear", "conv2d"]),
    ("glora", {"bypass_mode": True}, ["linear", "conv2d"]),
    ("diag-oft", {}, WEIGHTED),
    ("diag-oft", {"constraint": 0.01}, ["linear", "conv2d"]),
    ("diag-oft", {"rescaled": True}, ["linear", "conv2d"]),
    ("diag-oft", {"rescaled": True, "constraint": 0.01}, ["linear", "conv2d"]),
    ("boft", {"dim": 2}, WEIGHTED),
    ("boft", {"dim": 2, "constraint": 0.01}, ["linear", "conv2d"]),
    ("boft", {"dim": 2, "rescaled": True}, ["linear", "conv2d"]),
    ("boft", {"dim": 2, "rescaled": True, "constraint": 0.01}, ["linear", "conv2d"]),
    ("full", {}, WEIGHTED),
    ("norm", {}, ["layernorm", "groupnorm"]),
]


def case_params(with_positions: bool = False):
    """(algo, options, kind) for every case; with_positions adds a "many positions" variant on linear layers,
    where the position count selects the fused and merged-weight paths."""
    params = []
    for algo, options, layers in CASES:
        for kind in layers:
            tag = ",".join(f"{k}={v}" for k, v in options.items()) or "default"
            if not with_positions:
                params.append(pytest.param(algo, options, kind, id=f"{algo}-{kind}-{tag}"))
                continue
            for many in ([False, True] if kind == "linear" else [False]):
                label = "-many-positions" if many else ""
                params.append(pytest.param(algo, options, kind, many, id=f"{algo}-{kind}-{tag}{label}"))
    return params


def make_layer(kind, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    layer = LAYERS[kind]().to(dtype)
    with torch.no_grad():
        if isinstance(layer, (nn.LayerNorm, nn.GroupNorm)):
            layer.weight.uniform_(0.5, 1.5)
            layer.bias.normal_()
    layer.requires_grad_(False)
    return layer


def make_input(kind, dtype=torch.float64, seed=1):
    torch.manual_seed(seed)
    return torch.randn(INPUTS[kind], dtype=dtype)


@torch.no_grad()
def randomize(adapter, scale=0.3, seed=2):
    """Move every parameter off its initial value (a zero-init adapter would make every comparison trivial)."""
    torch.manual_seed(seed)
    for name, p in adapter.named_parameters():
        if name in ("dora_scale", "rescale"):
            p.mul_(1 + scale * torch.rand_like(p))
        elif name == "scalar":
            p.fill_(0.8)
        else:
            p.add_(scale * torch.randn_like(p))
    return adapter
