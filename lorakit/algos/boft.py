"""BOFT: butterfly orthogonal fine-tuning. m stages of block-diagonal rotations, each between a butterfly
permutation of the output channels, as LyCORIS and ComfyUI compute it (R, not R^T, per block). The multiplier
follows ComfyUI, the one UI that loads BOFT: each stage becomes m R + (1 - m) I and the change is scaled by m."""

from __future__ import annotations

import functools

import torch

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
        """Each stage: the channels (rows) gathered into butterfly order, the blocks applied as one batched matmul,
        the order undone; consecutive stages' two gathers composed into one."""
        r = blend_with_identity(self.rotations(), multiplier)  # each stage: m R + (1 - m) I
        stages, count, b, _ = r.shape
        orders, inverses = butterfly_orders(v.shape[0], stages, b, v.device)
        v = _RowGather.apply(v, orders[0], inverses[0])
        for i in range(stages):
            v = torch.bmm(r[i], v.reshape(count, b, -1)).view(v.shape)
            v = _RowGather.apply(v, orders[i + 1], inverses[i + 1])
        return v


class _RowGather(torch.autograd.Function):
    """v[order] for a permutation: its gradient is the inverse gather (autograd's would scatter-add into zeros,
    the largest cost of BOFT's backward)."""

    @staticmethod
    def forward(ctx, v, order, inverse):
        ctx.inverse = inverse
        return v.index_select(0, order)  # 3-5x faster than v[order] on rows

    @staticmethod
    def backward(ctx, g):
        return g.index_select(0, ctx.inverse), None, None


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
