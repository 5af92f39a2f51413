"""Norm training: trained changes `w_norm`, `b_norm` of a LayerNorm/GroupNorm's affine weight and bias."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import Adapter


class Norm(Adapter):
    name = "norm"
    keys = ("w_norm", "b_norm")
    detect_keys = ("w_norm",)
    layer_kinds = frozenset({"layernorm", "groupnorm"})
    saves_alpha = False

    def build(self, options):
        if getattr(self.layer, "weight", None) is None:
            raise ValueError(f"norm training needs an affine {type(self.layer).__name__} (it has no weight)")
        c = self.spec.out_dim
        self.w_norm = nn.Parameter(torch.zeros(c))
        self.b_norm = nn.Parameter(torch.zeros(c))  # always saved: A1111 needs both tensors

    def normalized(self, x):
        layer = self.layer
        if self.spec.kind == "layernorm":
            return F.layer_norm(x, layer.normalized_shape, None, None, layer.eps)
        return F.group_norm(x, layer.num_groups, None, None, layer.eps)

    def adapted_forward(self, x, *args, **kwargs):
        y = self._org_forward(x, *args, **kwargs)
        n = self.normalized(x.to(self.dtype))
        view = self.spec.channel_view
        d = n * view(self.w_norm, n.dim()) + view(self.b_norm, n.dim())
        return y + (d * self.multiplier).to(y.dtype)

    def _delta_weight(self):
        return self.w_norm

    def delta_bias(self, multiplier=1.0):
        return self.b_norm * multiplier

    def tensors(self):
        return {"w_norm": self.w_norm, "b_norm": self.b_norm}

    @classmethod
    def options_from_tensors(cls, spec, sd):
        return {}
