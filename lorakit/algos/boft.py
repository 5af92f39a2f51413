"""BOFT: butterfly orthogonal fine-tuning. m stages of block-diagonal rotations, each between a butterfly
permutation of the output channels, as LyCORIS and ComfyUI compute it (R, not R^T, per block). The multiplier
follows ComfyUI, the one UI that loads BOFT: each stage becomes m R + (1 - m) I and the change is scaled by m."""

from __future__ import annotations

import torch

from .oft_base import OrthogonalAdapter
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

    def rotate(self, v, multiplier):
        r = self.rotations()
        stages, _, b, _ = r.shape
        eye = torch.eye(b, dtype=r.dtype, device=r.device)
        for i in range(stages):
            bi = r[i] if multiplier == 1 else multiplier * r[i] + (1 - multiplier) * eye
            k = 2 ** i * (b // 2)
            v = v.unflatten(-1, (-1, 2, k)).transpose(-2, -1).flatten(-3).unflatten(-1, (-1, b))
            v = torch.einsum("bij,...bj->...bi", bi, v)
            v = v.flatten(-2).unflatten(-1, (-1, k, 2)).transpose(-2, -1).flatten(-3)
        return v
