"""Interop with the lycoris-lora package (a test dependency): a file that lorakit saves gives the same forward in
LyCORIS, and a file that LyCORIS saves gives the same forward in lorakit, for every algorithm both have.

LyCORIS runs in its default (weight-rebuild) mode: its math there is the one the UIs apply (its bypass mode rotates
or scales the layer bias for OFT/BOFT/(IA)^3, which neither the UIs nor lorakit do). Where LyCORIS is known to
disagree with the UIs (LoHa/LoKr merge at scale^2; OFT/BOFT trained with constraint * out_dim but saved as
constraint), the tests pin the LyCORIS behaviour and check lorakit against the UIs' formula (ui_reference.py).

Everything runs in float32: LyCORIS' OFT/BOFT fail in float64 ((I - Q).float().inverse()), and its
make_module_from_state_dict builds float32 parameters whatever the file holds.
"""

from __future__ import annotations

import copy
import os
import random
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

# LyCORIS picks a kernel backend per op; force its plain eager reference bodies (CPU would pick them anyway,
# but this keeps torch.compile and the first-call tuner out of the test whatever the machine).
os.environ["LYCORIS_KERNEL_BACKEND"] = "torch"
os.environ.setdefault("LYCORIS_KERNEL_TUNE", "off")
pytest.importorskip("lycoris")

from lycoris.modules import (  # noqa: E402
    ButterflyOFTModule, DiagOFTModule, DyLoraModule, FullModule, GLoRAModule, IA3Module, LoConModule, LohaModule,
    LokrModule, NormModule, get_module, make_module,
)

from lorakit.algos import adapter_from_state_dict, algorithm, make_adapter  # noqa: E402

from .ui_reference import ui_delta  # noqa: E402

IN, OUT = 24, 16  # 16 outputs split into OFT blocks of 4 and BOFT 4x4 (3 stages); 24 = 4 x 6 for LoKr
LAYERS = {
    "linear": (lambda: nn.Linear(IN, OUT), (3, 5, IN)),
    "conv2d": (lambda: nn.Conv2d(IN, OUT, 3, padding=1), (2, IN, 6, 6)),
    "conv1d": (lambda: nn.Conv1d(IN, OUT, 3, padding=1), (2, IN, 10)),
    "layernorm": (lambda: nn.LayerNorm(OUT), (3, 5, OUT)),
    "groupnorm": (lambda: nn.GroupNorm(4, OUT), (2, OUT, 4, 4)),
}
ALL = ("linear", "conv2d", "conv1d")
LIN_CONV = ("linear", "conv2d")
CONVS = ("conv2d", "conv1d")


@dataclass(frozen=True)
class Case:
    id: str
    algo: str
    # Options in LyCORIS' spelling: its constructor takes them, and lorakit takes them too (kohya/LyCORIS names).
    opts: dict
    lyco: type
    layers: tuple = ALL
    # Multipliers at which both define the output the same way (see the cases that leave 0.7 out).
    mults: tuple = (1.0, 0.7)
    # How LyCORIS reads a lorakit file: "factory" = get_module + make_module (what create_lycoris_from_weights
    # does); "ctor" = constructor with the file's alpha + load_state_dict, where the factory is broken.
    load: str = "factory"


