"""y = x W^T + b + x kron(w1, w2)^T for a frozen nn.Linear on a short call, through the factors in one function.

With x seen as (n, b, d) per position, kron(w1, w2) x = w1 (x w2^T): two small GEMMs, never the (out x in)
product. Through autograd the same costs a batched matmul per side, each with transposed copies, an added output
and an added input gradient; here the change is added into the layer's output and its input gradient in place
(LoKr 16x24 kron 20x32 on Linear 768->320, 154 positions, in-process A/B, min of 20 rounds: 1.62 -> 1.50x the
frozen layer; 32x32 kron (40x16)(16x40) on Linear 1280, 512 positions: 1.32 -> 1.23).
w1's products run per position as batched products with w1 broadcast (w1 T_n into the output's (a, c) view, w1^T
G_n), in the layouts the tensors already have: no transposed copy of an activation-sized tensor. On the Intel
Xeon, where such copies cost more than the products, that took Linear 1280 from 1.45 to 1.30x the frozen layer
(in-process A/B, 12 rounds, pairwise median 0.89x the step; Linear 768->320 0.98x).
Shapes: w1 (a, b), w2 (c, d), out = a c, in = b d; x_n (b, d), T_n = x_n w2^T (b, c), G_n (a, c) per position.
"""

from __future__ import annotations

import torch

from . import amp
from .fused_linear import gemm_linear


class _LinearPlusKronFactors(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, w1, w2):
        (a, b), (c, d) = w1.shape, w2.shape
        x2 = x.reshape(-1, b * d).contiguous()  # rows split into (b, d) below; a permuted input is copied once
        n = x2.shape[0]
        t = (x2.view(n * b, d) @ w2.t()).view(n, b, c)  # X_n w2^T per position
        y = gemm_linear(x2, weight, bias)
        y.view(n, a, c).baddbmm_(w1.expand(n, a, b), t)  # + w1 (X_n w2^T)
        ctx.save_for_backward(x2, weight, w1, w2, t)
        ctx.x_shape = x.shape
        return y.view(*x.shape[:-1], a * c)

    @staticmethod
    def backward(ctx, g):
        x2, weight, w1, w2, t = ctx.saved_tensors
        (a, b), (c, d) = w1.shape, w2.shape
        n = x2.shape[0]
        g3 = g.reshape(n, a, c)
        grad_x = grad_w1 = grad_w2 = None
        if ctx.needs_input_grad[3]:
            grad_w1 = torch.bmm(g3, t.mT).sum(0)
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[4]:
            u = torch.bmm(w1.t().expand(n, b, a), g3)  # w1^T G_n: (n, b, c)
            if ctx.needs_input_grad[4]:
                grad_w2 = u.view(n * b, c).t() @ x2.view(n * b, d)
            if ctx.needs_input_grad[0]:
                grad_x2 = g.reshape(n, a * c) @ weight
                grad_x2.view(n * b, d).addmm_(u.view(n * b, c), w2)
                grad_x = grad_x2.view(ctx.x_shape)
        return grad_x, None, None, grad_w1, grad_w2


def linear_plus_kron_factors(adapter, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """The adapter's frozen Linear plus kron(w1, w2) applied through the factors (w1 with the gain in it)."""
    layer = adapter.layer
    return amp.apply(_LinearPlusKronFactors, x, layer.weight, layer.bias, w1, w2)
