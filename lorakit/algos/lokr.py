"""LoKr: dW = kron(w1, w2) * alpha/dim, with w1 (a, b) small and w2 (c, d[, *k]) large; either may be a
rank-dim product (w1_a @ w1_b, w2_a @ w2_b) and w2 may be Tucker (t2, w2_a (dim, c), w2_b (dim, d)).

The forward uses the Kronecker-vector identity: with x viewed as (b, d), kron(w1, w2) x = w1 X w2^T, so the
full out x in matrix is never built. When both factors are full matrices the scale is 1 and `alpha` is written
equal to dim (at most float16's largest value), which loaders ignore there: ComfyUI and A1111 then apply 1.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import amp
from .fused_conv import conv_backward, conv_fusable, merged_pays
from .fused_conv_kron import conv_plus_kron
from .fused_linear import fusable, linear_plus_kron
from .kron_linear import linear_plus_kron_factors
from .layer import ONE_BY_ONE
from .base import LOW_RANK_OPTIONS, Adapter
from .loha import tucker_rebuild
from .lora import kaiming_
from .options import OptionError

_FP16_MAX = float(torch.finfo(torch.float16).max)


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n) with m * n = dimension and m <= n: m = factor when it divides, else the most balanced pair with
    m <= factor (-1: no limit). The same split LyCORIS makes, so that files keep their shapes."""
    if factor > 0 and dimension % factor == 0:
        m, n = factor, dimension // factor
        return (m, n) if m <= n else (n, m)
    if factor < 0:
        factor = dimension
    m, n = 1, dimension
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > m + n or new_m > factor:
            break
        m, n = new_m, new_n
    return (m, n) if m <= n else (n, m)


class _ChannelsLastConv2d(torch.autograd.Function):
    """conv2d(x, w) computed channels-last: oneDNN runs a conv with this few channels (w2's) much faster so
    (Conv2d 320 k3 on 64x64: the whole LoKr step 1.47x -> 1.33x the frozen conv, the layout copies included).
    The input is kept as given and converted again in backward, so no second copy of it is held."""

    @staticmethod
    def forward(ctx, x, w, conv_args):
        ctx.save_for_backward(x, w)
        ctx.conv_args = conv_args
        return F.conv2d(x.contiguous(memory_format=torch.channels_last), w, **conv_args)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        xs = x.contiguous(memory_format=torch.channels_last)
        grad_x, grad_w = conv_backward(ctx.conv_args, g.contiguous(memory_format=torch.channels_last), xs, w,
                                       ctx.needs_input_grad[:2])
        return grad_x, grad_w, None


