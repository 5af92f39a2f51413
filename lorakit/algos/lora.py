"""LoRA / LoCon: dW = up @ down * alpha/dim; for convs with kernel > 1 optionally Tucker (down 1x1, mid kxk, up 1x1).

Dropouts follow kohya's LoRA: `dropout` drops the dim-sized activation between down and up, `rank_dropout` drops
whole rank components per sample.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layer import ONE_BY_ONE
from .base import LOW_RANK_OPTIONS, Adapter
from .low_rank_norm import low_rank_column_squares


def kaiming_(t: torch.Tensor) -> torch.Tensor:
    """The init of torch's Linear/Conv weights (and of Microsoft's LoRA down)."""
    return nn.init.kaiming_uniform_(t, a=math.sqrt(5))


class LoRA(Adapter):
    name = "lora"
    aliases = ("locon",)
    keys = ("lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha", "dora_scale")
    detect_keys = ("lora_up.weight", "lora_down.weight")
    accepts = LOW_RANK_OPTIONS | {"use_tucker"}
    scalar_key = "lora_up.weight"
    plus_params = ("lora_up",)
    dropout_on_output = False

    def build(self, options):
        spec, r = self.spec, options.dim
        ones = (1,) * len(spec.kernel)
        self.tucker = options.use_tucker and spec.is_conv and spec.kernel_numel > 1
        if self.tucker:
            self.lora_down = nn.Parameter(kaiming_(torch.empty(r, spec.in_dim, *ones)))
            self.lora_mid = nn.Parameter(kaiming_(torch.empty(r, r, *spec.kernel)))
        else:
            self.lora_down = nn.Parameter(kaiming_(torch.empty(r, spec.in_dim, *spec.kernel)))
        up = torch.empty(spec.out_dim, r, *ones)
        self.lora_up = nn.Parameter(kaiming_(up) if options.use_scalar else up.zero_())
        self.set_scale(r, options.scale_alpha)

    @property
    def rank(self) -> int:
        return self.lora_down.shape[0]

    def factors(self):
        """(down, up, scale) used by this call; DyLoRA narrows them while training."""
        return self.lora_down, self.lora_up, self.scale

    def _delta_weight(self):
        down, up, scale = self.factors()
        up, down = up.flatten(1) * scale, down.flatten(1)
        if self.tucker:
            return torch.einsum("oa,ab...,bi->oi...", up, self.lora_mid, down)
        return (up @ down).reshape(self.spec.weight_shape)

    def dora_norm(self):
        """|W + s U D| per column (or row) without building dW: |W|^2 + 2 s <W, U D> + s^2 |U D|^2, where the cross
        term needs one (fan_in x out) @ (out x dim) product and the last one a dim x dim Gram matrix."""
        if self.tucker:
            return super().dora_norm()
        down, up, scale = self.factors()
        dtype = self.wide_dtype()
        w = self.base_weight().to(dtype).flatten(1)  # (out, fan_in)
        u = (up.flatten(1) * (scale * self._scalar())).to(dtype)  # (out, dim)
        d = down.flatten(1).to(dtype)  # (dim, fan_in)
        if self.options.dora_axis == "out":  # rows of W are the columns of W^T = D^T U^T
            sq = low_rank_column_squares(w.t(), self._base_square_sums(w, 1), d.t(), u.t())
            return sq.clamp_min(0).sqrt().reshape(self.dora_scale.shape)
        sq = low_rank_column_squares(w, self._base_square_sums(w, 0), u, d)
        sq = sq.reshape(self.spec.in_dim, -1).sum(1)  # a conv's column spans its kernel positions
        return sq.clamp_min(0).sqrt().reshape(self.dora_scale.shape)

    def _base_square_sums(self, w: torch.Tensor, dim: int) -> torch.Tensor:
        """|W|^2 summed along dim for the frozen base weight w, kept until the weight changes (merge, a new
        weight): it is a weight-sized pass on every call otherwise, a fixed cost that dominates on short inputs."""
        weight = self.layer.weight
        # an inference tensor has no version counter to tell a change by, and a compiled graph fuses the pass
        # (the cache's checks would break it): computed each call
        if torch.compiler.is_compiling() or weight.is_inference():
            return w.square().sum(dim)
        key = (weight.data_ptr(), weight._version, w.dtype, w.device, dim)
        cached = self.__dict__.get("_square_sums")
        if cached is None or cached[0] != key:
            cached = (key, w.square().sum(dim))
            self.__dict__["_square_sums"] = cached
        return cached[1]

    def rank_mask(self, h_shape, like: torch.Tensor) -> torch.Tensor | None:
        """kohya's dropouts on the rank activation h (shape h_shape) as one multiplicative mask; None in eval."""
        if not self._dropouts_active():
            return None
        o = self.options
        mask = torch.ones(h_shape, dtype=like.dtype, device=like.device)
        if o.dropout:
            mask = F.dropout(mask, o.dropout, training=True)
        if o.rank_dropout:
            mask = mask * self.channel_mask(mask, o.rank_dropout)
        return mask

    def low_rank_pair(self, x):
        if self.tucker:
            return None
        down, up, scale = self.factors()
        mask = self.rank_mask((*x.shape[:-1], down.shape[0]), x)
        return down, up, scale, None if mask is None else mask.reshape(-1, down.shape[0])

    def delta_forward(self, x):
        down, up, scale = self.factors()
        spec = self.spec
        if spec.kind == "linear":
            h = F.linear(x, down)
        elif self.tucker:
            h = spec.op(spec.op(x, down, **ONE_BY_ONE), self.lora_mid)
        else:
            h = spec.op(x, down)
        mask = self.rank_mask(h.shape, h)
        if mask is not None:
            h = h * mask
        if spec.kind == "linear":
            return F.linear(h, up * scale)
        return spec.op(h, up * scale, **ONE_BY_ONE)

    def factor_flops(self, n):
        spec, r = self.spec, self.rank
        mid = r * r * spec.kernel_numel if self.tucker else 0
        down = spec.in_dim * (1 if self.tucker else spec.kernel_numel)
        return n * r * (down + spec.out_dim) + n * mid

    def rebuild_flops(self):
        return math.prod(self.spec.weight_shape) * self.rank

    def tensors(self):
        out = {"lora_down.weight": self.lora_down, "lora_up.weight": self.lora_up}
        if self.tucker:
            out["lora_mid.weight"] = self.lora_mid
        return out

    @classmethod
    def options_from_tensors(cls, spec, sd):
        dim = sd["lora_down.weight"].shape[0]
        return {"dim": dim, "alpha": cls.file_alpha(sd, dim), "use_tucker": "lora_mid.weight" in sd}
