"""(IA)^3: learned per-channel rescaling, dW = W * w on the output rows (or input columns with
train_on_input). The forward scales the layer's output (or input) instead of touching W; on a frozen Linear
over many positions (on a CPU) the output scale is folded into W instead, which saves a pass over the output each
way (Linear 320 on 8192 positions: 1.18x -> 1.08x the frozen layer)."""

from __future__ import annotations

import torch
import torch.nn as nn

from . import amp
from .base import Adapter, bias_changing_bypass
from .fused_linear import (fusable, linear_folded, output_scale_from_sums, output_scale_grad, output_scale_sums,
                           plain_frozen_layer)


class _ScaledOutput(torch.autograd.Function):
    """(W x)(1 + m w) + b from the layer's output y = W x + b, as y (1 + m w) - b m w over the channel axis: one
    pass each way. The scale and the shift are built inside from the parameter w (no autograd nodes of their
    own, a fixed cost that shows on short inputs), and backward's two reductions are written out."""

    @staticmethod
    def forward(ctx, y, weight, bias, m: float, channel: int):
        shape = [1] * y.dim()
        shape[channel] = -1
        w = weight.reshape(-1)
        scale = (w * m).add_(1).view(shape)
        out = y * scale if bias is None else torch.addcmul((bias * w).mul_(-m).view(shape), y, scale)
        ctx.save_for_backward(y, weight, bias)
        ctx.m, ctx.channel, ctx.shape = m, channel, shape
        return out

    @staticmethod
    def backward(ctx, g):
        y, weight, bias = ctx.saved_tensors
        m, channel = ctx.m, ctx.channel
        grad_y = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_y = g * (weight.reshape(-1) * m).add_(1).view(ctx.shape)
        if ctx.needs_input_grad[1]:
            grad_w = output_scale_grad(g, y, bias, channel).mul_(m).view(weight.shape)
        return grad_y, grad_w, None, None, None


class _ScaledRows:
    """IA3's output scale folded into a Linear's weight: W * s[:, None]. grad_s = sum_n g * (W x) comes from the
    output itself, (y - b) / s: the scales must stay away from 0 (the caller checks)."""

    @staticmethod
    def weight(weight, s):
        return weight * s[:, None]

    @staticmethod
    def output_sums(g, y, bias, s):
        return output_scale_sums(g, y, bias)

    @staticmethod
    def param_grad(sums, bias, s):
        return output_scale_from_sums(sums, bias) / s


# The folded path divides by the scale in backward; below this it would lose precision (or divide by zero).
_MIN_SCALE = 0.05
# Below this many positions the pass over the output saved by folding costs less than the per-call setup (the
# scale check and the weight product): measured on bench/layers.py's 154- and 8192-position linear shapes.
_MIN_FOLD_POSITIONS = 1024
# Inputs up to this many elements take _scaled_short_call (Linear 768->320 on 154 positions: 118k; Linear 1280 on
# 512 positions, 655k, measured even either way).
_MAX_NATIVE_INPUT = 1 << 18