CASES = [
    Case("lora", "lora", dict(lora_dim=4, alpha=2.0), LoConModule),
    Case("lora-tucker", "lora", dict(lora_dim=4, alpha=2.0, use_tucker=True), LoConModule, CONVS),
    Case("lora-rs", "lora", dict(lora_dim=4, alpha=2.0, rs_lora=True), LoConModule, ("linear",)),
    Case("lora-scalar", "lora", dict(lora_dim=4, alpha=2.0, use_scalar=True), LoConModule, LIN_CONV),
    # DoRA: LyCORIS blends only the magnitude with the multiplier (W+dW)(m(s-1)+1), the UIs W + m((W+dW)s - W):
    # they agree at 1 only.
    Case("lora-dora-out", "lora", dict(lora_dim=4, alpha=2.0, weight_decompose=True, wd_on_out=True), LoConModule,
         LIN_CONV, (1.0,)),
    # The factory does not infer wd_on_out (it always builds a per-row dora_scale), so a column one needs the ctor.
    Case("lora-dora-in", "lora", dict(lora_dim=4, alpha=2.0, weight_decompose=True, wd_on_out=False), LoConModule,
         LIN_CONV, (1.0,), "ctor"),
    # lorakit saves DyLoRA as the LoRA of its full rank: LyCORIS reads it as LoCon (its own DyLoRA files: below).
    Case("dylora", "dylora", dict(lora_dim=4, alpha=2.0, block_size=2), LoConModule, LIN_CONV),
    Case("loha", "loha", dict(lora_dim=4, alpha=2.0), LohaModule),
    Case("loha-tucker", "loha", dict(lora_dim=4, alpha=2.0, use_tucker=True), LohaModule, CONVS),
    Case("loha-dora-out", "loha", dict(lora_dim=4, alpha=2.0, weight_decompose=True, wd_on_out=True), LohaModule,
         LIN_CONV, (1.0,)),
    Case("loha-dora-in", "loha", dict(lora_dim=4, alpha=2.0, weight_decompose=True, wd_on_out=False), LohaModule,
         LIN_CONV, (1.0,), "ctor"),
    # LoKr on 16 x 24: factor -1 gives w1 4x4, w2 4x6 (low rank for dim 2)
    Case("lokr", "lokr", dict(lora_dim=2, alpha=1.0), LokrModule),
    Case("lokr-factor2", "lokr", dict(lora_dim=2, alpha=1.0, factor=2), LokrModule, LIN_CONV),
    Case("lokr-decompose-both", "lokr", dict(lora_dim=1, alpha=0.5, factor=8, decompose_both=True), LokrModule,
         LIN_CONV),
    Case("lokr-full-matrix", "lokr", dict(lora_dim=2, alpha=1.0, full_matrix=True), LokrModule, LIN_CONV),
    Case("lokr-dim-too-large", "lokr", dict(lora_dim=8, alpha=2.0), LokrModule, ("linear",)),  # w2 full: scale 1
    Case("lokr-unbalanced", "lokr", dict(lora_dim=2, alpha=1.0, factor=2, unbalanced_factorization=True),
         LokrModule, ("linear",), load="ctor"),  # the factory cannot infer an unbalanced split
    # The factory takes w2_a.size(1) (= out_k for Tucker) as the rank and fails on Tucker convs.
    Case("lokr-tucker", "lokr", dict(lora_dim=2, alpha=1.0, use_tucker=True), LokrModule, CONVS, load="ctor"),
    Case("lokr-scalar", "lokr", dict(lora_dim=2, alpha=1.0, use_scalar=True), LokrModule, ("linear",)),
    Case("lokr-dora-in", "lokr", dict(lora_dim=2, alpha=1.0, weight_decompose=True, wd_on_out=False), LokrModule,
         LIN_CONV, (1.0,), "ctor"),
    # (IA)^3: the factory passes (weight, on_input) to a one-tensor signature (TypeError): ctor.
    Case("ia3", "ia3", dict(), IA3Module, load="ctor"),
    Case("ia3-on-input", "ia3", dict(train_on_input=True), IA3Module, load="ctor"),
    Case("glora", "glora", dict(lora_dim=4, alpha=2.0), GLoRAModule),
    Case("glora-scalar", "glora", dict(lora_dim=4, alpha=2.0, use_scalar=True), GLoRAModule, ("linear",)),
    Case("glora-bypass", "glora", dict(lora_dim=4, alpha=2.0, bypass_mode=True), GLoRAModule, LIN_CONV),
    Case("diag-oft", "diag-oft", dict(lora_dim=4), DiagOFTModule),
    Case("diag-oft-constrained", "diag-oft", dict(lora_dim=4, constraint=0.01), DiagOFTModule, LIN_CONV),
    # rescaled: LyCORIS scales the interpolated weight, rescale (W + m (R^T W - W)); lorakit (and the UIs' linear
    # multiplier) W + m (rescale R^T W - W): the same at 1 only.
    Case("diag-oft-rescaled", "diag-oft", dict(lora_dim=4, rescaled=True), DiagOFTModule, LIN_CONV, (1.0,)),
    Case("boft", "boft", dict(lora_dim=4), ButterflyOFTModule),
    Case("boft-constrained", "boft", dict(lora_dim=4, constraint=0.01), ButterflyOFTModule, LIN_CONV),
    Case("boft-rescaled", "boft", dict(lora_dim=4, rescaled=True), ButterflyOFTModule, LIN_CONV),
    Case("full", "full", dict(), FullModule, LIN_CONV),
    Case("norm", "norm", dict(), NormModule, ("layernorm", "groupnorm")),
]


