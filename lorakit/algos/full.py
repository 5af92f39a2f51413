"""Full (native) fine-tuning: the whole weight change `diff` (and bias change `diff_b`) is trained."""

from __future__ import annotations

import torch
import torch.nn as nn

from .base import Adapter


class Full(Adapter):
    name = "full"
    aliases = ("native",)
    keys = ("diff", "diff_b")
    detect_keys = ("diff",)
    optional_keys = ("diff_b",)  # written only where the bias changed (extract, kohya); the UIs read none as zero
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
        # W + m diff in one add, whose backward hands the weight's gradient to diff as it is (scaled only when
        # m != 1); the layer's op keeps the merged weight, as training the weight itself would. Plain ops: their
        # autograd nodes cost less per call than a Python autograd function (Linear 768->320 on 154 positions,
        # min of 60 interleaved rounds: 1.69-1.82x -> 1.61-1.62x the frozen layer).
        layer, m = self.layer, self.multiplier
        bias = layer.bias
        if self.diff_b is not None:
            bias = self.diff_b * m if bias is None else torch.add(bias, self.diff_b, alpha=m)
        return self.spec.op(x, torch.add(layer.weight, self.diff, alpha=m), bias)

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
