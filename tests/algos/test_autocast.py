"""Every algorithm x layer x option combination under mixed precision, the two ways training runs it: the trainer's
(frozen base weights in bfloat16, adapter in float32, bfloat16 activations, forward under torch.autocast, backward
outside it) and plain AMP (everything float32, forward under autocast). Forward and backward run, every adapter
parameter gets a float32 gradient, and output and gradients agree with the float64 formula to bfloat16's
precision."""

from __future__ import annotations

import pytest
import torch

from lorakit.algos import make_adapter

from .conftest import case_params, make_input, make_layer, randomize
from .test_contract import layer_forward

LOW = torch.bfloat16


def reference(adapter, layer, x):
    """Output and parameter gradients of the float64 formula op(x, W + m dW) + b (+ m db), loss sum(y * probe)."""
    bias = layer.bias
    db = adapter.delta_bias(adapter.multiplier)
    if db is not None:
        bias = db if bias is None else bias + db
    y = layer_forward(layer, x, layer.weight + adapter.delta_weight(adapter.multiplier), bias)
    probe = torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=y.dtype)
    (y * probe).sum().backward()
    grads = {n: p.grad.clone() for n, p in adapter.named_parameters() if p.grad is not None}
    adapter.zero_grad()
    return y.detach(), grads, probe


def close(got: torch.Tensor, want: torch.Tensor, what: str, rel: float) -> None:
    err = float((got.detach().double() - want).norm() / want.norm().clamp_min(1e-12))
    assert err <= rel, f"{what}: relative error {err:.3g} > {rel}"


def test_ia3_on_the_output_gives_autocasts_dtype_under_amp():
    """Its short call adds a float32 scale and bias to the layer's bfloat16 output: cast, not promoted."""
    layer = make_layer("linear", torch.float32)
    randomize(make_adapter("ia3", layer)).apply()
    with torch.autocast("cpu", dtype=LOW):
        y = layer(make_input("linear", torch.float32))
    assert y.dtype == LOW


@pytest.mark.parametrize("chunks", [1, 512], ids=["long_call", "short_calls"])
def test_ia3_keeps_a_change_below_autocasts_resolution(chunks):
    """A scale 1 + m w rounded to bfloat16 is 1 for |m w| < 2^-8 (a weight a run reaches in its first steps): the
    change must be added apart from the layer's output, as LyCORIS does, so that it survives on average."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 64).requires_grad_(False)
    adapter = make_adapter("ia3", layer)
    adapter.apply()
    x = torch.randn(8192, 64) + 1.0  # a nonzero mean, so each channel's change shows in its mean

    def mean_output(w):
        with torch.no_grad():
            adapter.weight.fill_(w)
            with torch.autocast("cpu", dtype=LOW):
                return torch.cat([layer(c) for c in x.chunk(chunks)]).double().mean(0)

    want = 3e-3 * torch.nn.functional.linear(x.double(), layer.weight.double()).mean(0)
    got = mean_output(3e-3) - mean_output(0.0)
    assert float((got * want).sum() / (want * want).sum()) == pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize("style", ["trainer", "amp"])
@pytest.mark.parametrize("algo,options,kind,many", [p for p in case_params(with_positions=True)
                                                     if p.values[2] not in ("layernorm", "groupnorm")])
def test_mixed_precision_forward_and_backward(style, algo, options, kind, many):
    layer = make_layer(kind)
    x = make_input(kind)
    if many:
        x = torch.randn(3, 40, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    saved = randomize(make_adapter(algo, layer, **options).double()).state_dict()
    # reference and run both loaded from the saved tensors (a scalar or a constraint has its saved form there)
    adapter = make_adapter(algo, make_layer(kind), **options).double().eval()  # eval: DyLoRA at its full rank
    adapter.load_state_dict(saved)
    adapter.multiplier = 0.7
    want, want_grads, probe = reference(adapter, adapter.layer, x)

    run_layer = make_layer(kind).to(LOW if style == "trainer" else torch.float32)
    run = make_adapter(algo, run_layer, **options)
    run.load_state_dict({k: v.float() for k, v in saved.items()})
    run.multiplier = adapter.multiplier
    run.eval()
    run.apply()
    xr = x.to(LOW if style == "trainer" else torch.float32).requires_grad_(True)
    with torch.autocast("cpu", dtype=LOW):
        y = run_layer(xr)
    assert y.dtype == LOW, "the adapted layer computes in autocast's dtype, as the plain layer does"
    (y.float() * probe.float()).sum().backward()
    close(y, want, "output", 0.03)
    assert xr.grad is not None and xr.grad.dtype == xr.dtype
    for n, p in run.named_parameters():
        if n not in want_grads:
            continue
        assert p.grad is not None and p.grad.dtype == torch.float32, n
        assert torch.isfinite(p.grad).all(), n
        close(p.grad, want_grads[n], f"gradient of {n}", 0.1)


def test_the_merged_weight_is_rebuilt_in_float32_and_rounded_once_under_autocast():
    """Plain AMP on a LoHa over many positions (the layer run once with W + dW): dW is rebuilt in the adapter's
    float32 with autocast off inside the function, and W + dW is rounded once to autocast's dtype for the layer's
    op, in forward and backward alike. The output and input gradient are then exactly the plain layer's under
    autocast with that weight; a dW rebuilt under autocast (in bfloat16) would differ."""
    layer = make_layer("linear", torch.float32)
    adapter = randomize(make_adapter("loha", layer)).eval()
    adapter.multiplier = 0.7
    with torch.no_grad():
        merged = layer.weight + adapter.delta_weight(adapter.multiplier)
    adapter.apply()
    x = torch.randn(3, 40, 12, generator=torch.Generator().manual_seed(1))
    xg, xr = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=LOW):
        y = layer(xg)
        expected = torch.nn.functional.linear(xr, merged, layer.bias)
    assert type(y.grad_fn).__name__ == "_RebuiltWeightOpBackward"
    probe = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(LOW)
    (y * probe).sum().backward()
    (expected * probe).sum().backward()
    assert torch.equal(y, expected)
    assert torch.equal(xg.grad, xr.grad)
