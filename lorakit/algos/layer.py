"""What an adapter needs to know about the layer it adapts: its kind, weight shape and how it computes."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

_CONV_OPS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
ONE_BY_ONE = {"stride": 1, "padding": 0, "dilation": 1}  # conv arguments of a pointwise (1x1) factor


@dataclass(frozen=True)
class LayerSpec:
    kind: str  # "linear", "conv1d", "conv2d", "conv3d", "layernorm", "groupnorm"
    out_dim: int
    in_dim: int
    kernel: tuple[int, ...] = ()
    conv_args: dict = field(default_factory=dict)  # stride, padding, dilation (groups is always 1)

    @property
    def is_conv(self) -> bool:
        return self.kind.startswith("conv")

    @property
    def is_norm(self) -> bool:
        return self.kind in ("layernorm", "groupnorm")

    @property
    def weight_shape(self) -> tuple[int, ...]:
        if self.is_norm:
            return (self.out_dim,)
        return (self.out_dim, self.in_dim, *self.kernel)

    @property
    def is_pointwise(self) -> bool:
        """A linear layer, or a 1x1 conv with unit stride and no padding: a GEMM over positions, whose weight
        gradient costs one product of the output gradient and the input."""
        if self.kind == "linear":
            return True
        a = self.conv_args
        return self.is_conv and self.kernel_numel == 1 and all(s == 1 for s in a["stride"]) and \
            not isinstance(a["padding"], str) and not any(a["padding"])

    @property
    def kernel_numel(self) -> int:
        return math.prod(self.kernel)

    @property
    def fan_in(self) -> int:
        return self.in_dim * self.kernel_numel

    def op(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, **override):
        """The layer's own computation with another weight (the same stride, padding and dilation)."""
        if self.kind == "linear":
            return F.linear(x, weight, bias)
        return _CONV_OPS[len(self.kernel)](x, weight, bias, **{**self.conv_args, **override})

    def channel_axis(self, ndim: int) -> int:
        """The channel axis of an activation of `ndim` dims (a conv's input may come without a batch axis)."""
        if self.is_conv:
            return ndim - 1 - len(self.kernel)
        return 1 if self.kind == "groupnorm" else ndim - 1

    def channel_view(self, t: torch.Tensor, ndim: int) -> torch.Tensor:
        """A per-channel vector shaped to broadcast over an activation of `ndim` dims."""
        if self.is_conv:  # channels come before the spatial axes, batched or not
            return t.reshape(-1, *([1] * len(self.kernel)))
        if self.kind == "groupnorm":
            return t.reshape(-1, *([1] * (ndim - 2)))
        return t  # linear and layernorm keep channels last


def is_transposed_linear(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2's attention and MLP): a Linear whose weight is stored (in, out)."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers") and module.weight.dim() == 2


class TransposedLinear(nn.Module):
    """A Linear view of a layer that stores its weight transposed (transformers' Conv1D): the adapters see a weight
    (out, in) and the bias, as of a Linear. The weight is a view of the layer's own, so a merge writes into it and
    a move of the model (``.to()``) is seen at once. Not a submodule of anything: the layer keeps its parameters."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self._host = [layer]
        self.in_features, self.out_features = layer.weight.shape

    @property
    def weight(self) -> torch.Tensor:
        return self._host[0].weight.t()

    @property
    def bias(self) -> torch.Tensor | None:
        return self._host[0].bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def describe_layer(module: nn.Module) -> LayerSpec:
    """LayerSpec of a supported layer; a clear error for anything else."""
    if isinstance(module, (nn.Linear, TransposedLinear)):
        return LayerSpec("linear", module.out_features, module.in_features)
    if is_transposed_linear(module):
        n_in, n_out = module.weight.shape
        return LayerSpec("linear", n_out, n_in)
    for n, cls in ((1, nn.Conv1d), (2, nn.Conv2d), (3, nn.Conv3d)):
        if isinstance(module, cls):
            if module.groups != 1:
                raise ValueError(f"{type(module).__name__} with groups={module.groups}: only groups=1 is supported")
            if module.padding_mode != "zeros":
                raise ValueError(
                    f"{type(module).__name__} with padding_mode='{module.padding_mode}': only 'zeros' is supported"
                )
            padding = explicit_padding(module.padding, module.kernel_size, module.dilation)
            args = {"stride": module.stride, "padding": padding, "dilation": module.dilation}
            return LayerSpec(f"conv{n}d", module.out_channels, module.in_channels, tuple(module.kernel_size), args)
    if isinstance(module, nn.LayerNorm):
        if len(module.normalized_shape) != 1:
            raise ValueError(f"LayerNorm over {tuple(module.normalized_shape)}: only a 1-d normalized_shape is supported")
        return LayerSpec("layernorm", module.normalized_shape[0], module.normalized_shape[0])
    if isinstance(module, nn.GroupNorm):
        return LayerSpec("groupnorm", module.num_channels, module.num_channels)
    raise TypeError(
        f"cannot adapt a layer of type {type(module).__name__}: supported layers are Linear, Conv1d/2d/3d, LayerNorm, "
        "GroupNorm (and transformers' Conv1D)"
    )


def explicit_padding(padding, kernel: tuple[int, ...], dilation: tuple[int, ...]):
    """A conv's string padding as per-axis amounts where they say the same: torch's conv gradients (which the
    rebuilt-weight and fused paths call) take numbers only. 'same' with an odd total on some axis pads one more on
    the far side, which no amount says: it stays 'same' (and those paths step aside for it)."""
    if padding == "valid":
        return (0,) * len(kernel)
    if padding != "same":
        return padding
    totals = [d * (k - 1) for k, d in zip(kernel, dilation)]
    return padding if any(t % 2 for t in totals) else tuple(t // 2 for t in totals)


def positions(spec: LayerSpec, x: torch.Tensor) -> int:
    """How many output positions a call computes (tokens for linear, pixels times batch for conv)."""
    if spec.kind == "linear":
        return x.numel() // max(x.shape[-1], 1)
    n = x.shape[0] if x.dim() == len(spec.kernel) + 2 else 1
    spatial = x.shape[-len(spec.kernel):]
    stride = spec.conv_args.get("stride", (1,) * len(spatial))
    for size, step in zip(spatial, stride):  # a loop, not math.prod of a generator: torch.compile breaks on that
        n *= max(1, size // step)
    return n
