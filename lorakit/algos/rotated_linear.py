"""y = rotate(x W^T) + b for a frozen nn.Linear whose output channels are turned, block by block, by
M = (1 - m) I + m R with R = (I + Q)(I - Q)^-1 the Cayley transform of a skew-symmetric Q (Diag-OFT).

On a short call (few positions) the rotation's fixed cost is what shows: each small op costs 5-20 us against a
layer of ~1 ms. Here the layer's GEMM, the Cayley transform and the rotation are one autograd function:
- one batched inverse and no solve: R = 2 (I - Q)^-1 - I, so M = 2m (I - Q)^-1 + (1 - 2m) I, and backward reuses
  the inverse (dM = 2m A dQ A with A = (I - Q)^-1);
- Q built from the trained blocks inside (Q = B - B^T, dB = dQ - dQ^T), not as autograd nodes of its own;
- the bias added by the rotation's product, the layer's GEMM run without it.
Linear 768->320 on 154 positions, Diag-OFT blocks of 16 (in-process, min of interleaved rounds): 1.53-1.60x the
frozen layer through separate ops, 1.32-1.39x with this.
"""

from __future__ import annotations

import torch

from . import amp
from .fused_linear import gemm_linear
from .oft_base import solve_dtype


class _RotatedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, skew, m, from_blocks):
        n, b, _ = skew.shape
        work = skew.to(solve_dtype(skew))  # half-precision blocks are inverted in float32
        eye = torch.eye(b, dtype=work.dtype, device=skew.device)
        i_minus_q = (eye - work).add_(work.mT) if from_blocks else eye - work
        inv = torch.linalg.inv_ex(i_minus_q)[0]  # I - Q is never singular: its eigenvalues are 1 - i lambda
        # op[k, i, j] takes channel i to channel j
        op = torch.add(eye * (1 - 2 * m), inv, alpha=2 * m).to(skew.dtype)
        x2 = x.reshape(-1, x.shape[-1])
        y0 = gemm_linear(x2, weight, None)
        v = y0.view(-1, n, b).transpose(0, 1)  # blocks x positions x block: a strided view, no copy
        out = torch.bmm(v, op) if bias is None else torch.baddbmm(bias.view(n, 1, b), v, op)
        ctx.save_for_backward(y0, weight, inv, op)
        ctx.m, ctx.from_blocks, ctx.x_shape = m, from_blocks, x.shape
        return out.transpose(0, 1).reshape(*x.shape[:-1], n * b)

    @staticmethod
    def backward(ctx, g):
        y0, weight, inv, op = ctx.saved_tensors
        n, b, _ = op.shape
        gv = g.reshape(-1, n, b).transpose(0, 1)
        grad_x = grad_skew = None
        if ctx.needs_input_grad[0]:
            g0 = torch.bmm(gv, op.mT).transpose(0, 1).reshape(-1, n * b)
            grad_x = (g0 @ weight).view(ctx.x_shape)
        if ctx.needs_input_grad[3]:
            grad_op = torch.bmm(y0.view(-1, n, b).transpose(0, 1).mT, gv)
            inv_t = inv.mT
            grad_skew = torch.bmm(torch.bmm(inv_t, grad_op.to(inv.dtype)), inv_t).mul_(2 * ctx.m)
            if ctx.from_blocks:
                grad_skew = grad_skew - grad_skew.mT
            grad_skew = grad_skew.to(op.dtype)
        return grad_x, None, None, grad_skew, None, None


def linear_rotated(adapter, x: torch.Tensor, skew: torch.Tensor, multiplier: float,
                   from_blocks: bool) -> torch.Tensor:
    """The adapter's frozen Linear with its output rotated: `skew` is Q itself, or the trained blocks B with
    Q = B - B^T when from_blocks (unconstrained: no norm clamp between B and Q)."""
    layer = adapter.layer
    return amp.apply(_RotatedLinear, x, layer.weight, layer.bias, skew, float(multiplier), from_blocks)
