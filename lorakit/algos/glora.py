"""GLoRA: dW = (W @ a1 @ a2 + b1 @ b2) * alpha/dim (LyCORIS' current layout: a1 (in, dim), a2 (dim, in),
b1 (out, dim), b2 (dim, in, *k)). The W a1 a2 term mixes input channels, so the forward feeds
x + a1 a2 x to the layer once and adds b1 b2 x (on a frozen Linear in one function, glora_linear). bypass_mode
is LyCORIS': True always runs these chains, False rebuilds dW (the merged weight where the layer allows it), None
picks per call."""

from __future__ import annotations


import torch
import torch.nn as nn
import torch.nn.functional as F

from .layer import ONE_BY_ONE
from .base import Adapter
from .fused_linear import fusable
from .glora_linear import linear_glora
from .lora import kaiming_

class GLoRA(Adapter):
    name = "glora"
    keys = ("a1.weight", "a2.weight", "b1.weight", "b2.weight", "alpha")
    detect_keys = ("a1.weight",)
    accepts = frozenset({"dim", "alpha", "dropout", "rank_dropout", "rank_dropout_scale", "use_scalar", "rs_lora",
                         "bypass_mode"})
    scalar_key = "b1.weight"
    plus_params = ("a1", "b1")

    def build(self, options):
        spec, r = self.spec, options.dim
        ones = (1,) * len(spec.kernel)
        init = kaiming_ if options.use_scalar else (lambda t: t.zero_())
        self.a1 = nn.Parameter(kaiming_(torch.empty(spec.in_dim, r, *ones)))
        self.a2 = nn.Parameter(init(torch.empty(r, spec.in_dim, *ones)))
        self.b1 = nn.Parameter(kaiming_(torch.empty(spec.out_dim, r, *ones)))
        self.b2 = nn.Parameter(init(torch.empty(r, spec.in_dim, *spec.kernel)))
        self.set_scale(r, options.scale_alpha)

    @property
    def rank(self):
        return self.a2.shape[0]

    def _delta_weight(self):
        w = self.base_weight().to(self.dtype)
        # (W a1) a2, never the in x in matrix a1 a2: out*in*dim multiply-adds instead of out*in^2
        wa = torch.einsum("oi...,ir->or...", w, self.a1.flatten(1) * self.scale)
        wa = torch.einsum("or...,rj->oj...", wa, self.a2.flatten(1))
        b = (self.b1.flatten(1) @ self.b2.flatten(1)).reshape(self.spec.weight_shape) * self.scale
        return wa + b

    def _rank_drop(self, h):
        o = self.options
        if self.training and o.rank_dropout:
            h = h * self.channel_mask(h, o.rank_dropout)
        return h

    def _drop(self, h):
        return F.dropout(h, self.options.dropout, training=True) if self.training and self.options.dropout else h

    def _chain(self, x, first, second, first_args):
        spec = self.spec
        if spec.kind == "linear":
            return F.linear(self._rank_drop(F.linear(x, first)), second)
        return spec.op(self._rank_drop(spec.op(x, first, **first_args)), second, **ONE_BY_ONE)

    def prefers_merged_weight(self, x):
        bypass = self.options.bypass_mode
        if bypass is not None:
            return not bypass
        return self.many_positions(x)  # W a1 a2 + b1 b2 rebuilt costs less than two chains over the activations

    def adapted_forward(self, x, *args, **kwargs):
        if self.options.bypass_mode is False and not self._dropouts_active():
            # the layer could not take the merged weight (arguments, hooks, another dtype): the base's layer plus
            # op(x, dW), dW rebuilt as bypass_mode=False asks
            return Adapter.adapted_forward(self, x, *args, **kwargs)
        if not args and not kwargs and self.scalar is None and not self._dropouts_active() and fusable(self, x):
            return linear_glora(self, x, self.a1, self.a2, self.b1, self.b2, self.multiplier * self.scale)
        xa = x.to(self.dtype)
        k = self.multiplier * self.scale * self._scalar()
        ax = self._drop(self._chain(xa, self.a2, self.a1, ONE_BY_ONE)) * k
        bx = self._drop(self._chain(xa, self.b2, self.b1, {})) * k
        y = self.org_with_input_change(x, ax, *args, **kwargs)
        return y + bx.to(y.dtype)

    def tensors(self):
        return {"a1.weight": self.a1, "a2.weight": self.a2, "b1.weight": self.b1, "b2.weight": self.b2}

    def delta_weight(self, multiplier=1.0):
        # The scalar multiplies both terms; only b1 carries it in the file, so a2 gets it too when saving.
        return self._delta_weight() * self._scalar() * multiplier

    def saved_tensors(self):
        out = super().saved_tensors()
        if self.scalar is not None:
            out["a2.weight"] = out["a2.weight"] * self.scalar
        return out

    @classmethod
    def options_from_tensors(cls, spec, sd):
        a1, a2 = sd["a1.weight"], sd["a2.weight"]
        if a1.shape[0] != spec.in_dim or a2.shape[1] != spec.in_dim:
            raise ValueError(f"GLoRA tensors a1 {tuple(a1.shape)}, a2 {tuple(a2.shape)} are not in LyCORIS' current "
                             f"layout for a layer with {spec.in_dim} inputs (old-layout files are not supported)")
        dim = a2.shape[0]
        return {"dim": dim, "alpha": cls.file_alpha(sd, dim)}