class LoKr(Adapter):
    name = "lokr"
    keys = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "alpha",
            "dora_scale")
    detect_keys = ("lokr_w1", "lokr_w1_a", "lokr_w2", "lokr_w2_a")
    accepts = LOW_RANK_OPTIONS | {"use_tucker", "factor", "decompose_both", "full_matrix", "unbalanced_factorization"}

    plus_params = ("lokr_w2", "lokr_w2_a")  # the larger factor's output side

    def __init__(self, layer, options=None, *, shapes: dict | None = None, strict_factor: bool = True, **kwargs):
        object.__setattr__(self, "_file_shapes", shapes)  # set by from_state_dict: the file's exact layout
        # On a whole network a factor that does not divide some layer falls back to LyCORIS' split for it
        object.__setattr__(self, "_strict_factor", strict_factor)
        super().__init__(layer, options, **kwargs)

    def _plan(self, options) -> dict:
        spec, r = self.spec, options.dim
        if self._file_shapes is not None:
            return self._file_shapes
        a, c = factorization(spec.out_dim, options.factor)
        b, d = factorization(spec.in_dim, options.factor)
        if options.unbalanced_factorization:
            a, c = c, a
        if self._strict_factor and options.factor > 0 and (spec.out_dim % options.factor or
                                                           spec.in_dim % options.factor):
            bad = spec.out_dim if spec.out_dim % options.factor else spec.in_dim
            raise OptionError(f"option 'factor': {options.factor} does not divide the layer dimension {bad} "
                              f"(use -1 for the smallest factorisation)")
        tucker = options.use_tucker and spec.is_conv and spec.kernel_numel > 1
        w1_low = options.decompose_both and r < max(a, b) / 2 and not options.full_matrix
        w2_low = r < max(c, d) / 2 and not options.full_matrix
        return {"a": a, "b": b, "c": c, "d": d, "w1_low": w1_low, "w2_low": w2_low, "tucker": tucker and w2_low}

    def build(self, options):
        spec, r = self.spec, options.dim
        plan = self._plan(options)
        self.plan = plan
        a, b, c, d, k = plan["a"], plan["b"], plan["c"], plan["d"], spec.kernel
        kn = spec.kernel_numel
        r1, r2 = plan.get("r1", r), plan.get("r2", r)  # a file may give the two factors different ranks
        if plan["w1_low"]:
            self.lokr_w1_a = nn.Parameter(kaiming_(torch.empty(a, r1)))
            self.lokr_w1_b = nn.Parameter(kaiming_(torch.empty(r1, b)))
        else:
            self.lokr_w1 = nn.Parameter(kaiming_(torch.empty(a, b)))
        # The w2 side starts at zero (w2_b, or the whole w2): dW = 0. With a scalar, the scalar is the zero.
        zero = (lambda t: kaiming_(t)) if options.use_scalar else (lambda t: t.zero_())
        if not plan["w2_low"]:
            self.lokr_w2 = nn.Parameter(zero(torch.empty(c, d, *k)))
        elif plan["tucker"]:
            self.lokr_t2 = nn.Parameter(kaiming_(torch.empty(r2, r2, *k)))
            self.lokr_w2_a = nn.Parameter(kaiming_(torch.empty(r2, c)))
            self.lokr_w2_b = nn.Parameter(zero(torch.empty(r2, d)))
        else:
            self.lokr_w2_a = nn.Parameter(kaiming_(torch.empty(c, r2)))
            self.lokr_w2_b = nn.Parameter(zero(torch.empty(r2, d * kn)))
        self.scalar_key = "lokr_w1_a" if plan["w1_low"] else "lokr_w1"
        full = not plan["w1_low"] and not plan["w2_low"]
        self.set_scale(r, r if full else options.scale_alpha)
        if full:
            self.scale = 1.0  # both factors full: alpha is meaningless and saved as dim (rs_lora too)

    def saved_alpha(self):
        if self.plan["w1_low"] or self.plan["w2_low"]:
            return super().saved_alpha()
        # Both full: dim, at most float16's largest value, so that an fp16 file holds a finite alpha (kohya_ss' LoKr
        # presets give dim 100000; as inf, lorakit's inspect flags the file and int(alpha) fails on load).
        return min(float(self._scale_dim), _FP16_MAX)

    def _load_alpha(self, saved):
        if self.plan["w1_low"] or self.plan["w2_low"]:
            super()._load_alpha(saved)

    # ----- the two factors -----
    def w1(self) -> torch.Tensor:
        return self.lokr_w1_a @ self.lokr_w1_b if self.plan["w1_low"] else self.lokr_w1

    def w2(self) -> torch.Tensor:
        p, k = self.plan, self.spec.kernel
        if not p["w2_low"]:
            return self.lokr_w2
        if p["tucker"]:
            return tucker_rebuild(self.lokr_t2, self.lokr_w2_a, self.lokr_w2_b)
        return (self.lokr_w2_a @ self.lokr_w2_b).reshape(p["c"], p["d"], *k)

    def _delta_weight(self):
        w1, w2 = self.w1(), self.w2()
        w1 = w1.reshape(*w1.shape, *([1] * (w2.dim() - 2)))
        return torch.kron(w1.contiguous(), w2.contiguous()) * self.scale

    def _w2_forward(self, x):
        """x (n, d, *spatial) through w2 -> (n, c, *spatial')."""
        p, spec = self.plan, self.spec
        if spec.kind == "linear":
            if p["w2_low"]:
                return F.linear(F.linear(x, self.lokr_w2_b), self.lokr_w2_a)
            return F.linear(x, self.lokr_w2)
        ones = (1,) * len(spec.kernel)
        if not p["w2_low"]:
            return spec.op(x, self.lokr_w2)
        if p["tucker"]:
            h = spec.op(x, self.lokr_w2_b.reshape(-1, p["d"], *ones), **ONE_BY_ONE)
            h = spec.op(h, self.lokr_t2)
            return spec.op(h, self.lokr_w2_a.t().reshape(p["c"], -1, *ones), **ONE_BY_ONE)
        h = spec.op(x, self.lokr_w2_b.reshape(-1, p["d"], *spec.kernel))
        return spec.op(h, self.lokr_w2_a.reshape(p["c"], -1, *ones), **ONE_BY_ONE)

    def prefers_merged_weight(self, x):
        # a pointwise conv over many positions that conv_plus_kron does not take (a channels-last input, say): the
        # Kronecker identity would move activations through transposes, while the merged weight costs one more
        # GEMM-like pass
        return self.spec.is_conv and self.dora_scale is None and self.many_positions(x) and \
            not conv_fusable(self, x)

    def adapted_forward(self, x, *args, **kwargs):
        if self.dora_scale is None and not args and not kwargs and not self._dropouts_active():
            gain = self.scale * self.multiplier * self._scalar()
            if fusable(self, x):
                fuse = linear_plus_kron if self.many_positions(x) else linear_plus_kron_factors
                return fuse(self, x, self.w1() * gain, self.w2())
            if conv_fusable(self, x) and merged_pays(self.spec, x):
                return conv_plus_kron(self, x, self.w1() * gain, self.w2())
        return super().adapted_forward(x, *args, **kwargs)

    def delta_forward(self, x):
        p, spec = self.plan, self.spec
        a, b, c, d = p["a"], p["b"], p["c"], p["d"]
        w1 = self.w1() * self.scale
        if spec.kind == "linear":
            lead = x.shape[:-1]
            xs = x.reshape(-1, b, d)
            y = self._w2_forward(xs)  # (n, b, c)
            y = torch.matmul(w1, y)  # (n, a, c)
            return y.reshape(*lead, a * c)
        batched = x.dim() == len(spec.kernel) + 2
        xb = x if batched else x.unsqueeze(0)
        n, spatial = xb.shape[0], xb.shape[2:]
        xs = xb.reshape(n * b, d, *spatial)
        if xs.device.type == "cpu" and xs.dim() == 4 and not p["w2_low"] and \
                not isinstance(spec.conv_args.get("padding"), str):
            h = amp.apply(_ChannelsLastConv2d, xs, self.lokr_w2, spec.conv_args)
        else:
            h = self._w2_forward(xs)  # (n*b, c, *s')
        out_spatial = h.shape[2:]
        h = h.reshape(n, b, c * math.prod(out_spatial))
        y = torch.matmul(w1, h).reshape(n, a * c, *out_spatial)
        return y if batched else y.squeeze(0)

    def factor_flops(self, n):
        p, spec, r = self.plan, self.spec, self.options.dim
        a, b, c, d, kn = p["a"], p["b"], p["c"], p["d"], spec.kernel_numel
        r2 = p.get("r2", r)
        w2 = r2 * (d * kn + c) if p["w2_low"] else c * d * kn
        return n * b * w2 + n * a * b * c

    def rebuild_flops(self):
        return math.prod(self.spec.weight_shape) * 2

    def tensors(self):
        names = [n for n in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
                 if n in self._parameters]
        return {n: getattr(self, n) for n in names}

    @classmethod
    def options_from_tensors(cls, spec, sd):
        w1_low, w2_low, tucker = "lokr_w1" not in sd, "lokr_w2" not in sd, "lokr_t2" in sd
        a, b = (sd["lokr_w1_a"].shape[0], sd["lokr_w1_b"].shape[1]) if w1_low else tuple(sd["lokr_w1"].shape)
        if not w2_low:
            c, d = sd["lokr_w2"].shape[:2]
        elif tucker:
            c, d = sd["lokr_w2_a"].shape[1], sd["lokr_w2_b"].shape[1]
        else:
            c, d = sd["lokr_w2_a"].shape[0], sd["lokr_w2_b"].shape[1] // spec.kernel_numel
        if a * c != spec.out_dim or b * d != spec.in_dim:
            raise ValueError(f"LoKr factors ({a}x{b}) kron ({c}x{d}) do not make the layer's "
                             f"{spec.out_dim}x{spec.in_dim} weight")
        # dim as ComfyUI/A1111 read it: w2's rank if w2 is a product, else w1's.
        dim = sd["lokr_w2_b"].shape[0] if w2_low else (sd["lokr_w1_b"].shape[0] if w1_low else None)
        if dim is None:  # both full: the file's alpha is the dim it was made with (loaders ignore it), or inf/NaN
            saved = float(sd["alpha"]) if "alpha" in sd else 1.0  # where an fp16 file of LyCORIS' holds dim > 65504
            dim = max(1, int(saved)) if math.isfinite(saved) else 1
        alpha = float(sd["alpha"]) if "alpha" in sd and (w1_low or w2_low) else dim
        shapes = {"a": a, "b": b, "c": c, "d": d, "w1_low": w1_low, "w2_low": w2_low, "tucker": tucker,
                  "r1": sd["lokr_w1_b"].shape[0] if w1_low else dim, "r2": dim}
        return {"dim": dim, "alpha": alpha, "use_tucker": tucker, "shapes": shapes}
