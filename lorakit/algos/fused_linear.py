"""y = x W^T + b + (x D^T) U^T for a frozen nn.Linear and a low-rank pair (D: rank x in, U: out x rank).

Autograd through the plain ops makes two extra passes over activation-sized tensors: adding the adapter's
output to the layer's, and adding the two input gradients. Here the low-rank product is accumulated into the
layer's output (addmm_) and into the layer's input gradient, so the adapter costs only its two thin products each
way. Used by LoRA, DyLoRA and LoHa (its Khatri-Rao form is a rank-dim^2 pair).
"""

from __future__ import annotations

import math

import torch

from . import amp, cpu_kind
from .channel_dots import column_dots, input_grad_and_reductions, row_dots


class _LinearPlusLowRank(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, down, up, mask, in_scale, out_scale, gain):
        x2 = x.reshape(-1, x.shape[-1])
        # An input-channel scale s goes on x where x is smaller than W, else into W and D; x itself is what is kept.
        scale_x = in_scale is not None and x2.numel() < weight.numel()
        xs = x2 * in_scale if scale_x else x2
        w, d = (weight, down) if scale_x else _scaled_columns(weight, down, in_scale)
        h = xs @ d.t()
        if mask is not None:  # dropouts on the rank activation, per row
            h = h * mask
        y = gemm_linear(xs, w, bias if out_scale is None else None)
        y.addmm_(h, up.t(), alpha=gain)
        if out_scale is not None:  # r (W x + gain U h) + b; r's gradient is read off this output in backward
            y = torch.addcmul(bias, y, out_scale) if bias is not None else y.mul_(out_scale)
        ctx.save_for_backward(x2, weight, bias, down, up, h, mask, in_scale, out_scale,
                              y if out_scale is not None else None)
        ctx.x_shape, ctx.gain, ctx.scale_x = x.shape, gain, scale_x
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, g):
        x2, weight, bias, down, up, h, mask, in_scale, out_scale, y = ctx.saved_tensors
        scale_x = ctx.scale_x
        w, d = (weight, down) if scale_x else _scaled_columns(weight, down, in_scale)
        g2 = g.reshape(-1, g.shape[-1])
        grad_out = None
        if out_scale is not None:  # sum(g * (y - b)) / r, then the rest sees g diag(r)
            if ctx.needs_input_grad[7]:
                grad_out = output_scale_grad(g2, y.view(g2.shape), bias) / out_scale
            g2 = g2 * out_scale
        gh = times_tall(g2, times_gain(up, ctx.gain))
        if mask is not None:
            gh = gh * mask
        grad_x = grad_down = grad_up = grad_scale = None
        need_x, need_scale = ctx.needs_input_grad[0], in_scale is not None and ctx.needs_input_grad[6]
        if need_x or need_scale:
            grad_x2 = (g2 @ w).addmm_(gh, d)  # the gradient of s * x (scale_x), else of x itself
            if need_scale:  # sum(x * grad_x2), divided by s where s sits in W and D
                grad_scale = column_dots(x2, grad_x2)
                if not scale_x:
                    grad_scale /= in_scale
            if need_x:
                grad_x = (grad_x2.mul_(in_scale) if scale_x else grad_x2).view(ctx.x_shape)
        if ctx.needs_input_grad[3]:
            grad_down = thin_t_wide(gh, x2)
            if in_scale is not None:
                grad_down *= in_scale
        if ctx.needs_input_grad[4]:
            grad_up = times_gain(thin_t_wide(h, g2).t(), ctx.gain, in_place=True)
        return grad_x, None, None, grad_down, grad_up, None, grad_scale, grad_out, None


