"""The adapter contract and everything algorithms share.

An adapter wraps one layer. Its forward is the layer's own output plus the adapter's change, computed
"in bypass" (y = W x + m * dW x) through the factors whenever that is cheaper than rebuilding dW, so the base
weight is never copied and a low-precision base keeps the full-precision change. Each algorithm file holds only
its own math (`build`, `_delta_weight`, `delta_forward`, `tensors`, `options_from_tensors`); multiplier, scale,
scalar, DoRA, dropouts, merge/unmerge, dtype casts and the saved key layout live here, once.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, ClassVar, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from .dora import DoRA
from .fused_conv import conv_fusable, conv_plus_low_rank
from .fused_linear import fusable, gain_as_float, linear_plus_low_rank, plain_frozen_layer
from .layer import LayerSpec, TransposedLinear, describe_layer, is_transposed_linear, positions
from .options import AdapterOptions, OptionError, idle_options, parse_options
from .rebuilt_op import rebuilt_weight_op

COMMON_OPTIONS = frozenset({"multiplier", "module_dropout"})


def bias_changing_bypass(verb: str) -> dict[str, str]:
    """The refusal note of bypass_mode for an algorithm whose LyCORIS bypass mode also `verb`s the layer's bias."""
    return {"bypass_mode": f"LyCORIS' bypass mode for it also {verb} the layer's bias, which no UI applies; "
                           "lorakit trains what the UIs apply, never changes the base weight (an fp8 one included) "
                           "and computes through the factors where that is cheaper"}
LOW_RANK_OPTIONS = frozenset(
    {"dim", "alpha", "dropout", "rank_dropout", "rank_dropout_scale", "use_scalar", "dora_wd", "dora_axis",
     "bypass_mode", "rs_lora"}
)


