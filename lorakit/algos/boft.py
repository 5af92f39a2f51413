"""BOFT: butterfly orthogonal fine-tuning. m stages of block-diagonal rotations, each between a butterfly
permutation of the output channels, as LyCORIS and ComfyUI compute it (R, not R^T, per block). The multiplier
follows ComfyUI, the one UI that loads BOFT: each stage becomes m R + (1 - m) I and the change is scaled by m."""

from __future__ import annotations

import functools

import torch

from . import amp
from .oft_base import OrthogonalAdapter, blend_with_identity
from .options import OptionError


def power2_factorization(dimension: int, factor: int) -> tuple[int, int] | None:
    """(block size, block count) with an even block size <= factor and a power-of-two count (LyCORIS' rule)."""
    found = None
    size = 0
    while size <= factor:
        size += 2
        while dimension % size and size < dimension:
            size += 2
        if size > factor:
            break
        count = dimension // size
        if dimension % size == 0 and count & (count - 1) == 0:
            found = (size, count)
    return found


class BOFT(OrthogonalAdapter):
    name = "boft"
    multiplier_is_affine = False  # each stage is m R + (1 - m) I

    def block_shape(self, options):
        split = power2_factorization(self.spec.out_dim, options.dim)
        if split is None:
            raise OptionError(f"option 'dim': BOFT cannot split {self.spec.out_dim} output channels into blocks of "
                              f"an even size <= {options.dim} with a power-of-two count")
        size, count = split
        stages = bin(count - 1).count("1") + 1
        return (stages, count, size, size)

    def prefers_merged_weight(self, x):
        return self.many_positions(x)  # m stages over the activations cost more than one pass with T W

    def rotate_rows(self, v, multiplier):
        r = blend_with_identity(self.rotations(), multiplier)  # each stage: m R + (1 - m) I
        stages, _, b, _ = r.shape
        orders, inverses = butterfly_orders(v.shape[0], stages, b, v.device)
        return amp.apply(_Butterfly, v.reshape(v.shape[0], -1), r, orders, inverses).view(v.shape)


class _Butterfly(torch.autograd.Function):
    """T v for v (channels, n): the rows gathered into stage 0's butterfly order, then per stage one batched
    product with its blocks and a gather into the next stage's order (consecutive gathers composed into one; a
    gather's gradient is the inverse gather). One function for all stages, instead of a Python autograd function
    per gather and a node per product and block slice. Products land in one scratch buffer (forward) or two
    alternating ones (backward): a fresh activation-sized tensor per stage costs page faults once freed memory
    has gone back to the system."""

    @staticmethod
    def forward(ctx, v, r, orders, inverses):
        stages, count, b, _ = r.shape
        n = v.shape[1]
        scratch = torch.empty((count, b, n), dtype=v.dtype, device=v.device)
        inputs = []
        v = v.index_select(0, orders[0])  # index_select: 3-5x faster than v[order] on rows
        for i in range(stages):
            inputs.append(v)
            torch.bmm(r[i], v.view(count, b, n), out=scratch)
            v = scratch.view(count * b, n).index_select(0, orders[i + 1])
        ctx.save_for_backward(r, *inputs)
        ctx.inverses = inverses
        return v

    @staticmethod
    def backward(ctx, g):
        r, *inputs = ctx.saved_tensors
        stages, count, b, _ = r.shape
        n = g.shape[1]
        grads = []  # per stage, last first
        g = g.index_select(0, ctx.inverses[stages])
        other = torch.empty_like(g)
        for i in reversed(range(stages)):
            gb = g.view(count, b, n)
            if ctx.needs_input_grad[1]:
                grads.append(torch.bmm(gb, inputs[i].view(count, b, n).mT))
            if i == 0 and not ctx.needs_input_grad[0]:
                g = None
                break
            torch.bmm(r[i].mT, gb, out=other.view(count, b, n))
            torch.index_select(other, 0, ctx.inverses[i], out=g)
        return g, torch.stack(grads[::-1]) if grads else None, None, None


@functools.lru_cache(maxsize=64)
def butterfly_orders(channels: int, stages: int, block: int, device: torch.device):
    """Row gathers for rotate_rows, and their inverse permutations, made once per layout and device: into stage
    0's order, from each stage's order into the next's, and back. Stage i pairs channel j with
    j + 2^i * block / 2 (LyCORIS' and ComfyUI's butterfly)."""
    orders = [torch.arange(channels).unflatten(-1, (-1, 2, 2 ** i * (block // 2))).transpose(-2, -1).flatten(-3)
              for i in range(stages)]
    undo = [o.argsort() for o in orders]
    gathers = [orders[0]] + [undo[i][orders[i + 1]] for i in range(stages - 1)] + [undo[-1]]
    return tuple(g.to(device) for g in gathers), tuple(g.argsort().to(device) for g in gathers)
