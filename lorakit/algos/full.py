"""Full (native) fine-tuning: the whole weight change `diff` (and bias change `diff_b`) is trained.

rank_dropout is LyCORIS': in training each call draws one keep mask over the output channels and applies it to the
rows of diff and to diff_b, so every sample of the call sees the same masked weight (W + m diff diag-masked)."""

from __future__ import annotations

import torch
import torch.nn as nn

from . import amp
from .base import Adapter
from .fused_conv import conv_backward


def _changed_bias(bias, diff_b, m: float, rows=None):
    """b + m diff_b, diff_b masked by `rows` where given (None where neither exists)."""
    if diff_b is None:
        return bias
    if rows is not None:
        diff_b = diff_b * rows
    return diff_b * m if bias is None else torch.add(bias, diff_b, alpha=m)


def _per_row(rows, t):
    """The output-channel mask `rows` shaped to scale the rows of a weight-shaped `t`."""
    return rows.view(-1, *(1,) * (t.dim() - 1))


def _changed_weight(weight, diff, m: float, rows=None):
    """W + m diff, diff's rows (output channels) masked by `rows` where given."""
    if rows is None:
        return torch.add(weight, diff, alpha=m)
    return torch.addcmul(weight, diff, _per_row(rows, diff), value=m)


class _MergedFull(torch.autograd.Function):
    """op(x, W + m diff, b + m diff_b) that keeps x, W and diff for backward, not the merged weight: autograd
    through plain ops would keep W + m diff (under autocast, its half-precision cast) from forward to backward,
    one more copy of every trained weight while a step runs. Backward rebuilds it (one add) for the input
    gradient. Under autocast only x comes in cast; the weight is summed in its own dtype and then cast, as autocast
    casts the plain ops' sum."""

    @staticmethod
    def forward(ctx, x, weight, bias, diff, diff_b, rows, m: float, spec):
        w = _changed_weight(weight, diff, m, rows).to(x.dtype)
        bias = _changed_bias(bias, diff_b, m, rows)
        y = spec.op(x, w, None if bias is None else bias.to(x.dtype))
        ctx.save_for_backward(x, weight, diff, rows)
        ctx.m, ctx.spec = m, spec
        return y

    @staticmethod
    def backward(ctx, g):
        x, weight, diff, rows = ctx.saved_tensors
        m, spec = ctx.m, ctx.spec
        need_x, need_diff, need_db = ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        w = _changed_weight(weight, diff, m, rows).to(g.dtype) if need_x else None
        gx = gw = gdb = None
        if spec.kind == "linear":
            if need_x:
                gx = g @ w
            if need_diff:
                g2, x2 = g.reshape(-1, g.shape[-1]).t(), x.reshape(-1, x.shape[-1])
                # the rebuilt weight is done with: its memory takes the weight's gradient (one allocation less)
                gw = torch.mm(g2, x2, out=w) if w is not None and w.dtype == diff.dtype else g2 @ x2
            channel = -1
        else:
            unbatched = x.dim() == len(spec.kernel) + 1
            xb, gb = (x.unsqueeze(0), g.unsqueeze(0)) if unbatched else (x, g)
            gx, gw = conv_backward(spec.conv_args, gb, xb, w if w is not None else weight.to(g.dtype),
                                   (need_x, need_diff))
            if gx is not None and unbatched:
                gx = gx.squeeze(0)
            channel = 0 if unbatched else 1
        if gw is not None:
            gw = (gw.mul_(m) if m != 1.0 else gw).to(diff.dtype)
            if rows is not None:
                gw.mul_(_per_row(rows, gw))
        if need_db:
            gdb = g.sum(dim=[d for d in range(g.dim()) if d != channel % g.dim()])
            gdb = gdb.mul_(m) if m != 1.0 else gdb
            if rows is not None:
                gdb = gdb * rows
        return gx, None, None, gw, gdb, None, None, None


class Full(Adapter):
    name = "full"
    aliases = ("native",)
    keys = ("diff", "diff_b")
    detect_keys = ("diff",)
    optional_keys = ("diff_b",)  # written only where the bias changed (extract, kohya); the UIs read none as zero
    saves_alpha = False
    accepts = frozenset({"rank_dropout", "rank_dropout_scale"})

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

    def _dropouts_active(self):
        return False  # rank_dropout masks rows of W + m diff itself (_row_mask), which every path applies

    def _row_mask(self):
        """In training with rank_dropout, this call's keep mask over the output channels (LyCORIS draws one per call,
        torch.rand(out channels), and so does this: the same seed gives the same mask); else None."""
        p = self.options.rank_dropout
        if not (self.training and p):
            return None
        return self.keep_mask(1, self.spec.out_dim, p, self.diff)[0]

    def merged_weight_forward(self, x):
        # W + m diff, rebuilt in backward rather than kept (_MergedFull). Plain ops cost less per call on a single
        # layer (in-process A/B, 15 rounds, AMD EPYC with AVX-512: Linear 768->320 on 154 positions 1.10-1.13x,
        # Linear 1280 1.04-1.09x, Linear 320 on 8192 positions 0.96x, the k1 conv 1.01x of the plain ops' step)
        # but keep that sum, one more copy of every trained weight, until backward. An SD1.5 U-Net trained in full
        # (fp32, 32x32 latents, peak memory of a step over the memory before it, two or three runs each): every
        # layer (859M parameters) 4762-4841 -> 3873-3903 MiB, steps 9.9-11.2 against 8.4-11.6 s; attn-mlp (267M)
        # 1878-1925 -> 1615-1635 MiB, steps 3.9-5.1 against 4.2-6.0 s (the backward's add). On a GPU the adds are
        # a small share of a step, and under autocast plain ops would keep the sum's half-precision cast.
        layer, spec, m, rows = self.layer, self.spec, self.multiplier, self._row_mask()
        if isinstance(spec.conv_args.get("padding"), str):  # an uneven 'same': torch's conv gradients take numbers
            return spec.op(x, _changed_weight(layer.weight, self.diff, m, rows),
                           _changed_bias(layer.bias, self.diff_b, m, rows))
        return amp.apply(_MergedFull, x, layer.weight, layer.bias, self.diff, self.diff_b, rows, float(m), spec,
                         cast=(0,))

    def factor_flops(self, n):
        return 0.0  # dW is the parameter itself: nothing to rebuild

    def adapted_forward(self, x, *args, **kwargs):
        """The layer's own output plus op(x, diff) + diff_b, masked as merged_weight_forward masks them."""
        y = self._org_forward(x, *args, **kwargs)
        rows, diff = self._row_mask(), self.diff
        if rows is not None:
            diff = diff * _per_row(rows, diff)
        d = self.spec.op(x.to(self.dtype), diff, _changed_bias(None, self.diff_b, 1.0, rows))
        return y + (d * self.multiplier).to(y.dtype)

    def delta_bias(self, multiplier=1.0):
        return None if self.diff_b is None else self.diff_b * multiplier

    def tensors(self):
        return {"diff": self.diff} | ({"diff_b": self.diff_b} if self.diff_b is not None else {})

    @classmethod
    def options_from_tensors(cls, spec, sd):
        return {}
