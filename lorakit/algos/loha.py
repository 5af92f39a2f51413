"""LoHa (FedPara): dW = (w1a @ w1b) * (w2a @ w2b) * alpha/dim, a rank up to dim^2 from 4 * dim vectors.

The forward goes through the factors with the row/column Khatri-Rao identity
    (A1 B1) * (A2 B2) = (A1 (x)row A2) (B1 (x)col B2),
a rank-dim^2 product that never builds dW. Tucker (convs with kernel > 1): each half is
einsum(t, w_b, w_a) with w_a (dim, out), w_b (dim, in), t (dim, dim, *k), as LyCORIS, ComfyUI and A1111 store it.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .layer import ONE_BY_ONE
from .base import LOW_RANK_OPTIONS, Adapter


def tucker_rebuild(t: torch.Tensor, w_a: torch.Tensor, w_b: torch.Tensor) -> torch.Tensor:
    """(out, in, *k) from core t (dim, dim, *k), w_a (dim, out), w_b (dim, in)."""
    return torch.einsum("ij...,jr,ip->pr...", t, w_b, w_a)


class LoHa(Adapter):
    name = "loha"
    keys = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "alpha", "dora_scale")
    detect_keys = ("hada_w1_a",)
    accepts = LOW_RANK_OPTIONS | {"use_tucker"}
    scalar_key = "hada_w1_a"
    plus_params = ("hada_w1_a", "hada_w2_a")

    def build(self, options):
        spec, r = self.spec, options.dim
        self.tucker = options.use_tucker and spec.is_conv and spec.kernel_numel > 1
        if self.tucker:
            a_shape, b_shape = (r, spec.out_dim), (r, spec.in_dim)
            self.hada_t1 = nn.Parameter(torch.randn(r, r, *spec.kernel) * 0.1)
            self.hada_t2 = nn.Parameter(torch.randn(r, r, *spec.kernel) * 0.1)
        else:
            a_shape, b_shape = (spec.out_dim, r), (r, spec.fan_in)
        # LyCORIS' init: w2a starts at zero so that dW = 0 (with a scalar, the scalar is the zero instead).
        self.hada_w1_a = nn.Parameter(torch.randn(a_shape) * 0.1)
        self.hada_w1_b = nn.Parameter(torch.randn(b_shape))
        w2a = torch.randn(a_shape) * 0.1
        self.hada_w2_a = nn.Parameter(w2a if options.use_scalar else torch.zeros(a_shape))
        self.hada_w2_b = nn.Parameter(torch.randn(b_shape))
        self.set_scale(r, options.scale_alpha)

    @property
    def rank(self) -> int:
        return self.hada_w1_b.shape[0]

    def _delta_weight(self):
        if self.tucker:
            w1 = tucker_rebuild(self.hada_t1, self.hada_w1_a, self.hada_w1_b)
            w2 = tucker_rebuild(self.hada_t2, self.hada_w2_a, self.hada_w2_b)
            return w1 * w2 * self.scale
        w = (self.hada_w1_a @ self.hada_w1_b) * (self.hada_w2_a @ self.hada_w2_b) * self.scale
        return w.reshape(self.spec.weight_shape)

    def _khatri_rao(self):
        """(B1 (x)col B2, A1 (x)row A2): the rank-dim^2 pair whose product is dW / scale."""
        spec, r = self.spec, self.rank
        a = (self.hada_w1_a[:, :, None] * self.hada_w2_a[:, None, :]).reshape(spec.out_dim, r * r)
        b = (self.hada_w1_b[:, None, :] * self.hada_w2_b[None, :, :]).reshape(r * r, spec.fan_in)
        return b, a

    def prefers_merged_weight(self, x):
        # the Khatri-Rao pair has rank dim^2: on many positions its thin products cost more than one merged pass
        return not self.tucker and self.dora_scale is None and self.many_positions(x)

    def low_rank_pair(self, x):
        if self.tucker or (self.training and (self.options.dropout or self.options.rank_dropout)):
            return None  # its dropouts act on the output
        down, up = self._khatri_rao()
        return down, up, self.scale, None

    def delta_forward(self, x):
        if self.tucker:
            return super().delta_forward(x)
        spec, r = self.spec, self.rank
        b, a = self._khatri_rao()
        a = a * self.scale
        if spec.kind == "linear":
            return torch.nn.functional.linear(torch.nn.functional.linear(x, b), a)
        ones = (1,) * len(spec.kernel)
        h = spec.op(x, b.reshape(r * r, spec.in_dim, *spec.kernel))
        return spec.op(h, a.reshape(spec.out_dim, r * r, *ones), **ONE_BY_ONE)

    def factor_flops(self, n):
        if self.tucker:
            return math.inf
        spec = self.spec
        return n * self.rank ** 2 * (spec.fan_in + spec.out_dim)

    def rebuild_flops(self):
        return 2 * math.prod(self.spec.weight_shape) * self.rank

    def tensors(self):
        out = {k: getattr(self, k) for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}
        if self.tucker:
            out.update(hada_t1=self.hada_t1, hada_t2=self.hada_t2)
        return out

    @classmethod
    def options_from_tensors(cls, spec, sd):
        dim = sd["hada_w1_b"].shape[0]
        return {"dim": dim, "alpha": cls.file_alpha(sd, dim), "use_tucker": "hada_t1" in sd}