class Adapter(DoRA, nn.Module):
    name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    keys: ClassVar[tuple[str, ...]] = ()  # every tensor name this algorithm may write to a file
    detect_keys: ClassVar[tuple[str, ...]] = ()  # any of these in a file means this algorithm
    optional_keys: ClassVar[tuple[str, ...]] = ()  # tensors a file may leave out (then zero: no change)
    layer_kinds: ClassVar[frozenset] = frozenset({"linear", "conv1d", "conv2d", "conv3d"})
    accepts: ClassVar[frozenset] = frozenset()  # options beyond COMMON_OPTIONS
    refusal_notes: ClassVar[dict[str, str]] = {}  # why an option that LyCORIS takes is refused here
    scalar_key: ClassVar[str | None] = None  # the file tensor that a trained scalar is folded into
    saves_alpha: ClassVar[bool] = True
    # Algorithms whose dropouts act on their own rank axis (LoRA) apply them inside delta_forward;
    # for the others the base drops channels of the delta output.
    dropout_on_output: ClassVar[bool] = True
    # Whether the output is affine in the multiplier (W + m dW); BOFT's is not (ComfyUI's per-stage blend)
    multiplier_is_affine: ClassVar[bool] = True
    # LoRA+: the output-side factors ("B") that train with a higher learning rate
    plus_params: ClassVar[tuple[str, ...]] = ()

    def __init__(self, layer: nn.Module, options: AdapterOptions | Mapping[str, Any] | None = None, **kwargs):
        super().__init__()
        if isinstance(options, AdapterOptions):
            if kwargs:
                raise TypeError("give either an AdapterOptions or keyword options, not both")
            given = frozenset(
                f for f in options.__dataclass_fields__ if getattr(options, f) != getattr(AdapterOptions(), f)
            )
        else:
            options, given = parse_options(options, **kwargs)
        self.spec: LayerSpec = describe_layer(layer)
        self._check_options(options, given)
        self.options = options
        # lists keep the layers out of this module's parameters. `layer` is what the math reads (a Linear view of a
        # transformers Conv1D), `host` the module in the model whose forward is routed and whose weights freeze
        self._host = [layer]
        self._layer = [TransposedLinear(layer) if is_transposed_linear(layer) else layer]
        self._org_forward = layer.forward
        self.multiplier = float(options.multiplier)
        self.rate = None  # the application-rate explorer's differentiable multiplier: a callable giving a 0-d tensor
        self.merged = False
        self._backup: tuple | None = None
        self.alpha = options.scale_alpha
        self.scale = 1.0
        self.scalar = nn.Parameter(torch.tensor(0.0)) if options.use_scalar else None
        self.build(options)
        self.dora_scale = nn.Parameter(self._initial_dora_scale()) if options.dora_wd else None
        ref = self._layer[0].weight
        self.to(device=ref.device)

    # ----- what each algorithm provides -------------------------------------------------------------------------
    def build(self, options: AdapterOptions) -> None:
        """Create the parameters; the change must be zero at initialisation where the method defines it."""
        raise NotImplementedError

    def _delta_weight(self) -> torch.Tensor:
        """dW with the scale applied, without scalar, multiplier or DoRA."""
        raise NotImplementedError

    def delta_forward(self, x: torch.Tensor) -> torch.Tensor:
        """dW x through the factors (scale applied, no bias); the fallback rebuilds dW."""
        return rebuilt_weight_op(self.spec, x, self._delta_weight, [p for p in self.parameters() if p.requires_grad])

    def low_rank_pair(self, x: torch.Tensor):
        """(down, up, gain, row mask or None) when dW = gain * up @ down exactly for this call, else None; gain is a
        float (folded into the fused products) or a tensor."""
        return None

    def fused_low_rank_pair(self, x: torch.Tensor):
        """low_rank_pair where a fused layer + low-rank pass applies to this call (a plain frozen Linear or conv, the
        factor path cheaper than rebuilding dW), else None. None while torch.compile traces: dynamo traces a custom
        autograd function's forward and backward as two subgraphs per module (281 of them doubled a small U-Net's
        trace time), and the compiler fuses the plain ops of the unfused path itself."""
        if torch.compiler.is_compiling():
            return None
        if fusable(self, x):
            return self.low_rank_pair(x) if self._use_factor_path(x) else None
        if conv_fusable(self, x) and not self._dropouts_active() and self._use_factor_path(x):
            return self.low_rank_pair(x)  # rank dropouts on a conv act on (n, rank, *spatial): the plain path
        return None

    def plus_low_rank(self, x: torch.Tensor, down: torch.Tensor, up: torch.Tensor, gain, mask: torch.Tensor | None,
                      in_scale: torch.Tensor | None = None) -> torch.Tensor:
        """The frozen layer's output plus gain * up @ down applied to x (to in_scale * x per input channel, if
        given), as one fused pass (a fused_low_rank_pair)."""
        up, gain = gain_as_float(up, gain)
        if self.spec.is_conv:
            if in_scale is not None:
                x = x * self.spec.channel_view(in_scale, x.dim())
            return conv_plus_low_rank(self, x, down, up, gain)
        return linear_plus_low_rank(self, x, down, up, gain, mask, in_scale)

    def factor_flops(self, n: int) -> float:
        """Multiply-adds of delta_forward for n output positions; inf where it has no factor path."""
        return math.inf

    def tensors(self) -> dict[str, torch.Tensor]:
        """The file tensors of this algorithm (scalar not yet folded, no alpha or dora_scale)."""
        raise NotImplementedError

    @staticmethod
    def file_alpha(sd: Mapping[str, torch.Tensor], dim: int) -> float:
        """A file's alpha; without one, alpha = dim (scale 1), as kohya and the UIs read old files."""
        return float(sd["alpha"]) if "alpha" in sd else dim

    @classmethod
    def options_from_tensors(cls, spec: LayerSpec, sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """The options that rebuild an adapter of these tensors' shapes."""
        raise NotImplementedError

    # ----- options ----------------------------------------------------------------------------------------------
    def _check_options(self, options: AdapterOptions, given: frozenset) -> None:
        if self.spec.kind not in self.layer_kinds:
            raise ValueError(f"algo '{self.name}' cannot adapt a {self.spec.kind} layer "
                             f"(it adapts: {', '.join(sorted(self.layer_kinds))})")
        allowed = COMMON_OPTIONS | self.accepts
        for name in sorted(given - allowed):
            raise OptionError(f"algo '{self.name}' does not accept option '{name}' "
                              f"(got {getattr(options, name)!r}); it accepts: {', '.join(sorted(allowed))}"
                              f"{self.refusal_note(name)}")
        for idle in idle_options(options, given):  # a network warns once: the text is the same on every layer
            warnings.warn(f"algo '{self.name}': {idle}", UserWarning, stacklevel=4)

    @classmethod
    def refusal_note(cls, name: str) -> str:
        note = cls.refusal_notes.get(name)
        return f". {note}" if note else ""

    def set_scale(self, dim: int, alpha: float) -> None:
        """scale = alpha / dim, or alpha / sqrt(dim) with rs_lora (saved so that alpha / dim gives it)."""
        self.alpha = float(alpha)
        self.scale = self.alpha / (math.sqrt(dim) if self.options.rs_lora else dim)
        self._scale_dim = dim

    # ----- helpers for algorithms ------------------------------------------------------------------------------
    @property
    def layer(self) -> nn.Module:
        return self._layer[0]

    @property
    def host(self) -> nn.Module:
        """The module in the model: the layer itself, or the Conv1D that ``layer`` views as a Linear."""
        return self._host[0]

    @property
    def dtype(self) -> torch.dtype:
        for p in self._parameters.values():  # read on every call: the module's own dict before a full walk
            if p is not None:
                return p.dtype
        for p in self.parameters():
            return p.dtype
        return torch.float32

    def wide_dtype(self) -> torch.dtype:
        """The dtype of the terms that hold the base weight or output itself (DoRA's |W + dW|, a rotation of W x):
        the wider of the layer's and the adapter's, so that a float32 adapter's change is not rounded to a
        half-precision layer, nor a float32 layer's W to a half-precision adapter (LyCORIS computes W + dW in the
        layer's dtype). A float8 weight, which torch does not promote, is read in the adapter's dtype."""
        weight = self.layer.weight.dtype
        return self.dtype if weight.itemsize == 1 else torch.promote_types(weight, self.dtype)

    def base_weight(self) -> torch.Tensor:
        return self.layer.weight.detach()

    def base_bias(self) -> torch.Tensor | None:
        bias = getattr(self.layer, "bias", None)
        return None if bias is None else bias.detach()

    def without_bias(self, y: torch.Tensor) -> torch.Tensor:
        """The layer output less its bias: W x, the part that rotations and rescalings act on."""
        bias = self.base_bias()
        return y if bias is None else y - self.spec.channel_view(bias, y.dim())

    def org_with_input_change(self, x: torch.Tensor, u: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The layer applied to x + u. When the adapter computes in a wider dtype than the layer, x + u would
        round u away, so W u is computed on its own from the layer's weight."""
        if u.dtype == x.dtype:
            return self._org_forward(x + u, *args, **kwargs)
        y = self._org_forward(x, *args, **kwargs)
        w = self.base_weight()
        return y + self.spec.op(u.to(w.dtype), w).to(y.dtype)

    def plus_parameters(self) -> list[nn.Parameter]:
        """The parameters LoRA+ gives the higher learning rate (empty where the algorithm has no B factor)."""
        return [p for n, p in self.named_parameters() if n in self.plus_params]

    def _scalar(self):
        return 1.0 if self.scalar is None else self.scalar

    # ----- forward ----------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.rate is not None and not self.merged:
            return self._rated_forward(x, *args, **kwargs)
        if self.merged or self.multiplier == 0 or self._module_dropped():
            return self._org_forward(x, *args, **kwargs)
        if self.prefers_merged_weight(x) and not args and not kwargs and not self._dropouts_active() and \
                plain_frozen_layer(self, x):
            return self.merged_weight_forward(x)
        return self.adapted_forward(x, *args, **kwargs)

    def _rated_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The output at multiplier r x multiplier with a gradient for r = ``rate()``. Where the output is affine in
        the multiplier (W + m dW, the UIs' DoRA and OFT included) that is y0 + r (y - y0), with y0 the layer's own
        output and y the adapted one (additive algorithms give y - y0 directly); otherwise (BOFT) the adapted
        forward runs with the multiplier as a tensor."""
        r = self.rate()
        if not self.multiplier_is_affine:
            multiplier = self.multiplier
            self.multiplier = r * multiplier
            try:
                return self.adapted_forward(x, *args, **kwargs)
            finally:
                self.multiplier = multiplier
        y0 = self._org_forward(x, *args, **kwargs)
        if self.multiplier == 0:
            return y0
        if self.dora_scale is None and type(self).adapted_forward is Adapter.adapted_forward:
            change = self._delta(x.to(self.dtype)) * (self.multiplier * self._scalar())
        else:
            change = self.adapted_forward(x, *args, **kwargs) - y0
        return y0 + (r * change).to(y0.dtype)

    def prefers_merged_weight(self, x: torch.Tensor) -> bool:
        """Whether the layer run once with W + dW (dW rebuilt again in backward, never kept) costs less than the
        layer plus the change computed apart: where the change's own forward is expensive per position and the
        call has more positions than the weight has columns (rebuilding treats those columns as positions).
        DoRA along output rows rescales every output channel apart from the change: merged where that pays."""
        return self.dora_scale is not None and self.options.dora_axis == "out" and self.many_positions(x)

    def many_positions(self, x: torch.Tensor) -> bool:
        """A call with many more positions than input columns on a Linear or a pointwise conv: there the merged
        weight's extra gradient product costs less than activation passes (on a conv with a kernel it costs a whole
        convolution: never)."""
        return self.spec.is_pointwise and positions(self.spec, x) >= 2 * self.spec.fan_in

    def _dropouts_active(self) -> bool:
        return self.training and bool(self.options.dropout or self.options.rank_dropout)

    def merged_weight_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dora_scale is not None:
            fused = self._dora_rows_fused(x)
            if fused is not None:
                return fused
        layer = self.layer

        def weight():
            return layer.weight + self.delta_weight(self.multiplier)

        bias = layer.bias
        db = self.delta_bias(self.multiplier)
        if db is not None:  # the bias change trains through autograd; only the weight is rebuilt
            bias = db if bias is None else bias + db
        params = [p for p in self.parameters() if p.requires_grad]
        return rebuilt_weight_op(self.spec, x, weight, params, bias)

    def _module_dropped(self) -> bool:
        p = self.options.module_dropout
        return self.training and p > 0 and torch.rand(()).item() < p

    def adapted_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """y = W x + b + m * dW x (DoRA: the UIs' W + m (D - W)); multiplicative algorithms override this."""
        if self.dora_scale is not None:
            return self._dora_forward(x, *args, **kwargs)
        pair = None if args or kwargs else self.fused_low_rank_pair(x)
        if pair is not None:
            down, up, gain, mask = pair
            return self.plus_low_rank(x, down, up, gain * self.multiplier * self._scalar(), mask)
        y = self._org_forward(x, *args, **kwargs)
        d = self._output_dropouts(self._delta(x.to(self.dtype)))
        return y + (d * (self.multiplier * self._scalar())).to(y.dtype)

    def _use_factor_path(self, x: torch.Tensor) -> bool:
        if not self.dropout_on_output and self._dropouts_active():
            return True  # rank-axis dropouts exist only between the factors, whatever bypass_mode says
        if self.options.bypass_mode is not None:
            return self.options.bypass_mode and self.factor_flops(1) != math.inf
        n = positions(self.spec, x)
        rebuild = self.rebuild_flops() + n * math.prod(self.spec.weight_shape)
        return self.factor_flops(n) <= rebuild

    def rebuild_flops(self) -> float:
        """Multiply-adds to rebuild dW (default: as many as a rank-dim product would take)."""
        return math.prod(self.spec.weight_shape) * getattr(self, "_scale_dim", 1)

    def _delta(self, x: torch.Tensor) -> torch.Tensor:
        if self._use_factor_path(x):
            return self.delta_forward(x)
        return Adapter.delta_forward(self, x)

    def _output_dropouts(self, d: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.dropout_on_output):
            return d
        o = self.options
        if o.rank_dropout:
            d = d * self.channel_mask(d, o.rank_dropout)
        if o.dropout:
            d = F.dropout(d, o.dropout, training=True)
        return d

    def channel_mask(self, d: torch.Tensor, p: float, channels: int | None = None) -> torch.Tensor:
        """A per-sample keep mask over the channels of `d` (or over `channels` rank components), rescaled to
        mean 1 when rank_dropout_scale is set (the LyCORIS convention)."""
        channel_dim = self.spec.channel_axis(d.dim())
        c = d.shape[channel_dim] if channels is None else channels
        batch = d.shape[0] if channel_dim > 0 else 1  # an unbatched input is one sample
        mask = self.keep_mask(batch, c, p, d)
        shape = [1] * d.dim()
        shape[channel_dim] = c
        if channel_dim > 0:
            shape[0] = batch
        return mask.reshape(shape)

    def keep_mask(self, rows: int, c: int, p: float, like: torch.Tensor) -> torch.Tensor:
        """(rows, c) draws that keep each entry with probability 1 - p (in `like`'s dtype and device), each row
        rescaled to mean 1 when rank_dropout_scale is set."""
        mask = (torch.rand(rows, c, device=like.device) >= p).to(like.dtype)
        if self.options.rank_dropout_scale:
            mask = mask / mask.mean(dim=1, keepdim=True).clamp_min(1.0 / c)
        return mask

    # ----- the change as the UIs apply it ----------------------------------------------------------------------
    def delta_weight(self, multiplier: float = 1.0) -> torch.Tensor:
        """The change of the layer weight at this multiplier, as ComfyUI and A1111 add it (DoRA's in wide_dtype)."""
        dw = self._delta_weight() * self._scalar()
        if self.dora_scale is None:
            return dw * multiplier
        w = self.base_weight().to(self.wide_dtype())
        summed = w + dw.to(w.dtype)
        return (summed * (self.dora_scale / self._axis_norm(summed)) - w) * multiplier

    def delta_bias(self, multiplier: float = 1.0) -> torch.Tensor | None:
        return None

    @torch.no_grad()
    def merge(self, multiplier: float | None = None, keep_backup: bool = True) -> None:
        """Add the change into the layer's weight (and bias); `unmerge()` puts the original back exactly."""
        if self.merged:
            raise RuntimeError(f"{self.name} adapter is already merged")
        refusal = self.merge_refusal()
        if refusal is not None:
            raise ValueError(f"merge: {refusal}")
        m = self.multiplier if multiplier is None else float(multiplier)
        layer = self.layer
        dw, db = self.delta_weight(m), self.delta_bias(m)
        bias = getattr(layer, "bias", None)
        self._backup = (layer.weight.detach().clone(), None if bias is None else bias.detach().clone(),
                        bias is None) if keep_backup else None
        w = layer.weight
        w.copy_((w.to(torch.promote_types(w.dtype, dw.dtype)) + dw.to(w.device)).to(w.dtype))
        if db is not None:
            if bias is None:
                layer.bias = nn.Parameter(db.to(w.device, w.dtype), requires_grad=False)
            else:
                bias.copy_((bias.to(torch.promote_types(bias.dtype, db.dtype)) + db.to(bias.device)).to(bias.dtype))
        self.merged = True

    def merge_refusal(self) -> str | None:
        """Why the change cannot be merged into this layer, or None. A weight that a parametrization (weight_norm,
        spectral_norm) computes on each access is a new tensor each time: a write into it is lost, and no weight
        of the parametrization's own gives W + dW in general."""
        host = self.host
        computed = [n for n in ("weight", "bias") if parametrize.is_parametrized(host, n)]
        computed += [hook.name for hook in host._forward_pre_hooks.values()
                     if isinstance(hook, (WeightNorm, SpectralNorm)) and hook.name in ("weight", "bias")]
        if "bias" in computed and self.delta_bias() is None:  # the bias is not written: asked only in this rare case
            computed.remove("bias")
        if not computed:
            return None
        return (f"{self.name} adapter on {type(host).__name__} {tuple(self.spec.weight_shape)}: its "
                f"{' and '.join(computed)} is computed by a parametrization (weight_norm/spectral_norm) on each "
                "access, so a merged change would be lost. Remove the parametrization first "
                "(torch.nn.utils.parametrize.remove_parametrizations, nn.utils.remove_weight_norm), or keep the "
                "network applied")

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            raise RuntimeError(f"{self.name} adapter is not merged")
        if self._backup is None:
            raise RuntimeError(f"{self.name} adapter was merged with keep_backup=False and cannot be unmerged")
        weight, bias, had_no_bias = self._backup
        self.layer.weight.copy_(weight)
        if had_no_bias:
            self.layer.bias = None
        elif bias is not None:
            self.layer.bias.copy_(bias)
        self._backup = None
        self.merged = False

    # ----- applying to the layer --------------------------------------------------------------------------------
    def apply(self, fn=None, *, hooks: bool = False) -> "Adapter":
        """Route the layer's forward through this adapter (stacks on an adapter already applied). ``hooks``:
        through the module call, so that this adapter's forward hooks run (DeepSpeed ZeRO-3 gathers the
        adapter's partitioned parameters in one); by default straight to forward, which is faster.
        ``fn``: torch's Module.apply (fn on every submodule), which this name shadows; libraries call it."""
        if fn is not None:
            return super().apply(fn)
        # The layer's own weight and bias are frozen while it is adapted: every path treats them as constants
        # (a trainable bias would get a wrong gradient through IA3/OFT, and each step would fill a weight-sized
        # .grad); restore() gives back their requires_grad.
        host = self.host
        # recursing: a parametrization keeps the weight's parameters in a submodule (parametrizations.weight)
        self._layer_requires_grad = {n: p.requires_grad for n, p in host.named_parameters()}
        host.requires_grad_(False)
        self._org_forward = host.forward
        self._routed = self.__call__ if hooks else self.forward
        host.forward = self._routed
        return self

    def restore(self) -> None:
        layer = self.host
        if layer.__dict__.get("forward") != getattr(self, "_routed", self.forward):
            raise RuntimeError(f"{self.name} adapter is not the last one applied to this layer: restore in reverse order")
        if getattr(self._org_forward, "__self__", None) is layer and self._org_forward.__func__ is type(layer).forward:
            del layer.forward  # back to the class's own forward
        else:
            layer.forward = self._org_forward
        for name, flag in getattr(self, "_layer_requires_grad", {}).items():
            try:
                layer.get_parameter(name).requires_grad_(flag)
            except AttributeError:  # removed since apply (a parametrization taken off, a bias set to None)
                pass

    # ----- saved form -------------------------------------------------------------------------------------------
    def saved_tensors(self) -> dict[str, torch.Tensor]:
        """The file tensors: the scalar folded in, alpha such that loaders computing alpha / dim get the scale."""
        out = dict(self.tensors())
        if self.scalar is not None and self.scalar_key is not None:
            out[self.scalar_key] = out[self.scalar_key] * self.scalar
        if self.saves_alpha:
            out["alpha"] = torch.tensor(self.saved_alpha(), dtype=self.dtype)
        if self.dora_scale is not None:
            out["dora_scale"] = self.dora_scale
        return out

    def saved_alpha(self) -> float:
        return self.scale * getattr(self, "_scale_dim", 1)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for key, t in self.saved_tensors().items():
            destination[prefix + key] = t if keep_vars else t.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        mine = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        expected = self.saved_tensors()
        for key in expected:
            if key in self.optional_keys and key not in mine:
                with torch.no_grad():
                    self._param_for_key(key).zero_()  # absent means no change (full's diff_b, as the UIs read it)
            elif key not in mine and key != "alpha":  # no alpha: alpha = dim, as kohya and the UIs read old files
                missing_keys.append(prefix + key)
        for key in mine:
            if key not in expected:
                unexpected_keys.append(prefix + key)
        with torch.no_grad():
            for key, value in mine.items():
                if key not in expected:
                    continue
                if key == "alpha":
                    self._load_alpha(float(value))
                    continue
                target = self._param_for_key(key)
                if target.shape != value.shape and value.numel() == target.numel() and value.dim() and \
                        value.shape[0] == target.shape[0]:
                    value = value.reshape(target.shape)  # e.g. a conv's lora_up saved as (out, dim), as UIs accept
                if target.shape != value.shape:
                    error_msgs.append(f"{prefix}{key}: file has shape {tuple(value.shape)}, "
                                      f"this adapter expects {tuple(target.shape)}")
                    continue
                target.copy_(value.to(target.dtype))
            if self.scalar is not None and self.scalar_key in mine:
                self.scalar.fill_(1.0)  # the file's tensor already holds the scalar

    def _load_alpha(self, saved: float) -> None:
        dim = getattr(self, "_scale_dim", 1)
        self.scale = saved / dim
        self.alpha = saved / math.sqrt(dim) if self.options.rs_lora else saved

    def _param_for_key(self, key: str) -> torch.Tensor:
        if key == "dora_scale":
            return self.dora_scale
        return getattr(self, key.replace(".weight", "").replace(".", "_"))

    @classmethod
    def from_state_dict(cls, layer: nn.Module, sd: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None,
                        **options) -> "Adapter":
        """Build the adapter that these tensors describe (dims, factors, Tucker, DoRA from the shapes) and load
        them. `sd` holds one module's tensors without the name prefix; `dtype` defaults to theirs."""
        spec = describe_layer(layer)
        inferred = cls.options_from_tensors(spec, sd)
        if "dora_scale" in sd:
            inferred.update(dora_wd=True, dora_axis=saved_dora_axis(spec, sd["dora_scale"]))
        inferred.update(options)
        adapter = cls(layer, **inferred)
        if dtype is None:
            dtype = next((t.dtype for t in sd.values() if t.is_floating_point()), torch.float32)
        adapter.to(dtype=dtype)
        adapter.load_state_dict(dict(sd), strict=True)
        return adapter

    def extra_repr(self) -> str:
        return f"{self.spec.kind} {self.spec.weight_shape}, multiplier={self.multiplier}"


def saved_dora_axis(spec: LayerSpec, dora_scale: torch.Tensor) -> str:
    """The DoRA axis of a saved dora_scale: output rows (out, 1, ..) or input columns (1, in, ..). On a layer with
    one output channel a (1, 1, ..) scale is its rows unless the layer also has one input channel (ComfyUI reads
    shape[0] == out as rows too); there both axes take the same norm, and the default axis (columns) is kept."""
    shape = tuple(dora_scale.shape)
    rows = len(shape) > 1 and shape[0] == spec.out_dim and shape[1] == 1
    columns = len(shape) > 1 and shape[0] == 1 and shape[1] == spec.in_dim
    return "out" if rows and not columns else "in"