class _LinearMergedLowRank(torch.autograd.Function):
    """y = x (diag(r) (W + gain U D) diag(s))^T + b (s: an optional input-channel scale, DoRA along columns; r: an
    optional output-row scale, DoRA along rows), for calls with many more positions than the weight has columns:
    the two thin products of the forward pass and the accumulation into y become one small weight-sized product
    (rebuilt in backward, not kept). Backward recomputes x D^T, which costs one thin product where keeping it would
    cost memory. Linear 320 on (2, 4096, 320), rank 16 (in-process A/B, min of 40 rounds): 1.30x the frozen layer
    with _LinearPlusLowRank, 1.24x with this. (Running backward in cache-sized blocks of rows, so that the thin
    products read g and x from cache, gained 0-3% and lost up to 15% on wide layers: not kept.)
    r's gradient is recovered from the output, sum(g * (y - b)) / r, so r must stay away from 0 (the caller
    checks); y is then kept for backward, as the layer's own output."""

    @staticmethod
    def forward(ctx, x, weight, bias, down, up, in_scale, out_scale, gain):
        x2 = x.reshape(-1, x.shape[-1])
        y = gemm_linear(x2, _merged(weight, down, up, in_scale, out_scale, gain), bias)
        ctx.save_for_backward(x2, weight, bias if out_scale is not None else None, down, up, in_scale, out_scale,
                              y if out_scale is not None else None)
        ctx.x_shape, ctx.gain = x.shape, gain
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, g):
        x2, weight, bias, down, up, in_scale, out_scale, y = ctx.saved_tensors
        g2, gain = g.reshape(-1, g.shape[-1]), ctx.gain
        grad_x = grad_down = grad_up = grad_in = grad_out = None
        need_in = in_scale is not None and ctx.needs_input_grad[5]
        need_out = out_scale is not None and ctx.needs_input_grad[6]
        merged = _merged(weight, down, up, in_scale, out_scale, gain) if ctx.needs_input_grad[0] or need_in else None

        def scale_sums(rows, gb, grad_xb):
            # r's: sum(g * (y - b)) / r. s's: grad_x = g diag(r) (W + gain U D) diag(s), so sum(x * grad_x) / s.
            out = output_scale_sums(gb, y[rows], bias) if need_out else ()
            return out + (torch.linalg.vecdot(x2[rows], grad_xb, dim=0),) if need_in else out

        if need_out or need_in:  # the scales' sums taken with the input gradient's GEMM (input_grad_and_reductions)
            grad_x2, sums = input_grad_and_reductions(g2, merged, scale_sums)
            if need_out:
                grad_out = output_scale_from_sums(sums, bias) / out_scale
            if need_in:
                grad_in = sums[-1] / in_scale
        elif merged is not None:
            grad_x2 = g2 @ merged
        if ctx.needs_input_grad[0]:
            grad_x = grad_x2.view(ctx.x_shape)
        if out_scale is not None:  # the factors see g diag(r)
            up = up * out_scale[:, None]
        if ctx.needs_input_grad[3]:
            grad_down = thin_t_wide(times_tall(g2, times_gain(up, gain)), x2)
            if in_scale is not None:
                grad_down *= in_scale
        if ctx.needs_input_grad[4]:
            d = down if in_scale is None else down * in_scale
            grad_up = times_gain(thin_t_wide(x2 @ d.t(), g2).t(), gain, in_place=True)
            if out_scale is not None:
                grad_up *= out_scale[:, None]
        return grad_x, None, None, grad_down, grad_up, grad_in, grad_out, None


def _merged(weight, down, up, in_scale, out_scale, gain):
    """diag(r) (W + gain U D) diag(s), built in one product (and one scaling pass per scale given)."""
    merged = torch.addmm(weight, up, down, alpha=gain)
    if in_scale is not None:
        merged.mul_(in_scale)
    return merged if out_scale is None else merged.mul_(out_scale[:, None])


def output_scale_grad(g: torch.Tensor, y: torch.Tensor, bias: torch.Tensor | None, channel: int = -1) -> torch.Tensor:
    """sum(g * (y - b)) over every axis but the channel axis: the gradient of a per-channel scale on W x, read off
    the layer's output y = W x + b, in cache-sized blocks (channel_dots), with sum(g) taken in the same pass."""
    c, with_bias = g.shape[channel], bias is not None
    if channel % g.dim() == g.dim() - 1:
        out = column_dots(g.reshape(-1, c), y.reshape(-1, c), sum_a=with_bias)
    else:  # channel-first (n, c, positions): one dot per (sample, channel) row
        n = math.prod(g.shape[:channel])  # 1 for an unbatched conv input
        out = row_dots(g.reshape(n * c, -1), y.reshape(n * c, -1), sum_a=with_bias)
        out = tuple(t.view(n, c).sum(0) for t in out) if with_bias else out.view(n, c).sum(0)
    return output_scale_from_sums(out if with_bias else (out,), bias)


