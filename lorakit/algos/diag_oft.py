"""Diag-OFT: a block-diagonal orthogonal rotation of the output channels, W' = blockdiag(R^T) W (the einsum
'k n m, k n ... -> k m ...' of LyCORIS, ComfyUI and A1111). `dim` is the block size, split as LyCORIS splits it.
The multiplier is linear, W + m (R^T W - W), as A1111 and LyCORIS apply it (ComfyUI applies m^2 for m != 1)."""

from __future__ import annotations

import torch

from .fused_linear import fusable, linear_rotated_blocks
from .lokr import factorization
from .oft_base import OrthogonalAdapter


class DiagOFT(OrthogonalAdapter):
    name = "diag-oft"
    aliases = ("oft",)

    def block_shape(self, options):
        size, count = factorization(self.spec.out_dim, options.dim)
        return (count, size, size)

    def block_operator(self) -> torch.Tensor:
        """M = (1 - m) I + m diag(rescale) R^T per block: op[k, i, j] takes channel i to channel j of block k."""
        n, b, _ = self.oft_blocks.shape
        m = self.multiplier
        r = self.rotations()
        if self.rescale is not None:
            r = r * self.rescale.reshape(n, 1, b)
        eye = torch.eye(b, dtype=r.dtype, device=r.device)
        return (1 - m) * eye + m * r

    def adapted_forward(self, x, *args, **kwargs):
        # A frozen Linear over many positions: the blocks folded into the weight (one GEMM each way). Without
        # rescale the blocks are rotations blended with I, which the folded backward inverts safely at any
        # multiplier: the singular values of (1 - m) I + m R stay >= cos(half the largest rotation angle), and
        # the Cayley transform never rotates by a half turn.
        if not args and not kwargs and self.rescale is None and not self._dropouts_active() and \
                fusable(self, x) and self.many_positions(x):
            return linear_rotated_blocks(self, x, self.block_operator())
        return super().adapted_forward(x, *args, **kwargs)

    def output_from(self, y):
        unbatched_conv = self.spec.is_conv and y.dim() != len(self.spec.kernel) + 2
        if y.dtype != self.dtype or self._dropouts_active() or unbatched_conv:
            return super().output_from(y)
        # One pass: y' = M (y - b) + b with M per block, applied to the channel axis in place (no transposes),
        # the bias term folded into a per-channel constant.
        n, b, _ = self.oft_blocks.shape
        op = self.block_operator()
        if self.spec.is_conv:
            out = torch.einsum("kij,zkis->zkjs", op, y.reshape(y.shape[0], n, b, -1)).reshape(y.shape)
        else:
            out = torch.einsum("kij,...ki->...kj", op, y.unflatten(-1, (n, b))).flatten(-2)
        bias = self.base_bias()
        if bias is None:
            return out
        const = bias - torch.einsum("kij,ki->kj", op, bias.reshape(n, b).to(op.dtype)).reshape(-1)
        return out + self.spec.channel_view(const, out.dim())

    def rotate(self, v, multiplier):
        n, b, _ = self.oft_blocks.shape
        blocks = v.unflatten(-1, (n, b))
        return torch.einsum("knm,...kn->...km", self.rotations(), blocks).flatten(-2)

    def rotate_rows(self, v, multiplier):
        n, b, _ = self.oft_blocks.shape
        return torch.bmm(self.rotations().transpose(1, 2), v.reshape(n, b, -1)).view(v.shape)
