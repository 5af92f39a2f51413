"""op(x, dW) for a dW rebuilt from factors, without keeping dW for backward.

Autograd would save the rebuilt dW (a tensor the size of the layer weight) to compute the input gradient. Here
backward rebuilds it from the factors instead: one more cheap rebuild, no weight-sized memory between passes.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch.nn import grad as nn_grad

from . import amp
from .layer import LayerSpec

_CONV_GRADS = {
    1: (nn_grad.conv1d_input, nn_grad.conv1d_weight),
    2: (nn_grad.conv2d_input, nn_grad.conv2d_weight),
    3: (nn_grad.conv3d_input, nn_grad.conv3d_weight),
}


class _RebuiltWeightOp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, spec: LayerSpec, rebuild: Callable[[], torch.Tensor], bias, x: torch.Tensor, *params):
        with torch.no_grad():
            w = rebuild()
        ctx.spec, ctx.rebuild = spec, rebuild
        ctx.save_for_backward(x, *params)
        return spec.op(x, w.to(x.dtype), bias)  # x's dtype: autocast's, where the caller applied it

    @staticmethod
    def backward(ctx, gy):
        x, *params = ctx.saved_tensors
        spec = ctx.spec
        with torch.enable_grad():
            w = ctx.rebuild()
        gx = None
        if spec.kind == "linear":
            if ctx.needs_input_grad[3]:
                gx = gy @ w.detach().to(gy.dtype)
            gw = gy.reshape(-1, gy.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
        else:
            grad_input, grad_weight = _CONV_GRADS[len(spec.kernel)]
            unbatched = x.dim() == len(spec.kernel) + 1
            xb, gyb = (x.unsqueeze(0), gy.unsqueeze(0)) if unbatched else (x, gy)
            args = spec.conv_args
            if ctx.needs_input_grad[3]:
                gx = grad_input(xb.shape, w.detach().to(gyb.dtype), gyb, **args)
                gx = gx.squeeze(0) if unbatched else gx
            gw = grad_weight(xb, w.shape, gyb, **args)
        gb = None
        if ctx.needs_input_grad[2]:  # a trained bias change passed in with the bias
            channel = -1 if spec.kind == "linear" else (0 if gy.dim() == len(spec.kernel) + 1 else 1)
            gb = gy.sum(dim=[d for d in range(gy.dim()) if d != channel % gy.dim()])
        wanted = [p for p, need in zip(params, ctx.needs_input_grad[4:]) if need]
        grads = iter(torch.autograd.grad(w, wanted, gw.to(w.dtype), allow_unused=True) if wanted else ())
        return (None, None, gb, gx, *[next(grads) if need else None for need in ctx.needs_input_grad[4:]])


def rebuilt_weight_op(spec: LayerSpec, x: torch.Tensor, rebuild: Callable[[], torch.Tensor],
                      params: Sequence[torch.Tensor], bias: torch.Tensor | None = None) -> torch.Tensor:
    """spec.op(x, rebuild(), bias) with gradients for x, bias and the parameters `rebuild` reads."""
    if not torch.is_grad_enabled() or not (x.requires_grad or any(p.requires_grad for p in params)):
        return spec.op(x, rebuild(), bias)
    if isinstance(spec.conv_args.get("padding"), str):  # an uneven 'same': torch's conv gradients take numbers only
        return spec.op(x, rebuild().to(x.dtype), bias)
    # under autocast only the bias and x are cast: rebuild() reads the parameters itself, so casts of them would
    # be cut off from the rebuilt weight
    return amp.apply(_RebuiltWeightOp, spec, rebuild, bias, x, *params, cast=(2, 3))