def output_scale_sums(g: torch.Tensor, y: torch.Tensor, bias: torch.Tensor | None) -> tuple:
    """A block's share of an output-channel scale's gradient: (sum_n g * y) and, with a bias, (sum_n g)."""
    dots = torch.linalg.vecdot(g, y, dim=0)
    return (dots, g.sum(0)) if bias is not None else (dots,)


def output_scale_from_sums(sums: tuple, bias: torch.Tensor | None) -> torch.Tensor:
    """sum(g * (y - b)) from output_scale_sums' totals."""
    return sums[0] if bias is None else sums[0].sub_(bias * sums[1])


def thin_t_wide(thin: torch.Tensor, wide: torch.Tensor) -> torch.Tensor:
    """thin^T wide, a sum over positions (rows) of a rank-sized and a channel-sized activation: a factor's gradient.
    MKL's fastest order depends on the CPU and the rank. On the AVX-512 Xeon it is thin^T wide, 1.7-2.3x faster than
    (wide^T thin)^T (rank 8-64 on 154 to 8192 positions of 320 to 5120 channels). On the AVX2 EPYC (cold operands,
    min of 9) it is (wide^T thin)^T from rank 16 up: 1.04-1.49x faster at ranks 16-128 on 8192 x 320 and 512 x 1280,
    1.2-1.4x on 154 x 768 and 4096 x 2560; below rank 16 that order is up to 5.9x slower there (ranks 1 and 12-14
    even). The result is then a transposed view, which autograd and the callers take as it is."""
    if cpu_kind.AVX512 or thin.device.type != "cpu" or thin.shape[1] < 16:
        return thin.t() @ wide
    return (wide.t() @ thin).t()


def times_tall(wide: torch.Tensor, tall: torch.Tensor) -> torch.Tensor:
    """wide @ tall for a tall (channels x rank) factor: an output gradient times an up factor. Below rank 16 on the
    AVX2 EPYC, MKL runs it 1.6-3.1x faster with tall laid out as F.linear's weight (a transposed view of a
    contiguous rank x channels copy; cold operands, min of 9: rank 8 on 8192 x 320 1.06 against 2.36 ms, on
    512 x 1280 0.37 against 0.68 ms); from rank 16 both layouts measure within 3%. The copy is rank x channels."""
    if cpu_kind.AVX512 or tall.shape[1] >= 16 or wide.device.type != "cpu":
        return wide @ tall
    return wide @ tall.t().contiguous().t()


def gain_as_float(up: torch.Tensor, gain) -> tuple[torch.Tensor, float]:
    """(up, gain) with a tensor gain (a trained scalar) moved into up, where its gradient comes through autograd,
    and a float gain left to fold into a fused function's products."""
    if isinstance(gain, torch.Tensor):
        return up * gain, 1.0
    return up, gain


def times_gain(t: torch.Tensor, gain: float, in_place: bool = False) -> torch.Tensor:
    """t * gain, skipped at gain 1 (a multiplier or scale folded into a custom function's products as a float: no
    autograd node of its own)."""
    if gain == 1.0:
        return t
    return t.mul_(gain) if in_place else t * gain


def _scaled_columns(weight, down, in_scale):
    """W diag(s) and D diag(s): an input-channel scale folded into both factors of the call."""
    if in_scale is None:
        return weight, down
    return weight * in_scale, down * in_scale


_PLAIN = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


def plain_frozen_layer(adapter, x: torch.Tensor) -> bool:
    """The layer is a frozen torch Linear/Conv running its own forward (nothing stacked or hooked on it), in the
    adapter's dtype: then the adapter may compute the layer's output itself."""
    layer = adapter.layer
    if type(layer) not in _PLAIN or layer.weight.requires_grad or layer._forward_hooks or layer._forward_pre_hooks:
        return False
    if layer.bias is not None and layer.bias.requires_grad:
        return False
    org = adapter._org_forward
    if getattr(org, "__func__", None) is not type(layer).forward or getattr(org, "__self__", None) is not layer:
        return False
    return x.dtype == layer.weight.dtype == adapter.dtype


def fusable(adapter, x: torch.Tensor) -> bool:
    return type(adapter.layer) is torch.nn.Linear and plain_frozen_layer(adapter, x)


