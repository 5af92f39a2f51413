"""BOFT: butterfly orthogonal fine-tuning. m stages of block-diagonal rotations, each between a butterfly
permutation of the output channels, as LyCORIS and ComfyUI compute it (R, not R^T, per block). The multiplier
follows ComfyUI, the one UI that loads BOFT: each stage becomes m R + (1 - m) I and the change is scaled by m."""

from __future__ import annotations

import torch

from . import amp
from .butterfly import _Butterfly
from .butterfly_groups import composed_stages
from .butterfly_linear import linear_butterfly
from .fused_linear import fusable
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
            works = next((d for d in range(options.dim + 1, self.spec.out_dim + 1)
                          if power2_factorization(self.spec.out_dim, d) is not None), None)
            hint = f"; dim {works} splits it (conv_dim for a conv)" if works is not None else ""
            raise OptionError(f"option 'dim': BOFT cannot split {self.spec.out_dim} output channels into blocks of "
                              f"an even size <= {options.dim} with a power-of-two count{hint}")
        size, count = split
        stages = bin(count - 1).count("1") + 1
        return (stages, count, size, size)

    def prefers_merged_weight(self, x):
        return self.many_positions(x)  # m stages over the activations cost more than one pass with T W

    def adapted_forward(self, x, *args, **kwargs):
        # A frozen Linear on few positions: the layer and the stages in one function (many positions: the stages
        # turn the weight, prefers_merged_weight)
        m = self.multiplier
        if not args and not kwargs and isinstance(m, (int, float)) and not self._dropouts_active() and \
                fusable(self, x) and self.wide_dtype() == x.dtype:
            r = blend_with_identity(self.rotations(), m)
            return linear_butterfly(self, x, r, m, self.rescale)
        return super().adapted_forward(x, *args, **kwargs)

    def rotate_rows(self, v, multiplier):
        r = blend_with_identity(self.rotations(), multiplier)  # each stage: m R + (1 - m) I
        rows = v.reshape(v.shape[0], -1)
        blocks, orders, inverses = composed_stages(r, rows.shape[1])
        return amp.apply(_Butterfly, rows, blocks, orders, inverses).view(v.shape)
