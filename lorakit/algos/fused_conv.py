"""y = conv(x, W) + b + U conv(x, D) for a frozen Conv1d/2d/3d and a low-rank pair (D: rank x in x kernel, U: out x
rank, applied pointwise): the convolution counterpart of fused_linear._LinearPlusLowRank.

Autograd through the plain ops runs the pointwise up product as a second convolution, then adds its output to the
layer's and the two input gradients together, each an extra pass over an activation-sized tensor. Here the up
product is one batched GEMM accumulated in place into the layer's output, in the channel-first layout the conv
writes, and its gradient is a GEMM on the output gradient as it is.

A 1x1 convolution with unit stride and no padding (SD1.x's proj_in/proj_out) is a GEMM over positions, and there
every product, the layer's own included, is a batched GEMM on the (n, channels, positions) view: oneDNN runs the
320 -> 16 down conv far below GEMM speed, and its 1x1 convs vary with what ran before them. Conv2d 320 k1 on
(2, 320, 64, 64), LoRA rank 16 (in-process A/B, min of 40 rounds): the plain ops 1.43-1.63x the frozen conv, this
1.20-1.38x; the layer kept on oneDNN with only the low-rank part as GEMMs, 1.21-1.54x.
"""

from __future__ import annotations

import torch

from . import amp
from .fused_linear import output_scale_grad, plain_frozen_layer, times_gain
from .layer import positions


class _ConvPlusLowRank(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, down, up, gain, spec):
        y = conv_op(spec, x, weight, bias)
        h = _flat(conv_op(spec, x, down))
        _flat(y).baddbmm_(_batched(up, x.shape[0]), h, alpha=gain)
        ctx.save_for_backward(x, weight, down, up, h)
        ctx.spec, ctx.gain = spec, gain
        return y

    @staticmethod
    def backward(ctx, g):
        x, weight, down, up, h = ctx.saved_tensors
        n, rank, spec = x.shape[0], down.shape[0], ctx.spec
        g = g.contiguous()
        g3 = _flat(g)
        gh = torch.bmm(_batched(times_gain(up, ctx.gain).t(), n), g3)
        need_x, need_down = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
        grad_x = grad_down = grad_up = None
        if need_x:
            grad_x = conv_input_grad(spec, g, x, weight)
        if spec.is_pointwise:  # D's input gradient accumulated in place into the layer's
            if need_x:
                _flat(grad_x).baddbmm_(_batched(down.reshape(rank, -1).t(), n), gh)
            if need_down:
                grad_down = conv_weight_grad(spec, gh, x, down)
        elif need_x or need_down:  # D's two gradients from one convolution backward
            gx_down, grad_down = conv_backward(spec.conv_args, gh.view(n, rank, *g.shape[2:]), x, down,
                                               (need_x, need_down))
            if need_x:
                grad_x += gx_down
        if ctx.needs_input_grad[4]:
            grad_up = times_gain(torch.bmm(g3, h.transpose(1, 2)).sum(0), ctx.gain, in_place=True)
        return grad_x, None, None, grad_down, grad_up, None, None


class _ConvMergedLowRank(torch.autograd.Function):
    """A conv with W + gain U D on a call with many positions: the layer runs once each way with the merged weight
    (rebuilt in backward, not kept), and the factors' gradients are D's weight gradient against U^T g and U's
    against h = conv(x, D), recomputed. Against _ConvPlusLowRank that drops D's input-gradient convolution and the
    passes adding the pair's output and input gradient to the layer's. A pointwise conv runs every product as a
    batched GEMM on the (n, channels, positions) view, as _ConvPlusLowRank does; Conv2d 320 k3 on
    (2, 320, 64, 64), LoRA rank 16 (in-process A/B, min of 12 rounds): 1.12x -> 1.08x the frozen conv."""

    @staticmethod
    def forward(ctx, x, weight, bias, down, up, out_scale, gain, spec):
        y = conv_op(spec, x, _merged(weight, down, up, gain, out_scale), bias)
        ctx.save_for_backward(x, weight, bias if out_scale is not None else None, down, up, out_scale,
                              y if out_scale is not None else None)
        ctx.gain, ctx.spec = gain, spec
        return y

    @staticmethod
    def backward(ctx, g):
        x, weight, bias, down, up, out_scale, y = ctx.saved_tensors
        n, gain, spec = x.shape[0], ctx.gain, ctx.spec
        g = g.contiguous()
        grad_x = grad_down = grad_up = grad_out = None
        if ctx.needs_input_grad[0]:
            grad_x = conv_input_grad(spec, g, x, _merged(weight, down, up, gain, out_scale))
        if out_scale is not None:  # r's gradient read off the output; the factors see g diag(r)
            if ctx.needs_input_grad[5]:
                grad_out = output_scale_grad(g, y, bias, channel=1) / out_scale
            up = up * out_scale[:, None]
        if ctx.needs_input_grad[3]:
            gh = torch.bmm(_batched(times_gain(up, gain).t(), n), _flat(g))
            grad_down = conv_weight_grad(spec, gh.view(n, -1, *g.shape[2:]), x, down)
        if ctx.needs_input_grad[4]:
            h = _flat(conv_op(spec, x, down))
            grad_up = times_gain(torch.bmm(_flat(g), h.transpose(1, 2)).sum(0), gain, in_place=True)
            if out_scale is not None:
                grad_up *= out_scale[:, None]
        return grad_x, None, None, grad_down, grad_up, grad_out, None, None