def params(cases):
    return [pytest.param(c, kind, id=f"{c.id}-{kind}") for c in cases for kind in c.layers]


# ----- helpers ------------------------------------------------------------------------------------------------------
def make_layer(kind, seed=0):
    torch.manual_seed(seed)
    layer = LAYERS[kind][0]()
    with torch.no_grad():
        if isinstance(layer, (nn.LayerNorm, nn.GroupNorm)):
            layer.weight.uniform_(0.5, 1.5)
            layer.bias.normal_()
    return layer.requires_grad_(False)


def make_input(kind, seed=1):
    torch.manual_seed(seed)
    return torch.randn(LAYERS[kind][1])


@torch.no_grad()
def randomize(module, seed=2):
    """Move every parameter (lorakit's or LyCORIS') off its initial value, to moderate nonzero values."""
    torch.manual_seed(seed)
    for name, p in module.named_parameters():
        if "dora_scale" in name or "rescale" in name:
            p.mul_(1 + 0.3 * torch.rand_like(p))
        elif name == "scalar":
            p.fill_(0.8)
        else:
            p.add_(0.3 * torch.randn_like(p))
    return module.eval()


def assert_same(actual, expected, msg=""):
    scale = float(expected.abs().max())
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5 * scale, msg=lambda m: f"{msg}\n{m}")


def assert_differs(a, b, what):
    err = float((a - b).abs().max())
    assert err > 1e-2 * float(b.abs().max()), f"{what}: expected a clear difference, got max |diff| {err:.3g}"


def plain(sd):
    return {k: v.detach().clone() for k, v in sd.items()}


def lycoris_from_lorakit_file(case, layer, sd):
    if case.load == "factory":
        prefixed = {f"lyco.{k}": v for k, v in sd.items()}
        cls, weights = get_module(prefixed, "lyco")
        assert cls is case.lyco, f"LyCORIS detects {cls} from lorakit's keys {sorted(sd)}"
        module = make_module(cls, weights, "lyco", layer)
    else:
        kwargs = dict(case.opts)
        if "alpha" in sd:  # LyCORIS computes its scale from the constructor's alpha only, never from a loaded one
            kwargs["alpha"] = float(sd["alpha"])
        module = case.lyco("lyco", layer, **kwargs)
        module.load_state_dict(sd)  # strict
    return module.eval()


def lycoris_saved_file(module):
    if isinstance(module, FullModule):
        # LyCORIS' Full saves diff = weight - W, right only after apply_to() has folded W into weight
        # (before it, the saved diff is off by -W). apply_to() also takes the weight off the layer: give it a copy.
        module.apply_to()
    return plain(module.state_dict())


def ui_forward(layer, sd, x, strength):
    """The layer with the weight (and bias) change a UI computes from the file alone, in float64."""
    dw, db = ui_delta(sd, layer.weight, strength)
    w = layer.weight.double() + dw
    b = None if layer.bias is None else layer.bias.double() + (0 if db is None else db)
    x = x.double()
    if isinstance(layer, nn.Linear):
        return F.linear(x, w, b)
    conv = {3: F.conv1d, 4: F.conv2d}[w.dim()]
    return conv(x, w, b, layer.stride, layer.padding, layer.dilation)


def from_lycoris(case, m, y_base, y_lyco):
    """What lorakit outputs when LyCORIS outputs y_lyco at multiplier m."""
    if case.algo == "boft" and m != 1:
        # Both pull every butterfly stage toward I (m R + (1 - m) I); ComfyUI (the one UI with BOFT) and lorakit
        # also scale the resulting change by m, LyCORIS does not.
        return y_base + m * (y_lyco - y_base)
    return y_lyco