def linear_plus_low_rank(adapter, x: torch.Tensor, down: torch.Tensor, up: torch.Tensor, gain: float = 1.0,
                         mask: torch.Tensor | None = None, in_scale: torch.Tensor | None = None,
                         out_scale: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T + b + gain (x D^T) U^T; with in_scale s (per input channel) the layer and D see s * x instead, folded into
    W and D (DoRA along columns) so that no scaled copy of x is made or kept; with out_scale r (per output channel,
    DoRA along rows, every r away from 0) the sum is scaled by r before the bias: r (W x + gain U D x) + b."""
    layer = adapter.layer
    if mask is None and adapter.many_positions(x):
        return amp.apply(_LinearMergedLowRank, x, layer.weight, layer.bias, down, up, in_scale, out_scale, float(gain))
    return amp.apply(_LinearPlusLowRank, x, layer.weight, layer.bias, down, up, mask, in_scale, out_scale, float(gain))


class _LinearPlusKron(torch.autograd.Function):
    """y = x (W + kron(w1, w2))^T + b for a frozen Linear: the layer's one GEMM each way plus one for the
    merged weight's gradient, contracted at once onto the two small factors. The merged weight is rebuilt in
    backward, not kept (the activation-side Kronecker identity moves activation-sized tensors through
    transposes, which costs more on a CPU)."""

    @staticmethod
    def forward(ctx, x, weight, bias, w1, w2):
        x2 = x.reshape(-1, x.shape[-1])
        merged = weight + torch.kron(w1, w2)
        y = gemm_linear(x2, merged, bias)
        ctx.save_for_backward(x2, weight, w1, w2)
        ctx.x_shape = x.shape
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, g):
        x2, weight, w1, w2 = ctx.saved_tensors
        (a, b), (c, d) = w1.shape, w2.shape
        g2 = g.reshape(-1, a * c)
        grad_x = grad_w1 = grad_w2 = None
        if ctx.needs_input_grad[0]:
            grad_x = (g2 @ (weight + torch.kron(w1, w2))).view(ctx.x_shape)
        if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
            grad_merged = (g2.t() @ x2).view(a, c, b, d)
            if ctx.needs_input_grad[3]:
                grad_w1 = torch.einsum("acbd,cd->ab", grad_merged, w2)
            if ctx.needs_input_grad[4]:
                grad_w2 = torch.einsum("acbd,ab->cd", grad_merged, w1)
        return grad_x, None, None, grad_w1, grad_w2


def linear_plus_kron(adapter, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    layer = adapter.layer
    return amp.apply(_LinearPlusKron, x, layer.weight, layer.bias, w1, w2)


class _FoldedLinear(torch.autograd.Function):
    """y = x fold(W, p)^T + b for a frozen Linear, where the adapter's parameter p folds cheaply into the weight and
    its gradient can be recovered from the output: fold.param_grad(sums, bias, p) of the sums over rows of
    fold.output_sums(g, y, bias, p). Forward and backward each run only the layer's GEMM; the sums are taken with
    backward's GEMM (input_grad_and_reductions: block by block where that pays). The folded weight is rebuilt in
    backward, not kept."""

    @staticmethod
    def forward(ctx, x, weight, bias, param, fold):
        x2 = x.reshape(-1, x.shape[-1])
        y = gemm_linear(x2, fold.weight(weight, param), bias)
        ctx.save_for_backward(y, weight, bias, param)
        ctx.fold, ctx.x_shape = fold, x.shape
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, g):
        y, weight, bias, param = ctx.saved_tensors
        g2, fold = g.reshape(-1, g.shape[-1]), ctx.fold
        folded = fold.weight(weight, param) if ctx.needs_input_grad[0] else None
        if not ctx.needs_input_grad[3]:
            return (g2 @ folded).view(ctx.x_shape) if folded is not None else None, None, None, None, None
        grad_x2, sums = input_grad_and_reductions(
            g2, folded, lambda rows, gb, _: fold.output_sums(gb, y[rows], bias, param))
        grad_x = grad_x2.view(ctx.x_shape) if grad_x2 is not None else None
        return grad_x, None, None, fold.param_grad(sums, bias, param), None


def linear_folded(adapter, x: torch.Tensor, param: torch.Tensor, fold) -> torch.Tensor:
    """The adapter's frozen Linear with `param` folded into its weight by `fold` (weight and param_grad)."""
    layer = adapter.layer
    return amp.apply(_FoldedLinear, x, layer.weight, layer.bias, param, fold)


def gemm_linear(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x2 W^T + b as one GEMM."""
    return torch.addmm(bias, x2, weight.t()) if bias is not None else x2 @ weight.t()
