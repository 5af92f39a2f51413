"""GLoRA on a frozen nn.Linear in one autograd function:
y = (x + k (x a2^T) a1^T) W^T + b + k (x b2^T) b1^T, i.e. the layer with dW = k (W a1 a2 + b1 b2).

Through separate ops the two chains cost an input-sized add (x + a1 a2 x), an output-sized add (+ b1 b2 x), the
same two adds again in backward and an autograd node per product. Here the down projections a2 and b2 run as one
thin product on x, the a-chain is accumulated into the layer's input (addmm), the b-chain into its output
(addmm_), and backward does the same with the input gradient; x + k a1 a2 x is not kept.
"""

from __future__ import annotations

import torch

from . import amp
from .fused_linear import gemm_linear, thin_t_wide, times_tall


class _LinearGLoRA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, a1, a2, b1, b2, k):
        x2 = x.reshape(-1, x.shape[-1])
        r = a2.shape[0]
        downs = torch.cat((a2, b2))  # (2r, in): both down projections in one product
        h = x2 @ downs.t()
        shifted = torch.addmm(x2, h[:, :r], a1.t(), alpha=k)  # x + k (x a2^T) a1^T
        y = gemm_linear(shifted, weight, bias)
        y.addmm_(h[:, r:], b1.t(), alpha=k)
        ctx.save_for_backward(x2, weight, a1, b1, downs, h)
        ctx.k, ctx.x_shape = k, x.shape
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, g):
        x2, weight, a1, b1, downs, h = ctx.saved_tensors
        k, r = ctx.k, a1.shape[1]
        g2 = g.reshape(-1, g.shape[-1])
        g_shifted = g2 @ weight  # the gradient of the layer's input x + k a1 a2 x
        # the gradient of h = x [a2; b2]^T: k (g_shifted a1) and k (g b1), side by side
        gh = torch.cat((times_tall(g_shifted, a1), times_tall(g2, b1)), dim=1).mul_(k)
        grad_x = grad_a1 = grad_b1 = grad_downs = None
        if ctx.needs_input_grad[3]:
            grad_a1 = thin_t_wide(h[:, :r], g_shifted).t().mul_(k)
        if ctx.needs_input_grad[5]:
            grad_b1 = thin_t_wide(h[:, r:], g2).t().mul_(k)
        if ctx.needs_input_grad[4] or ctx.needs_input_grad[6]:
            grad_downs = thin_t_wide(gh, x2)
        if ctx.needs_input_grad[0]:
            grad_x = g_shifted.addmm_(gh, downs).view(ctx.x_shape)
        grad_a2, grad_b2 = (grad_downs[:r], grad_downs[r:]) if grad_downs is not None else (None, None)
        return grad_x, None, None, grad_a1, grad_a2, grad_b1, grad_b2, None


def linear_glora(adapter, x: torch.Tensor, a1, a2, b1, b2, k: float) -> torch.Tensor:
    """The adapter's frozen Linear with GLoRA's two chains fused in (k: multiplier x scale)."""
    layer = adapter.layer
    return amp.apply(_LinearGLoRA, x, layer.weight, layer.bias, a1, a2, b1, b2, float(k))
