"""y = T (x W^T) + b for a frozen nn.Linear whose output channels BOFT's butterfly stages turn, as one autograd
function for a call with few positions (on many, the stages turn the weight instead).

Through separate ops the rotation of the output costs several activation-sized passes besides the stages (the bias
taken off and put back, the change T z - z, its scale, the sum), each again in backward. Here the layer's GEMM
writes its output channels-first (W x^T), the layout the stages gather rows of, and the bias is added by the last
stage's product: one pass beyond the stages' own each way, the transposition to the positions-first output (and of
its gradient).
"""

from __future__ import annotations

import torch

from . import amp
from .butterfly import stages_backward, stages_forward
from .butterfly_groups import composed_stages


class _ButterflyLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, r, keep, orders, inverses):
        # r: the stages' blocks (or groups of stages composed), the multiplier and rescale folded into the last;
        # keep: the share of the unrotated output kept (1 - m), 0 at m = 1
        _, count, b, _ = r.shape
        x2 = x.reshape(-1, x.shape[-1])
        z = torch.mm(weight, x2.t())  # (channels, positions)
        last_add = None if bias is None else bias.index_select(0, inverses[-1]).view(count, b, 1)
        last, inputs = stages_forward(z, r, orders, last_add)
        # the last gather, then positions first: a gather of rows and one transposed copy cost a third of a
        # gather of the transposed rows' columns (Linear 1280, 512 positions: 0.8 against 2.5 ms)
        rows = torch.index_select(last, 0, orders[-1], out=torch.empty_like(z) if keep else z)
        out = rows.t().contiguous()
        if keep:
            out.add_(z.t(), alpha=keep)
        ctx.save_for_backward(weight, r, inputs)
        ctx.keep, ctx.inverses, ctx.x_shape = keep, inverses, x.shape
        return out.view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, g):
        weight, r, inputs = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])
        gl = torch.index_select(g2.t(), 0, ctx.inverses[-1])
        gz, grad_r = stages_backward(gl, r, inputs, ctx.inverses, ctx.needs_input_grad[3], ctx.needs_input_grad[0])
        grad_x = None
        if ctx.needs_input_grad[0]:
            if ctx.keep:
                gz.add_(g2.t(), alpha=ctx.keep)
            grad_x = torch.mm(gz.t(), weight).view(ctx.x_shape)
        return grad_x, None, None, grad_r, None, None, None


def linear_butterfly(adapter, x: torch.Tensor, r: torch.Tensor, multiplier: float,
                     scale: torch.Tensor | None) -> torch.Tensor:
    """The adapter's frozen Linear with its output turned by the stages r (each already m R + (1 - m) I) and
    scaled per output channel by `scale` (rescale, or None): (1 - m) z + m scale T z + b for z = x W^T."""
    layer = adapter.layer
    r, orders, inverses = composed_stages(r, x.numel() // x.shape[-1])
    if multiplier != 1 or scale is not None:
        _, count, b, _ = r.shape
        rows = torch.full((count * b,), float(multiplier), dtype=r.dtype, device=r.device)
        if scale is not None:
            rows = rows * scale.reshape(-1).to(r.dtype)
        last = r[-1] * rows.index_select(0, inverses[-1]).view(count, b, 1)
        r = torch.cat([r[:-1], last[None]])
    return amp.apply(_ButterflyLinear, x, layer.weight, layer.bias, r, 1.0 - float(multiplier), orders, inverses)
