"""What Diag-OFT and BOFT share: orthogonal blocks from the Cayley transform, the norm constraint, `rescale`,
and a forward that rotates the layer's output channels (y = T W x + b) instead of building T W.

Constraint: the option `constraint` bounds the Frobenius norm of Q over all blocks at constraint * out_dim
(LyCORIS' and A1111's reading). Files store blocks already scaled into the bound and `alpha` = the absolute bound
(ComfyUI's reading), which they satisfy, so LyCORIS, ComfyUI and A1111 compute the same rotation from them.
Loading a file keeps an adapter's own bound; one built from a file alone takes the file's alpha as its bound.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from . import amp
from .base import Adapter, bias_changing_bypass

_DROPOUTS = frozenset({"dropout", "rank_dropout", "rank_dropout_scale"})
_UNCONSTRAINED_FLOOR = 1e-7  # the saved bound of unconstrained blocks is never 0, which A1111 reads as "no rotation"


def solve_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype the Cayley transform is solved in: float32 for half and bfloat16 blocks (a network cast to half
    precision for training or inference), which torch's linear algebra does not take."""
    return torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype


class _Cayley(torch.autograd.Function):
    """R = (I + Q)(I - Q)^-1 for a batch of skew-symmetric Q. Backward needs no second solve: with
    (I - Q)^-1 = (I + R) / 2, dR = (I + R) dQ (I + R) / 2, so dL/dQ = (I + R)^T G (I + R)^T / 2 (BOFT's
    1024 blocks of a 1280-channel layer: one batched solve per step instead of three). Half-precision blocks are
    solved in float32; R is returned in their dtype."""

    @staticmethod
    def forward(ctx, q):
        work = q.to(solve_dtype(q))
        eye = torch.eye(q.shape[-1], dtype=work.dtype, device=q.device)
        r = torch.linalg.solve(eye - work, eye + work)
        ctx.save_for_backward(r)
        return r.to(q.dtype)

    @staticmethod
    def backward(ctx, g):
        (r,) = ctx.saved_tensors
        eye = torch.eye(r.shape[-1], dtype=r.dtype, device=r.device)
        p = (eye + r).transpose(-1, -2)
        return (p @ g.to(r.dtype) @ p * 0.5).to(g.dtype)


def blend_with_identity(t: torch.Tensor, m: float) -> torch.Tensor:
    """(1 - m) I + m t over the last two axes: the UIs' multiplier on a rotation; t itself at m = 1 (training's
    usual case, no blend built per call)."""
    if m == 1:
        return t
    eye = torch.eye(t.shape[-1], dtype=t.dtype, device=t.device)
    return (1 - m) * eye + m * t