# ----- lorakit file -> LyCORIS ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("case,kind", params(CASES))
def test_lorakit_file_gives_the_same_forward_in_lycoris(case, kind):
    layer, x = make_layer(kind), make_input(kind)
    adapter = randomize(make_adapter(case.algo, layer, **case.opts))
    sd = plain(adapter.state_dict())
    lyco = lycoris_from_lorakit_file(case, copy.deepcopy(layer), sd)
    if case.lyco in (DiagOFTModule, ButterflyOFTModule):
        # LyCORIS quirk: its factory multiplies the saved alpha by out_dim again. lorakit saves blocks already
        # inside the bound alpha (what ComfyUI applies), so the looser LyCORIS bound leaves them unchanged.
        assert lyco.constraint == pytest.approx(float(sd["alpha"]) * OUT)
    with torch.no_grad():
        y_base = layer(x)
        for m in case.mults:
            adapter.multiplier = lyco.multiplier = m
            y = adapter(x)
            assert_differs(y, y_base, "the randomized adapter must change the output")
            assert_same(y, from_lycoris(case, m, y_base, lyco(x)), f"multiplier {m}")


# ----- LyCORIS file -> lorakit ---------------------------------------------------------------------------------------
# Not here: DyLoRA (LyCORIS' forward is random, see below) and constrained OFT/BOFT (LyCORIS trains them
# differently from what its files say, see below).
LYCORIS_FILES = [c for c in CASES if c.algo != "dylora" and not c.opts.get("constraint")]


@pytest.mark.parametrize("case,kind", params(LYCORIS_FILES))
def test_lycoris_file_gives_the_same_forward_in_lorakit(case, kind):
    layer, x = make_layer(kind), make_input(kind)
    lyco = randomize(case.lyco("lyco", copy.deepcopy(layer), **case.opts))
    y_lyco = {}
    with torch.no_grad():
        for m in case.mults:
            lyco.multiplier = m
            y_lyco[m] = lyco(x)
    sd = lycoris_saved_file(lyco)
    adapter = adapter_from_state_dict(layer, sd).eval()
    assert adapter.name == algorithm(case.algo).name
    with torch.no_grad():
        y_base = layer(x)
        for m in case.mults:
            adapter.multiplier = m
            y = adapter(x)
            assert_differs(y, y_base, "the randomized module must change the output")
            assert_same(y, from_lycoris(case, m, y_base, y_lyco[m]), f"multiplier {m}")


# ----- where LyCORIS is known wrong: pin its behaviour, check lorakit against the UIs ---------------------------------
@pytest.mark.parametrize("case,kind", params([c for c in CASES if c.opts.get("constraint")]))
def test_lycoris_constrained_oft_file_acts_with_the_ui_bound_in_lorakit(case, kind):
    """LyCORIS trains with |Q| <= constraint * out_dim but saves alpha = constraint, unclamped blocks; ComfyUI
    clamps at alpha itself (A1111 multiplies by out_dim as LyCORIS does, and lorakit writes files on which both
    agree). Loading such a file, lorakit applies what ComfyUI applies, not what LyCORIS trained."""
    layer, x = make_layer(kind), make_input(kind)
    c = case.opts["constraint"]
    lyco = randomize(case.lyco("lyco", copy.deepcopy(layer), **case.opts))
    sd = lycoris_saved_file(lyco)
    assert lyco.constraint == pytest.approx(c * OUT) and float(sd["alpha"]) == pytest.approx(c)
    adapter = adapter_from_state_dict(layer, sd).eval()
    with torch.no_grad():
        for m in case.mults:
            adapter.multiplier = lyco.multiplier = m
            y_ui = ui_forward(layer, sd, x, m).float()
            assert_differs(lyco(x), y_ui, "LyCORIS' own forward vs the UI reading of its file")
            assert_same(adapter(x), y_ui, f"multiplier {m}")


