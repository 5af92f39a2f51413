"""Diag-OFT: a block-diagonal orthogonal rotation of the output channels, W' = blockdiag(R^T) W (the einsum
'k n m, k n ... -> k m ...' of LyCORIS, ComfyUI and A1111). `dim` is the block size, split as LyCORIS splits it;
an adapter read from a file keeps the file's split (sd-scripts' OFT has `dim` blocks, larger than their count).
The multiplier is linear, W + m (R^T W - W), as A1111 and LyCORIS apply it (ComfyUI applies m^2 for m != 1)."""

from __future__ import annotations

import torch

from .fused_linear import fusable, linear_folded
from .lokr import factorization
from .oft_base import OrthogonalAdapter, blend_with_identity, solve_dtype
from .rotated_linear import linear_rotated


class _RotatedBlocks:
    """Diag-OFT's block operator A (k x b x b: channel i of a block -> channel j) folded into a Linear's weight:
    W'_k = A_k^T W_k. The operator's gradient Z_k^T G_k needs the unrotated output Z = x W^T, recovered from the
    output in closed form: Z_k = (Y_k - b_k) A_k^-1, so grad A_k = A_k^-T ((Y_k - b_k)^T G_k): one pass over Y and
    G, a b x b solve per block. The caller keeps A well conditioned (rotations blended with the identity)."""

    @staticmethod
    def weight(weight, op):
        k, b, _ = op.shape
        return torch.bmm(op.transpose(1, 2), weight.view(k, b, -1)).view(weight.shape)

    @staticmethod
    def output_sums(g, y, bias, op):
        k, b, _ = op.shape
        n = g.shape[0]
        p = torch.einsum("nki,nkj->kij", y.view(n, k, b), g.view(n, k, b))
        return (p, g.sum(0)) if bias is not None else (p,)

    @staticmethod
    def param_grad(sums, bias, op):
        k, b, _ = op.shape
        p = sums[0]
        if bias is not None:
            p = p - bias.view(k, b, 1) * sums[1].view(k, 1, b)
        work = solve_dtype(op)
        return torch.linalg.solve(op.transpose(1, 2).to(work), p.to(work)).to(op.dtype)


LEGACY_ROTATION_KEY = "oft_diag"


def from_legacy_rotation(sd: dict) -> dict:
    """One module's tensors from LyCORIS 2.0's Diag-OFT file, which saved each block's rotation R itself as
    `oft_diag` (k, b, b), as lorakit's Diag-OFT tensors. A1111 (network_oft.py) applies such R as
    W' = blockdiag(R^T) W, the einsum lorakit's Diag-OFT uses, with block size shape[1], no constraint and the
    file's `alpha` unused. R is the Cayley transform of Q = (R + I)^-1 (R - I); oft_blocks = Q / 2 gives that Q
    (Q = B - B^T), unconstrained. A block that is no rotation (a rescale folded into R, or LyCORIS' earliest
    additive OFT) has no such Q: refused."""
    r = sd[LEGACY_ROTATION_KEY]
    if r.dim() != 3 or r.shape[1] != r.shape[2]:
        raise ValueError(f"'{LEGACY_ROTATION_KEY}' of shape {tuple(r.shape)} is no Diag-OFT file's (blocks, size, size)"
                         " rotation")
    work = r.double()
    eye = torch.eye(r.shape[-1], dtype=work.dtype)
    error = float((work.mT @ work - eye).abs().max())
    tolerance = max(1e-4, 8 * r.shape[-1] ** 0.5 * torch.finfo(r.dtype).eps)  # R rounded to the file's dtype
    if error > tolerance:
        raise ValueError(f"an old LyCORIS Diag-OFT file ('{LEGACY_ROTATION_KEY}': each block's R itself) whose blocks "
                         f"are not rotations (|R^T R - I| up to {error:.3g}: a rescale folded in, or LyCORIS' first "
                         "OFT format), which lorakit's Diag-OFT cannot represent; train it again with a current "
                         "LyCORIS or lorakit")
    q = torch.linalg.solve(work + eye, work - eye)
    out = {k: v for k, v in sd.items() if k not in (LEGACY_ROTATION_KEY, "alpha")}
    out["oft_blocks"] = ((q - q.mT) / 4).to(r.dtype)  # B = Q / 2, with Q made exactly skew-symmetric
    return out


