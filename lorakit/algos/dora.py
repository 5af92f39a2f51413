"""DoRA (weight decomposition) for the low-rank adapters: W' = g * (W + dW) / |W + dW| along one axis.

Along input columns (`dora_axis="in"`, the form ComfyUI and A1111 both apply) the forward scales the input
channels instead of the weight: (W + dW) diag(r) x == (W + dW)(r * x). Along output rows it rescales the
output channels. The UIs' multiplier: W + m (D - W).
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from .fused_conv import conv_fusable, conv_plus_low_rank, merged_pays
from .fused_linear import fusable, gain_as_float, linear_plus_low_rank

# The fused rows path recovers the ratio's gradient by dividing by it; below this it would lose precision.
_MIN_ROW_RATIO = 0.05


class DoRA:
    """Mixed into Adapter; active when the adapter has a `dora_scale` parameter."""

    def _axis_norm(self, w: torch.Tensor) -> torch.Tensor:
        """Norm of each input column ('in', dora_scale shape (1, in, 1..)) or output row ('out', (out, 1, 1..))."""
        if self.options.dora_axis == "out":
            return torch.linalg.vector_norm(w.reshape(w.shape[0], -1), dim=1).reshape(w.shape[0], *([1] * (w.dim() - 1)))
        dims = [0] + list(range(2, w.dim()))
        return torch.linalg.vector_norm(w, dim=dims, keepdim=True)

    def _initial_dora_scale(self) -> torch.Tensor:
        w = self.base_weight()
        return self._axis_norm(w.to(torch.promote_types(w.dtype, torch.float32)))

    def dora_norm(self) -> torch.Tensor:
        """|W + dW| along the DoRA axis, shaped like dora_scale. Generic form: dW is rebuilt, and rebuilt again in
        backward instead of keeping a weight-sized tensor; LoRA overrides it with a closed form."""
        w, dtype = self.base_weight(), self.wide_dtype()

        def norm():  # W cast inside: checkpoint then keeps no weight-sized copy for backward
            return self._axis_norm(w.to(dtype) + (self._delta_weight() * self._scalar()).to(dtype))

        return checkpoint(norm, use_reentrant=False) if torch.is_grad_enabled() else norm()

    def _dora_ratio(self) -> torch.Tensor:
        """dora_scale / |W + dW| along the DoRA axis, in wide_dtype."""
        return self.dora_scale / self.dora_norm()

    def _dora_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        m = self.multiplier
        r = self._dora_ratio()
        if self.options.dora_axis == "in":
            # (W + dW) diag(r) x == (W + dW)(r * x): scale the input channels instead of the weight.
            fused = self._dora_fused(x, r.reshape(-1), m)
            if fused is not None:
                return fused
            c = self.spec.channel_view(r.reshape(-1), x.dim())
            xw = x.to(r.dtype)
            y = self.org_with_input_change(x, xw * (m * (c - 1)), *args, **kwargs)
            d = self._output_dropouts(self._delta((xw * c).to(self.dtype)))
            return y + (d * (m * self._scalar())).to(y.dtype)
        fused = None if args or kwargs else self._dora_rows_fused(x, r)
        if fused is not None:
            return fused
        y = self._org_forward(x, *args, **kwargs)
        z = self.without_bias(y).to(r.dtype)
        rv = self.spec.channel_view(r.reshape(-1), y.dim())
        d = self._output_dropouts(self._delta(x.to(self.dtype)))
        return y + (m * ((rv - 1) * z + rv * d * self._scalar())).to(y.dtype)

    def _dora_fused(self, x, c, m):
        """W (k x) + b + m dW (c x) with k = 1 + m (c - 1) per input channel, as one fused pass:
        dW (c x) = up (down diag(c / k)) (k x)."""
        pair = self.fused_low_rank_pair(x)  # None while compiling, as the check below reads values
        if pair is None:
            return None
        k = c if m == 1 else 1 + m * (c - 1)
        if bool((k.abs() < 1e-4).any()):
            return None
        down, up, gain, mask = pair
        if m != 1:
            rank, spec = down.shape[0], self.spec
            down = (down.reshape(rank, spec.in_dim, -1) * (c / k)[:, None]).reshape(down.shape)
        return self.plus_low_rank(x, down, up, gain * m * self._scalar(), mask, in_scale=k)

    def _dora_rows_fused(self, x, r=None):
        """Along output rows at multiplier 1, on a plain frozen Linear on a CPU: y = x (diag(r) (W + s U D))^T + b
        with r = dora_scale / |W + s U D| per row, as one fused function: on many positions one GEMM each way with
        the pair merged (its gradient from the factors' thin products, not a weight-sized product of the output
        gradient and the input), on fewer the layer's GEMM plus the pair's thin products, scaled by r (Linear
        768->320 on 154 positions: ~2.4x the frozen layer through separate ops, see bench/RESULTS.md for this).
        A frozen conv on a call where the merged weight pays (fused_conv.merged_pays): one convolution each way
        with diag(r) (W + s U D), r's gradient read off the output (Conv2d 320 k3 on (2, 320, 64, 64), in-process
        A/B: see bench/RESULTS.md). r: the ratio if the caller has it. None where that does not apply. The CPU
        only: the ratio check reads its values."""
        if self.options.dora_axis != "out" or self.multiplier != 1 or x.device.type != "cpu" or \
                torch.compiler.is_compiling():  # the ratio check would break the graph
            return None
        linear = fusable(self, x)
        if not linear and not (conv_fusable(self, x) and merged_pays(self.spec, x)):
            return None
        pair = self.low_rank_pair(x)
        if pair is None or (pair[3] is not None and not linear):
            return None
        down, up, gain, mask = pair
        r = (self._dora_ratio() if r is None else r).reshape(-1)
        if not bool((r.detach().abs() >= _MIN_ROW_RATIO).all()):
            return None
        up, gain = gain_as_float(up, gain * self._scalar())
        if not linear:
            return conv_plus_low_rank(self, x, down, up, gain, out_scale=r)
        return linear_plus_low_rank(self, x, down.flatten(1), up.flatten(1), gain, mask, out_scale=r)