@pytest.mark.parametrize("algo,opts,cls", [
    ("loha", dict(lora_dim=4, alpha=2.0), LohaModule),
    ("lokr", dict(lora_dim=2, alpha=1.0), LokrModule),
])
@pytest.mark.parametrize("kind", LIN_CONV)
def test_lycoris_merges_loha_lokr_at_scale_squared(algo, opts, cls, kind):
    """LyCORIS' get_diff_weight multiplies get_weight() (already scaled) by the scale again, so merge_to,
    onfly_merge and parametrize apply scale^2 whenever alpha != dim; its forward is right. lorakit merges what the
    UIs add."""
    layer, x = make_layer(kind), make_input(kind)
    adapter = randomize(make_adapter(algo, layer, **opts))
    sd = plain(adapter.state_dict())
    lyco = lycoris_from_lorakit_file(Case(algo, algo, opts, cls), copy.deepcopy(layer), sd)
    w = layer.weight.detach().clone()
    ui = ui_delta(sd, w)[0].float()
    scale = opts["alpha"] / opts["lora_dim"]  # 0.5
    with torch.no_grad():
        lyco_merged = lyco.get_merged_weight(1.0, shape=w.shape)[0] - w
        assert_same(lyco_merged, scale * ui, "LyCORIS merge at scale^2")
        assert_differs(lyco_merged, ui, "LyCORIS merge vs the UIs")
        y_forward = lyco(x)
        adapter.merge()
        assert_same(layer.weight - w, ui, "lorakit merge vs the UIs")
        assert_same(layer(x), y_forward, "lorakit merged vs LyCORIS forward")
        adapter.unmerge()


@pytest.mark.parametrize("kind", LIN_CONV)
def test_lycoris_dylora_file_acts_as_the_lora_it_holds_in_lorakit(kind):
    """LyCORIS' DyLoRA draws a random rank block in eval too (and scales it by alpha / (block + 1)), so its forward
    is no function of its file. The file holds plain LoRA keys (lora_up 2-d even for a conv); the UIs apply it as
    the LoRA of the full rank, and so must lorakit."""
    layer, x = make_layer(kind), make_input(kind)
    lyco = randomize(DyLoraModule("lyco", copy.deepcopy(layer), lora_dim=8, alpha=4.0, block_size=2))
    random.seed(0)  # LyCORIS draws the block with the random module
    with torch.no_grad():
        outs = [lyco(x) for _ in range(6)]
    assert any(not torch.allclose(outs[0], y) for y in outs[1:]), "LyCORIS' DyLoRA eval forward is random"
    sd = lycoris_saved_file(lyco)
    adapter = adapter_from_state_dict(layer, sd).eval()
    with torch.no_grad():
        for m in (1.0, 0.7):
            adapter.multiplier = m
            assert_same(adapter(x), ui_forward(layer, sd, x, m).float(), f"multiplier {m}")


# ----- LyCORIS' bypass mode, where its math is the UIs' (no bias to rotate or scale) ---------------------------------
BYPASS = [c for c in CASES if c.algo in ("lora", "dylora", "loha", "lokr", "glora", "ia3", "diag-oft", "boft")
          and "weight_decompose" not in c.opts]  # DoRA is ignored in LyCORIS bypass


@pytest.mark.parametrize("case,kind", params(BYPASS))
def test_lorakit_file_in_lycoris_bypass_mode_on_a_layer_without_bias(case, kind):
    layer = make_layer(kind)
    layer.bias = None
    x = make_input(kind)
    adapter = randomize(make_adapter(case.algo, layer, **case.opts))
    sd = plain(adapter.state_dict())
    lyco = lycoris_from_lorakit_file(case, copy.deepcopy(layer), sd)
    lyco.bypass_mode = True
    # LyCORIS' Diag-OFT bypass raises for a multiplier != 1 ("view size is not compatible")
    mults = (1.0,) if case.algo == "diag-oft" else case.mults
    with torch.no_grad():
        y_base = layer(x)
        for m in mults:
            adapter.multiplier = lyco.multiplier = m
            assert_same(adapter(x), from_lycoris(case, m, y_base, lyco(x)), f"multiplier {m}")
