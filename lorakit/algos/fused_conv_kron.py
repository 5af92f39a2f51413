"""y = conv(x, W + kron(w1, w2)) + b for a frozen Conv1d/2d/3d and LoKr's factors (w1 (a, b), w2 (c, d, *kernel)):
the conv counterpart of fused_linear._LinearPlusKron, with the factors' gradients from the Kronecker identity.

The layer runs once each way with the merged weight (rebuilt in backward, not kept). With the channels split as
(a, c) out and (b, d) in, and x, g viewed as (n b, d, *s) and (n a, c, *s'):
- grad w2 is the weight gradient of a d -> c convolution with input x and output gradient w1^T g (mixed over a),
- grad w1[o, i] = <g[:, o], conv(x, w2)[:, i]>, with conv(x, w2) recomputed.
Against the identity used on both passes (conv(x, w2) mixed by w1 and added to the layer's output), that drops
w2's input-gradient convolution, the forward's mix and the two adds over activations. Conv2d 320 k3 on
(2, 320, 64, 64), LoKr factor -1 (w1 16x16, w2 20x20x3x3), in-process A/B: see docs/algorithms.md.

On a CPU a 2d conv with this few channels runs far faster channels-last, so x and g are converted once and every
activation-sized product is taken in that layout (as lokr._ChannelsLastConv2d does for the identity).
"""

from __future__ import annotations

import torch

from . import amp
from .fused_conv import conv_input_grad, conv_op, conv_weight_grad


class _ConvPlusKron(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, w1, w2, spec):
        y = conv_op(spec, x, _merged(weight, w1, w2), bias)
        ctx.save_for_backward(x, weight, w1, w2)
        ctx.spec = spec
        return y

    @staticmethod
    def backward(ctx, g):
        x, weight, w1, w2 = ctx.saved_tensors
        spec = ctx.spec
        (a, b), (c, d) = w1.shape, w2.shape[:2]
        n = x.shape[0]
        g = g.contiguous()
        grad_x = grad_w1 = grad_w2 = None
        if ctx.needs_input_grad[0]:
            grad_x = conv_input_grad(spec, g, x, _merged(weight, w1, w2))
        if not (ctx.needs_input_grad[3] or ctx.needs_input_grad[4]):
            return grad_x, None, None, None, None, None
        layout = _Layout(x, spec)
        xs = layout.convert(x.view(n * b, d, *x.shape[2:]))
        gs = layout.convert(g.view(n * a, c, *g.shape[2:]))
        g_flat = layout.flat(gs, n, a)  # (n, a, c * positions) in the working layout
        if ctx.needs_input_grad[4]:
            gm = layout.unflat(torch.bmm(w1.t().expand(n, b, a), g_flat), gs.shape[1:])  # w1^T g: (n b, c, *s')
            grad_w2 = conv_weight_grad(spec, gm, xs, w2)
        if ctx.needs_input_grad[3]:
            z = layout.flat(layout.convert(conv_op(spec, xs, w2)), n, b)  # conv(x, w2): (n, b, c * positions)
            grad_w1 = torch.bmm(g_flat, z.transpose(1, 2)).sum(0)
        return grad_x, None, None, grad_w1, grad_w2, None


def _merged(weight, w1, w2):
    """W + kron(w1, w2), w1 broadcast over the kernel axes."""
    return weight + torch.kron(w1.reshape(*w1.shape, *([1] * (w2.dim() - 2))), w2)


class _Layout:
    """Channels-last for a 2d conv with a kernel on a CPU, else the tensors as they are (contiguous; a pointwise
    conv's products are batched GEMMs on the (n, channels, positions) view)."""

    def __init__(self, x: torch.Tensor, spec):
        self.channels_last = x.device.type == "cpu" and x.dim() == 4 and not spec.is_pointwise

    def convert(self, t: torch.Tensor) -> torch.Tensor:
        return t.contiguous(memory_format=torch.channels_last) if self.channels_last else t.contiguous()

    def flat(self, t: torch.Tensor, n: int, groups: int) -> torch.Tensor:
        """(n groups, C, *s) in this layout -> (n, groups, C * positions), a view whose last axis runs in memory
        order (positions x channels when channels-last)."""
        return (t.permute(0, 2, 3, 1) if self.channels_last else t).reshape(n, groups, -1)

    def unflat(self, f: torch.Tensor, shape) -> torch.Tensor:
        """flat's inverse: (n, groups, C * positions) -> (n groups, C, *s), a view in this layout."""
        c, spatial = shape[0], tuple(shape[1:])
        if self.channels_last:
            return f.reshape(-1, *spatial, c).permute(0, 3, 1, 2)
        return f.reshape(-1, c, *spatial)


def conv_plus_kron(adapter, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """The adapter's frozen conv with W + kron(w1, w2) (w1 carrying the gain), in one pass each way."""
    layer = adapter.layer
    return amp.apply(_ConvPlusKron, x, layer.weight, layer.bias, w1, w2.contiguous(), adapter.spec)