def _merged(weight, down, up, gain, out_scale=None):
    """W + gain U D in the weight's shape (down (rank, in, *kernel), up (out, rank)), rows scaled by out_scale."""
    merged = torch.addmm(weight.view(weight.shape[0], -1), up, down.view(down.shape[0], -1), alpha=gain)
    return (merged if out_scale is None else merged.mul_(out_scale[:, None])).view(weight.shape)


def _flat(t: torch.Tensor) -> torch.Tensor:
    """(n, channels, *spatial) -> (n, channels, positions), a view."""
    return t.view(t.shape[0], t.shape[1], -1)


def _batched(m: torch.Tensor, n: int) -> torch.Tensor:
    return m.expand(n, *m.shape)


def conv_op(spec, x, weight, bias=None):
    """The layer's convolution of x with this weight; a pointwise conv as batched GEMMs over positions."""
    if spec.is_pointwise:
        y = torch.bmm(_batched(weight.reshape(weight.shape[0], -1), x.shape[0]), _flat(x))
        if bias is not None:
            y += bias[:, None]
        return y.view(x.shape[0], -1, *x.shape[2:])
    return spec.op(x, weight, bias)


def conv_input_grad(spec, g, x, weight):
    """conv_op's gradient for x, given the output gradient g."""
    if spec.is_pointwise:
        return torch.bmm(_batched(weight.reshape(weight.shape[0], -1).t(), x.shape[0]), _flat(g)).view(x.shape)
    return conv_backward(spec.conv_args, g, x, weight, (True, False))[0]


def conv_weight_grad(spec, g, x, weight):
    """conv_op's gradient for the weight, summed over the batch."""
    if spec.is_pointwise:
        return torch.bmm(_flat(g), _flat(x).transpose(1, 2)).sum(0).view(weight.shape)
    return conv_backward(spec.conv_args, g, x, weight, (False, True))[1]


def conv_backward(conv_args: dict, g, x, weight, mask):
    """(input gradient, weight gradient) of a convolution with these stride/padding/dilation (numeric padding),
    each only where mask asks for it."""
    a = conv_args
    gx, gw, _ = torch.ops.aten.convolution_backward(
        g, x, weight, None, a["stride"], a["padding"], a["dilation"], False, (0,) * len(a["stride"]), 1,
        (*mask, False))
    return gx, gw


def conv_fusable(adapter, x: torch.Tensor) -> bool:
    """A plain frozen convolution on a batched input with numeric padding (convolution_backward takes no 'same'),
    input and weight contiguous (a channels-last model keeps its layout through the plain ops)."""
    spec = adapter.spec
    return spec.is_conv and x.dim() == len(spec.kernel) + 2 and x.is_contiguous() and \
        adapter.layer.weight.is_contiguous() and not isinstance(spec.conv_args.get("padding"), str) and \
        plain_frozen_layer(adapter, x)


def conv_plus_low_rank(adapter, x: torch.Tensor, down: torch.Tensor, up: torch.Tensor,
                       gain: float = 1.0, out_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The adapter's frozen conv plus gain * up @ conv(x, down); down (rank, in, *kernel) or flat, up (out, rank,
    [1..]). With out_scale r (per output channel, DoRA along rows, every r away from 0; calls where merged_pays
    only) the sum is scaled by r before the bias: r (conv(x, W + gain U D)) + b, one convolution each way."""
    layer, spec = adapter.layer, adapter.spec
    rank = down.shape[0]
    down, up = down.reshape(rank, spec.in_dim, *spec.kernel), up.reshape(spec.out_dim, rank)
    if out_scale is not None or merged_pays(spec, x):
        return amp.apply(_ConvMergedLowRank, x, layer.weight, layer.bias, down.contiguous(), up, out_scale, float(gain),
                                        spec)
    return amp.apply(_ConvPlusLowRank, x, layer.weight, layer.bias, down, up, float(gain), spec)


def merged_pays(spec, x: torch.Tensor) -> bool:
    """Whether rebuilding W + U D twice (2 out fan_in rank multiply-adds) costs less than what the merged pass saves
    against the pair added apart: D's input gradient and U's product (positions (fan_in + out) rank), with a
    factor 2 of margin for the small convolutions' lower speed not counted. LoKr's merged conv
    (fused_conv_kron), whose rebuild is one elementwise pass, takes the same rule."""
    return positions(spec, x) * (spec.fan_in + spec.out_dim) >= 4 * spec.out_dim * spec.fan_in