class DiagOFT(OrthogonalAdapter):
    name = "diag-oft"
    aliases = ("oft",)

    def __init__(self, layer, options=None, *, saved_split: tuple[int, int] | None = None, **kwargs):
        # saved_split: (count, size) of a file's blocks, given by from_state_dict only (no user option): sd-scripts'
        # networks/oft.py makes `dim` blocks of out_dim / dim channels, larger than their count for a small dim,
        # a split that LyCORIS' factorization of `dim` never gives
        self._saved_split = saved_split
        super().__init__(layer, options, **kwargs)

    def block_shape(self, options):
        if self._saved_split is not None:
            count, size = self._saved_split
        else:
            size, count = factorization(self.spec.out_dim, options.dim)
        return (count, size, size)

    @classmethod
    def options_from_tensors(cls, spec, sd):
        options = super().options_from_tensors(spec, sd)
        shape = tuple(sd["oft_blocks"].shape)
        if len(shape) == 3 and shape[1] == shape[2] and shape[0] * shape[1] == spec.out_dim:
            options["saved_split"] = shape[:2]  # another shape: refused by load_state_dict, naming both
        return options

    def block_operator(self) -> torch.Tensor:
        """M = (1 - m) I + m diag(rescale) R^T per block: op[k, i, j] takes channel i to channel j of block k."""
        n, b, _ = self.oft_blocks.shape
        m = self.multiplier
        r = self.rotations()
        if self.rescale is not None:
            r = r * self.rescale.reshape(n, 1, b)
        return blend_with_identity(r, m)

    def adapted_forward(self, x, *args, **kwargs):
        # A frozen Linear over many positions: the blocks folded into the weight (one GEMM each way). Without
        # rescale the blocks are rotations blended with I, which the folded backward inverts safely at any
        # multiplier: the singular values of (1 - m) I + m R stay >= cos(half the largest rotation angle), and
        # the Cayley transform never rotates by a half turn.
        # Fewer positions: the layer, the Cayley transform and the rotation of its output in one function.
        if not args and not kwargs and self.rescale is None and not self._dropouts_active() and fusable(self, x):
            if self.many_positions(x):
                return linear_folded(self, x, self.block_operator(), _RotatedBlocks)
            from_blocks = self.bound <= 0  # unconstrained: Q = B - B^T built inside the function
            return linear_rotated(self, x, self.oft_blocks if from_blocks else self.skew(), self.multiplier,
                                  from_blocks)
        return super().adapted_forward(x, *args, **kwargs)

    def output_from(self, y):
        unbatched_conv = self.spec.is_conv and y.dim() != len(self.spec.kernel) + 2
        if y.dtype != self.wide_dtype() or self._dropouts_active() or unbatched_conv:
            return super().output_from(y)
        # One batched matmul: y' = M (y - b) + b with M per block, the bias term a per-channel constant added by
        # the same product (baddbmm). A Linear's blocks are read through a strided view (positions x channels seen
        # as blocks x positions x block), a conv's channel-first blocks are contiguous: no transposed copies in.
        n, b, _ = self.oft_blocks.shape
        op = self.block_operator()
        bias = self.base_bias()
        if bias is not None:
            bias = bias.reshape(n, 1, b).to(op.dtype)
        const = None if bias is None else bias - torch.bmm(bias, op)  # (n, 1, b)
        if self.spec.is_conv:
            batch = y.shape[0]
            op_t = op.transpose(1, 2).expand(batch, n, b, b).reshape(batch * n, b, b)
            v = y.reshape(batch * n, b, -1)
            if const is None:
                return torch.bmm(op_t, v).view(y.shape)
            const = const.reshape(n, b, 1).expand(batch, n, b, 1).reshape(batch * n, b, 1)
            return torch.baddbmm(const, op_t, v).view(y.shape)
        v = y.reshape(-1, n, b).transpose(0, 1)
        out = torch.bmm(v, op) if const is None else torch.baddbmm(const, v, op)
        return out.transpose(0, 1).reshape(y.shape)

    def rotate(self, v, multiplier):
        n, b, _ = self.oft_blocks.shape
        blocks = v.unflatten(-1, (n, b))
        return torch.einsum("knm,...kn->...km", self.rotations(), blocks).flatten(-2)

    def rotate_rows(self, v, multiplier):
        n, b, _ = self.oft_blocks.shape
        return torch.bmm(self.rotations().transpose(1, 2), v.reshape(n, b, -1)).view(v.shape)
