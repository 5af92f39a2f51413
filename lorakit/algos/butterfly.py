"""BOFT's butterfly stages applied to rows: m stages of block-diagonal products, each between gathers of the
channels into the next stage's butterfly order, forward and backward, as an autograd function and as loops that
fused functions (butterfly_linear) run around their own first and last steps."""

from __future__ import annotations

import functools

import torch


def stages_forward(v, r, orders, last_add=None):
    """The stages on v (channels, n), natural channel order: the rows gathered into stage 0's order, per stage one
    batched product with its blocks and a gather into the next stage's order (consecutive gathers composed into
    one). Returns the last stage's product, still in that stage's order (the caller makes the last gather), and
    each stage's input, for backward (views of one tensor). last_add (count, b, 1 or n): added by the last
    product (baddbmm). The inputs are one allocation and the products land in one scratch buffer: a fresh
    activation-sized tensor per stage costs page faults once freed memory has gone back to the system (Linear
    1280 on 512 positions: ~1800 faults per step with one per stage)."""
    stages, count, b, _ = r.shape
    n = v.shape[1]
    scratch = torch.empty((count, b, n), dtype=v.dtype, device=v.device)
    inputs = torch.empty((stages, count * b, n), dtype=v.dtype, device=v.device)
    torch.index_select(v, 0, orders[0], out=inputs[0])  # index_select: 3-5x faster than v[order] on rows
    for i in range(stages):
        v = inputs[i].view(count, b, n)
        if i == stages - 1 and last_add is not None:
            torch.baddbmm(last_add, r[i], v, out=scratch)
        else:
            torch.bmm(r[i], v, out=scratch)
        if i < stages - 1:
            torch.index_select(scratch.view(count * b, n), 0, orders[i + 1], out=inputs[i + 1])
    return scratch.view(count * b, n), inputs


def stages_backward(g, r, inputs, inverses, needs_blocks, needs_input):
    """Backward of stages_forward from g, the gradient of its last product (in that stage's order): the
    gradient of v in natural order (None unless needs_input) and of r (None unless needs_blocks). A gather's
    gradient is the inverse gather. g is overwritten (the caller's own buffer), alternating with one other."""
    stages, count, b, _ = r.shape
    n = g.shape[1]
    grads = []  # per stage, last first
    other = torch.empty_like(g)
    for i in reversed(range(stages)):
        gb = g.view(count, b, n)
        if needs_blocks:
            grads.append(torch.bmm(gb, inputs[i].view(count, b, n).mT))
        if i == 0 and not needs_input:
            g = None
            break
        torch.bmm(r[i].mT, gb, out=other.view(count, b, n))
        torch.index_select(other, 0, inverses[i], out=g)
    return g, (torch.stack(grads[::-1]) if grads else None)


class _Butterfly(torch.autograd.Function):
    """T v for v (channels, n) through stages_forward: one function for all stages, instead of a Python autograd
    function per gather and a node per product and block slice."""

    @staticmethod
    def forward(ctx, v, r, orders, inverses):
        last, inputs = stages_forward(v, r, orders)
        ctx.save_for_backward(r, inputs)
        ctx.inverses = inverses
        return last.index_select(0, orders[r.shape[0]])

    @staticmethod
    def backward(ctx, g):
        r, inputs = ctx.saved_tensors
        g = g.index_select(0, ctx.inverses[r.shape[0]])
        grad_v, grad_r = stages_backward(g, r, inputs, ctx.inverses, ctx.needs_input_grad[1],
                                         ctx.needs_input_grad[0])
        return grad_v, grad_r, None, None


def stage_order(channels: int, stage: int, block: int) -> torch.Tensor:
    """The channels of stage `stage`'s blocks, block after block: it pairs channel j with j + 2^stage * block / 2
    (LyCORIS' and ComfyUI's butterfly)."""
    return torch.arange(channels).unflatten(-1, (-1, 2, 2 ** stage * (block // 2))).transpose(-2, -1).flatten(-3)


def chained_gathers(orders, device):
    """Row gathers through a chain of channel orders, and their inverse permutations: into the first order, from
    each order into the next (two gathers composed into one), and back to the channels' own order."""
    undo = [o.argsort() for o in orders]
    gathers = [orders[0]] + [undo[i][orders[i + 1]] for i in range(len(orders) - 1)] + [undo[-1]]
    return tuple(g.to(device) for g in gathers), tuple(g.argsort().to(device) for g in gathers)


@functools.lru_cache(maxsize=64)
def butterfly_orders(channels: int, stages: int, block: int, device: torch.device):
    """The gathers of stages_forward and their inverses, made once per layout and device."""
    return chained_gathers([stage_order(channels, i, block) for i in range(stages)], device)
