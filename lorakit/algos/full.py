"""Full (native) fine-tuning: the whole weight change `diff` (and bias change `diff_b`) is trained."""

from __future__ import annotations

import torch
import torch.nn as nn

from .base import Adapter
from .fused_linear import fusable, gemm_linear, times_gain


class _LinearPlusFull(torch.autograd.Function):
    """y = x (W + m diff)^T + (b + m diff_b) for a frozen Linear: the merged weight is built in one pass and kept
    for backward (as training the weight itself would keep it), and m is folded into the gradients' products, so
    the change costs no pass over the weight beyond that one add."""

    @staticmethod
    def forward(ctx, x, weight, bias, diff, diff_b, m: float):
        x2 = x.reshape(-1, x.shape[-1])
        merged = torch.add(weight, diff, alpha=m)
        if diff_b is not None:
            bias = diff_b * m if bias is None else torch.add(bias, diff_b, alpha=m)
        y = gemm_linear(x2, merged, bias)
        ctx.save_for_backward(x2, merged)
        ctx.x_shape, ctx.m = x.shape, m
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, g):
        x2, merged = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])
        m = ctx.m
        grad_x = (g2 @ merged).view(ctx.x_shape) if ctx.needs_input_grad[0] else None
        grad_diff = grad_diff_b = None
        if ctx.needs_input_grad[3]:
            grad_diff = times_gain(g2.t() @ x2, m, in_place=True)
        if ctx.needs_input_grad[4]:
            grad_diff_b = times_gain(g2.sum(0), m, in_place=True)
        return grad_x, None, None, grad_diff, grad_diff_b, None


class Full(Adapter):
    name = "full"
    aliases = ("native",)
    keys = ("diff", "diff_b")
    detect_keys = ("diff",)
    saves_alpha = False

    def build(self, options):
        self.diff = nn.Parameter(torch.zeros(self.spec.weight_shape))
        bias = self.base_bias()
        self.diff_b = nn.Parameter(torch.zeros(bias.shape)) if bias is not None else None

    def _delta_weight(self):
        return self.diff

    def delta_forward(self, x):
        return self.spec.op(x, self.diff)

    def prefers_merged_weight(self, x):
        return True  # one pass with W + diff beats the layer plus a second full product

    def merged_weight_forward(self, x):
        layer, m = self.layer, self.multiplier
        if fusable(self, x) and torch.is_grad_enabled():
            return _LinearPlusFull.apply(x, layer.weight, layer.bias, self.diff, self.diff_b, float(m))
        bias = layer.bias
        if self.diff_b is not None:
            bias = self.diff_b * m if bias is None else bias + self.diff_b * m
        return self.spec.op(x, layer.weight + self.diff * m, bias)

    def factor_flops(self, n):
        return 0.0  # dW is the parameter itself: nothing to rebuild

    def adapted_forward(self, x, *args, **kwargs):
        y = super().adapted_forward(x, *args, **kwargs)
        if self.diff_b is None:
            return y
        return y + (self.spec.channel_view(self.diff_b, y.dim()) * self.multiplier).to(y.dtype)

    def delta_bias(self, multiplier=1.0):
        return None if self.diff_b is None else self.diff_b * multiplier

    def tensors(self):
        return {"diff": self.diff} | ({"diff_b": self.diff_b} if self.diff_b is not None else {})

    @classmethod
    def options_from_tensors(cls, spec, sd):
        return {}