class OrthogonalAdapter(Adapter):
    accepts = frozenset({"dim", "constraint", "rescaled"}) | _DROPOUTS
    refusal_notes = bias_changing_bypass("rotates")
    detect_keys = ("oft_blocks",)
    keys = ("oft_blocks", "rescale", "alpha")

    def block_shape(self, options) -> tuple[int, ...]:
        raise NotImplementedError

    def rotate_rows(self, v: torch.Tensor, multiplier: float) -> torch.Tensor:
        """T v for v of shape (out, n): channels first, the layout of the weight, where each block's product is
        a batched matmul over contiguous rows (no transposes)."""
        raise NotImplementedError

    def rotate(self, v: torch.Tensor, multiplier: float) -> torch.Tensor:
        """T v on the last axis (output channels)."""
        flat = v.reshape(-1, v.shape[-1])
        return self.rotate_rows(flat.t(), multiplier).t().reshape(v.shape)

    def build(self, options):
        self.bound = options.constraint * self.spec.out_dim
        self.oft_blocks = nn.Parameter(torch.zeros(self.block_shape(options)))  # Q = 0: R = I, no change
        ones = (1,) * (len(self.spec.weight_shape) - 1)
        self.rescale = nn.Parameter(torch.ones(self.spec.out_dim, *ones)) if options.rescaled else None

    # ----- rotations -----
    def _clamp_ratio(self, q: torch.Tensor) -> torch.Tensor:
        """The factor that brings |Q| within the bound (1 when unconstrained or already inside)."""
        if self.bound <= 0:
            return torch.ones((), dtype=q.dtype, device=q.device)
        n = torch.linalg.vector_norm(q)
        return torch.where(n > self.bound, self.bound / n.clamp_min(1e-30), torch.ones_like(n))

    def skew(self) -> torch.Tensor:
        """Q = B - B^T per block, brought within the bound, in wide_dtype: half-precision blocks on a float32 layer
        give a float32 rotation (R = I + ~2Q rounded to half precision loses a unit of I's precision, several of
        the change's), as the layer's output it rotates is float32."""
        b = self.oft_blocks.to(self.wide_dtype())
        q = b - b.transpose(-1, -2)
        return q if self.bound <= 0 else q * self._clamp_ratio(q)

    def rotations(self) -> torch.Tensor:
        """R = (I + Q)(I - Q)^-1 per block, solved rather than inverted (the two factors commute)."""
        return amp.apply(_Cayley, self.skew(), cast=False)

    def transformed(self, v: torch.Tensor, multiplier: float) -> torch.Tensor:
        t = self.rotate(v, multiplier)
        return t if self.rescale is None else t * self.rescale.reshape(-1)

    def transformed_rows(self, v: torch.Tensor, multiplier: float) -> torch.Tensor:
        t = self.rotate_rows(v, multiplier)
        return t if self.rescale is None else t * self.rescale.reshape(-1, 1)

    # ----- forward and merge -----
    def adapted_forward(self, x, *args, **kwargs):
        return self.output_from(self._org_forward(x, *args, **kwargs))

    def output_from(self, y: torch.Tensor) -> torch.Tensor:
        """The adapted output from the layer's: W x rotated (the bias is not), the change m (T W x - W x)."""
        if self._dense_operator_pays(y):
            return self._dense_output(y)
        z = self.without_bias(y).to(self.wide_dtype())
        channel = self.spec.channel_axis(y.dim())
        z = z.movedim(channel, -1)
        d = (self.transformed(z, self.multiplier) - z).movedim(-1, channel)
        return y + (self._output_dropouts(d) * self.multiplier).to(y.dtype)

    def _dense_operator_pays(self, y: torch.Tensor) -> bool:
        """On a conv with a kernel > 1 the (out x out) operator is smaller than the weight and one pointwise
        conv with it costs less than the per-block passes (BOFT's stages above all)."""
        return (self.spec.is_conv and self.spec.kernel_numel > 1 and y.dtype == self.wide_dtype() and
                y.dim() == len(self.spec.kernel) + 2 and not self._dropouts_active())

    def operator(self, multiplier: float) -> torch.Tensor:
        """M = (1 - m) I + m diag(rescale) T as an (out x out) matrix: y' = M (y - b) + b."""
        eye = torch.eye(self.spec.out_dim, dtype=self.wide_dtype(), device=self.oft_blocks.device)
        return blend_with_identity(self.transformed_rows(eye, multiplier), multiplier)

    def _dense_output(self, y):
        op = self.operator(self.multiplier)
        bias = self.base_bias()
        const = None if bias is None else bias - op @ bias.to(op.dtype)
        return torch.nn.functional.conv1d(y.flatten(2), op.unsqueeze(-1), const).view_as(y) if y.dim() != 4 else \
            torch.nn.functional.conv2d(y, op[:, :, None, None], const)

    def delta_weight(self, multiplier=1.0):
        w = self.base_weight().to(self.wide_dtype())
        v = w.reshape(w.shape[0], -1)  # columns as vectors over the output channels
        return (self.transformed_rows(v, multiplier) - v).reshape(w.shape) * multiplier

    def _delta_weight(self):
        return self.delta_weight(1.0)

    # ----- saved form -----
    def tensors(self):
        with torch.no_grad():
            b = self.oft_blocks
            ratio = self._clamp_ratio(b - b.transpose(-1, -2))
        out = {"oft_blocks": self.oft_blocks * ratio}
        if self.rescale is not None:
            out["rescale"] = self.rescale
        return out

    def saved_alpha(self):
        """The bound; unconstrained, a bound just above the saved |Q|, because A1111 reads alpha = 0 as
        "rotate nothing". (ComfyUI clamps when |Q| + 1e-8 > alpha, so on a constrained file it shrinks Q by a
        relative 1e-8 / bound more: the one difference left between the loaders.)"""
        if self.bound > 0:
            return float(self.bound)
        b = self.oft_blocks
        if b.is_meta:  # a network built on the meta device holds no values: the alpha of untrained blocks (Q = 0)
            return _UNCONSTRAINED_FLOOR
        with torch.no_grad():
            return float(torch.linalg.vector_norm(b - b.transpose(-1, -2))) * (1 + 1e-6) + _UNCONSTRAINED_FLOOR

    def _load_alpha(self, saved):
        """Loaded weights keep the constraint this adapter was built with, as LyCORIS' and sd-scripts' modules keep
        their constructor's: a file's alpha is no training bound (an unconstrained adapter saves |Q| there, for
        A1111). An adapter built from a file alone takes the file's alpha as its bound (options_from_tensors)."""

    @classmethod
    def options_from_tensors(cls, spec, sd):
        alpha = float(sd["alpha"]) if "alpha" in sd else 0.0
        return {"dim": sd["oft_blocks"].shape[-1], "constraint": alpha / spec.out_dim, "rescaled": "rescale" in sd}
