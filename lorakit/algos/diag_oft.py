"""Diag-OFT: a block-diagonal orthogonal rotation of the output channels, W' = blockdiag(R^T) W (the einsum
'k n m, k n ... -> k m ...' of LyCORIS, ComfyUI and A1111). `dim` is the block size, split as LyCORIS splits it.
The multiplier is linear, W + m (R^T W - W), as A1111 and LyCORIS apply it (ComfyUI applies m^2 for m != 1)."""

from __future__ import annotations

import torch

from .lokr import factorization
from .oft_base import OrthogonalAdapter


class DiagOFT(OrthogonalAdapter):
    name = "diag-oft"
    aliases = ("oft",)

    def block_shape(self, options):
        size, count = factorization(self.spec.out_dim, options.dim)
        return (count, size, size)

    def rotate(self, v, multiplier):
        n, b, _ = self.oft_blocks.shape
        blocks = v.unflatten(-1, (n, b))
        return torch.einsum("knm,...kn->...km", self.rotations(), blocks).flatten(-2)