class IA3(Adapter):
    name = "ia3"
    keys = ("weight", "on_input")
    detect_keys = ("on_input",)
    accepts = frozenset({"train_on_input"})
    refusal_notes = bias_changing_bypass("scales")
    saves_alpha = False

    def build(self, options):
        spec = self.spec
        self.on_input = options.train_on_input
        channels = spec.in_dim if self.on_input else spec.out_dim
        # LyCORIS' shapes: (C,) for linear, (1, C, 1, ...) for convs; zero means no change.
        shape = (1, channels, *([1] * len(spec.kernel))) if spec.is_conv else (channels,)
        self.weight = nn.Parameter(torch.zeros(shape))

    def _w(self):
        # a Linear's (C,) weight as it is: a reshape would add an autograd node on every call
        return self.weight if self.weight.dim() == 1 else self.weight.reshape(-1)

    def adapted_forward(self, x, *args, **kwargs):
        m, spec = self.multiplier, self.spec
        if self.on_input:
            gain = self._w() * m
            if x.dtype == self.dtype:  # one pass: the layer on x * (1 + m w)
                return self._org_forward(x * spec.channel_view(1 + gain, x.dim()), *args, **kwargs)
            u = x.to(self.dtype) * spec.channel_view(gain, x.dim())
            return self.org_with_input_change(x, u, *args, **kwargs)
        # Under autocast neither fast path: each scales in autocast's dtype, where 1 + m w rounds to 1 for any |m w|
        # under its resolution (2^-8 in bfloat16); the last path adds the change apart, as LyCORIS does.
        plain = not args and not kwargs and amp.autocast_dtype(x.device.type) is None
        if plain and x.device.type == "cpu" and x.numel() >= _MIN_FOLD_POSITIONS * x.shape[-1] and fusable(self, x):
            scale = 1 + self._w() * m  # the check below reads the values: free on a CPU, a device sync elsewhere
            if bool((scale.detach().abs() >= _MIN_SCALE).all()):
                return linear_folded(self, x, scale, _ScaledRows)
        if plain and x.numel() <= _MAX_NATIVE_INPUT and plain_frozen_layer(self, x):
            return self._scaled_short_call(x, m)
        y = self._org_forward(x, *args, **kwargs)
        if y.dtype == self.dtype:
            return amp.apply(_ScaledOutput, y, self.weight, self.base_bias(), float(m), spec.channel_axis(y.dim()))
        z = self.without_bias(y)  # a half-precision layer: the change apart, in the adapter's precision
        return y + (z.to(self.dtype) * spec.channel_view(self._w() * m, y.dim())).to(y.dtype)

    def _scaled_short_call(self, x, m):
        """b + (W x)(1 + m w) on a short call: the layer's op without its bias, then one addcmul that adds it back,
        all native autograd ops. On a short call the custom function's fixed cost shows; on a long one autograd's
        addcmul backward writes g * (W x) out before reducing it, which _ScaledOutput's blocked sums avoid.
        Linear 768->320 on 154 positions, in-process A/B, min of 30 rounds over the frozen layer: the ops alone
        1.20x -> 1.11x (peft, which scales the bias too: 1.08x), through the adapter 1.21x -> 1.16x; Linear 1280
        on 512 positions even; the 1x1 conv on 64x64 1.02x -> 1.24x, hence the bound on the input's size."""
        layer, spec = self.layer, self.spec
        # On a Linear, a zero bias keeps a batched input on F.linear's addmm path; without one it takes matmul's,
        # whose extra view nodes cost 2-3% of this call (Linear 768->320 on 154 positions, these ops alone, min of
        # 30 rounds over the frozen layer, three runs: 1.10/1.12/1.12 -> 1.07/1.10/1.09; peft 1.08/1.09/1.10).
        zero = layer.weight.new_zeros(spec.out_dim) if spec.kind == "linear" else None
        z = spec.op(x, layer.weight, zero)
        w = self._w()
        scale = spec.channel_view(torch.add(w.new_ones(()), w, alpha=m), z.dim())  # one autograd node: 1 + m w
        if layer.bias is None:
            return z * scale
        return torch.addcmul(spec.channel_view(layer.bias, z.dim()), z, scale)

    def _delta_weight(self):
        w = self.base_weight().to(self.dtype)
        scale = self.weight.reshape(1, -1, *([1] * (w.dim() - 2))) if self.on_input else \
            self._w().reshape(-1, *([1] * (w.dim() - 1)))
        return w * scale

    def tensors(self):
        return {"weight": self.weight}

    def saved_tensors(self):
        return {"weight": self.weight, "on_input": torch.tensor(int(self.on_input))}

    def _param_for_key(self, key):
        if key == "on_input":
            return torch.tensor(int(self.on_input))  # fixed at construction; _load_from_state_dict checks the value
        return super()._param_for_key(key)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # A file of the other side's scales has the same shape on a square layer: loaded, it would scale the wrong
        # channels without a word (sd-scripts' --network_weights into a network made with another train_on_input)
        saved = state_dict.get(prefix + "on_input")
        saved_on_input = None if saved is None else bool(int(saved))
        if saved_on_input is not None and saved_on_input != self.on_input:
            side = {True: "input", False: "output"}
            error_msgs.append(f"{prefix}on_input: the file's (IA)^3 scales the layer's {side[saved_on_input]} "
                              f"channels, this adapter its {side[self.on_input]} channels "
                              f"(train_on_input={self.on_input})")
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    @classmethod
    def options_from_tensors(cls, spec, sd):
        return {"train_on_input": bool(int(sd["on_input"])) if "on_input" in sd else False}
