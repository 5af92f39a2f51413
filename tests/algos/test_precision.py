"""A half-precision base layer with a float32 adapter keeps the adapter's small change: the change is computed
apart from the base output instead of being added to a rounded weight."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lorakit.algos import make_adapter

from .conftest import CASES, make_input, make_layer, randomize


def small_change_cases():
    for algo, options, layers in CASES:
        for kind in ("linear", "conv2d", "layernorm"):
            if kind in layers and not options.get("bypass_mode") is False:
                yield pytest.param(algo, options, kind, id=f"{algo}-{kind}-{options}")
    # LoHa on a layer where its Khatri-Rao factors cost less than rebuilding dW: the factor path, chosen by cost
    yield pytest.param("loha", {}, "linear_wide", id="loha-linear_wide-{}")


@pytest.mark.parametrize("low", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("algo,options,kind", list(small_change_cases()))
def test_low_precision_base_keeps_the_change(low, algo, options, kind):
    ref_layer, x = make_layer(kind), make_input(kind)
    adapter = make_adapter(algo, ref_layer, **options).double()
    randomize(adapter, scale=0.3).eval()
    base = ref_layer(x)
    # a change of about 2% of the output, as trained adapters make: set through the multiplier
    for _ in range(6):  # BOFT's change is not linear in the multiplier: iterate
        with torch.no_grad():
            adapter.multiplier *= 0.02 * float(base.abs().mean() / (adapter(x) - base).abs().mean())
    expected = adapter(x)  # float64 truth

    low_layer = make_layer(kind).to(low)
    low_adapter = make_adapter(algo, low_layer, **options)  # float32 adapter on a half-precision layer
    low_adapter.load_state_dict({k: v.float() for k, v in adapter.state_dict().items()})
    low_adapter.multiplier = adapter.multiplier
    low_adapter.eval()
    xl = x.to(low)
    got = low_adapter(xl).double()
    assert low_adapter(xl).dtype == low

    change = (expected - ref_layer(x)).abs().mean()
    base_error = (low_layer(xl).double() - ref_layer(x)).abs().mean()  # the layer's own rounding
    error = (got - expected).abs().mean()
    assert error < 0.25 * change, f"error {error:.2e} is not small against the change {change:.2e}"
    assert error < 2 * base_error + 1e-9, f"the adapter adds error {error:.2e} beyond the layer's {base_error:.2e}"


@pytest.mark.parametrize("low", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("algo,options", [("diag-oft", {"dim": 4}), ("diag-oft", {"dim": 4, "constraint": 1e-3}),
                                          ("diag-oft", {"dim": 4, "rescaled": True}), ("boft", {"dim": 2})])
@pytest.mark.parametrize("kind,shape", [("linear", None), ("linear", (4, 40, 12)), ("conv2d", None)])
def test_orthogonal_adapters_cast_to_half_precision_solve_in_float32(low, algo, options, kind, shape):
    """A whole network cast to half precision (kohya's --full_fp16/--full_bf16, a UI running in half): the Cayley
    transform and the folded path's solve run in float32, which torch's linear algebra needs, and the output and
    the blocks' gradient follow the float64 formula to half precision (few positions, many, a conv)."""
    ref_layer = make_layer(kind)
    x = make_input(kind) if shape is None else torch.randn(shape, dtype=torch.float64)
    adapter = randomize(make_adapter(algo, ref_layer, **options).double(), scale=0.1).eval()
    expected = adapter(x)
    expected.sin().sum().backward()

    low_layer = make_layer(kind).to(low)
    low_adapter = make_adapter(algo, low_layer, **options).to(low).eval()
    with torch.no_grad():  # the parameters themselves: a loaded file would also set a bound from its alpha
        for (_, p), (_, ref) in zip(low_adapter.named_parameters(), adapter.named_parameters()):
            p.copy_(ref)
    got = low_adapter(x.to(low))
    assert got.dtype == low
    got.float().sin().sum().backward()
    assert low_adapter.oft_blocks.grad.dtype == low

    scale = expected.abs().max()
    assert (got.double() - expected).abs().max() < 0.03 * scale
    ref_grad, grad = adapter.oft_blocks.grad, low_adapter.oft_blocks.grad.double()
    assert (grad - ref_grad).abs().max() < 0.05 * ref_grad.abs().max()


@pytest.mark.parametrize("low", [torch.float16, torch.bfloat16])
def test_merge_into_a_half_precision_layer_rounds_the_sum_once(low):
    """merge() adds a float32 dW to a half-precision W in float32 and rounds the sum once: the weight is W + dW
    rounded from float64. (Rounding dW to half first and then the sum moves ~0.5% of the elements by one unit, an
    error that grows with every LoRA merged into a half-precision model.)"""
    torch.manual_seed(0)
    layer = nn.Linear(128, 128).to(low).requires_grad_(False)
    w0 = layer.weight.clone()
    adapter = make_adapter("lora", layer, dim=8, alpha=8)
    with torch.no_grad():
        adapter.lora_up.normal_(std=1e-3)  # a small change, as trained adapters make
    dw = adapter.delta_weight().detach()
    adapter.merge()
    assert torch.equal(layer.weight, (w0.double() + dw.double()).to(low))


class Float32OutputLinear(nn.Linear):
    """A half-precision Linear that computes in float32, as layers upcasting a stored weight do: its output shows an
    input change without the half-precision rounding of the output on top."""

    def forward(self, x):
        return F.linear(x.float(), self.weight.float(), self.bias.float())


def test_a_float32_input_change_on_a_half_precision_layer_is_not_rounded_to_the_input():
    """IA3 on the input with small scales (early training): the change W (m w * x) is computed apart from W x, so
    the half-precision input does not round it away (x + u in float16 keeps u to ~5e-4 of x: ~15% of this change)."""
    torch.manual_seed(0)
    layer = Float32OutputLinear(64, 32).half().requires_grad_(False)
    adapter = make_adapter("ia3", layer, train_on_input=True)
    with torch.no_grad():
        adapter.weight.copy_(1e-3 * (1 + torch.rand(64)))
    x = torch.randn(8, 64).half()
    expected = F.linear(x.double() * adapter.weight.detach().double(), layer.weight.double())
    change = (adapter(x) - layer(x)).detach().double()
    assert float((change - expected).norm() / expected.norm()) < 0.01


def _relative_error(got: torch.Tensor, expected: torch.Tensor, change: torch.Tensor) -> float:
    return float((got.double() - expected).norm() / change.norm())


@pytest.mark.parametrize("low", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("axis", ["in", "out"])
@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_a_half_precision_dora_adapter_keeps_a_float32_layers_weight(low, axis, kind):
    """DoRA held in half precision on a float32 layer (a half-precision file loaded in its own dtype): W + dW and
    its norm are computed in float32, as LyCORIS computes them in the layer's dtype, so the forward,
    delta_weight() and merge() carry the half-precision rounding of the change, as plain LoRA's do, not that of W
    itself (rounding W to the adapter's dtype gave 12-26 units of its precision against the change)."""
    layer = make_layer(kind, torch.float32)
    ref_layer = make_layer(kind, torch.float32).double()  # the same float32 weight, read exactly
    ref = make_adapter("lora", ref_layer, dim=4, dora_wd=True, dora_axis=axis).double()
    with torch.no_grad():  # a change of 2% of the weight, as trained adapters make
        ref.lora_up.normal_()
        ref.lora_up.mul_(0.02 * ref_layer.weight.norm() / ref._delta_weight().norm())
        ref.dora_scale.mul_(1 + 0.02 * torch.rand_like(ref.dora_scale))
    saved = {k: v.to(low) for k, v in ref.state_dict().items()}  # the file, in half precision
    ref.load_state_dict({k: v.double() for k, v in saved.items()})  # float64 truth of the same tensors
    adapter = make_adapter("lora", layer, dim=4, dora_wd=True, dora_axis=axis).to(low)
    adapter.load_state_dict(saved)
    _assert_follows_float64(adapter, layer, ref, ref_layer, kind,
                            2 * torch.finfo(low).eps)  # W kept: 0.2-0.4 eps; W rounded: 12-26 eps


def _assert_follows_float64(adapter, layer, ref, ref_layer, kind, tolerance):
    """A half-precision adapter on a float32 layer against the float64 truth of the same tensors: its forward,
    delta_weight() and merge(), each relative to the change."""
    x = make_input(kind)
    with torch.no_grad():
        expected, got = ref(x), adapter(x.float())
    assert got.dtype == torch.float32
    assert _relative_error(got, expected, expected - ref_layer(x)) < tolerance
    dw = ref.delta_weight().detach()
    assert _relative_error(adapter.delta_weight().detach(), dw, dw) < tolerance
    adapter.merge()
    assert _relative_error(layer.weight, ref_layer.weight + dw, dw) < tolerance


@pytest.mark.parametrize("low", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("algo,options", [("diag-oft", {"dim": 4}), ("diag-oft", {"dim": 4, "rescaled": True}),
                                          ("boft", {"dim": 2})])
@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_a_half_precision_rotation_keeps_a_float32_layers_output(low, algo, options, kind):
    """Diag-OFT/BOFT held in half precision on a float32 layer: the rotation is built and applied in float32, so
    the forward, delta_weight() and merge() follow the file's half-precision tensors read exactly (R = I + ~2Q
    rounded to half precision, and W x rounded to it before the rotation, gave 1.4-3 units of its precision
    against the change, where LoRA's rounding gives 0.3-0.4)."""
    layer = make_layer(kind, torch.float32)
    ref_layer = make_layer(kind, torch.float32).double()
    ref = randomize(make_adapter(algo, ref_layer, **options).double(), scale=0.05).eval()
    saved = {k: v.to(low) for k, v in ref.state_dict().items()}
    ref.load_state_dict({k: v.double() for k, v in saved.items()})  # float64 truth of the same tensors
    adapter = make_adapter(algo, layer, **options).to(low).eval()
    adapter.load_state_dict(saved)
    _assert_follows_float64(adapter, layer, ref, ref_layer, kind, 0.5 * torch.finfo(low).eps)
