"""Training steps with dropouts: the output and gradients of the step the trainer takes, with the masks that step
drew. kohya's LoRAModule applies its dropouts in the graph, so its gradients see the masks; the fused passes that
carry a mask must do the same. (The gradient checks of test_contract run in eval, where no mask exists.)"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lorakit.algos import make_adapter

from .conftest import make_input, make_layer, randomize
from .test_contract import _grad_fn_names, layer_forward

SEED = 7
DROPOUTS = dict(dropout=0.3, rank_dropout=0.2)


def pointwise(h, up):
    """up (out, dim[, 1..]) applied to the rank activation h: a Linear, or a 1x1 conv."""
    return F.linear(h, up) if up.dim() == 2 else {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[up.dim()](h, up)


@pytest.mark.parametrize("kind,path", [("linear", "_LinearPlusLowRankBackward"), ("conv2d", None)])
def test_lora_training_step_is_the_formula_with_the_mask_it_drew(kind, path):
    """y = W x + b + m s U (mask * D x), differentiated by autograd in float64: the mask is the one the step drew
    (the same draws again, from the same seed). On a Linear the step is the fused pass, on a conv the plain ops."""
    layer, x = make_layer(kind), make_input(kind)
    adapter = randomize(make_adapter("lora", layer, dim=4, alpha=2, **DROPOUTS).double()).train()
    adapter.multiplier = 0.7
    xg = x.clone().requires_grad_(True)
    torch.manual_seed(SEED)
    out = adapter(xg)
    out.sin().sum().backward()
    if path is not None:
        assert path in _grad_fn_names(out)

    down = adapter.lora_down.detach().clone().requires_grad_(True)
    up = adapter.lora_up.detach().clone().requires_grad_(True)
    xr = x.clone().requires_grad_(True)
    h = layer_forward(layer, xr, down, None)  # D x with the layer's stride, padding and dilation
    torch.manual_seed(SEED)
    mask = adapter.rank_mask(h.shape, h)
    assert mask is not None and (mask == 0).any(), "the step must drop something"
    expected = layer(xr) + 0.7 * adapter.scale * pointwise(h * mask, up)
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-10)
    expected.sin().sum().backward()
    for name, got, want in (("lora_down", adapter.lora_down.grad, down.grad), ("lora_up", adapter.lora_up.grad,
                                                                                  up.grad), ("x", xg.grad, xr.grad)):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-9, msg=name)


# (algo, options, layer, multiplier): the compute paths a training step with dropouts takes
TRAINING_CASES = [
    ("lora", {}, "linear", 0.7),  # fused layer + pair, the mask between the factors
    ("lora", {"dora_wd": True}, "linear", 0.7),  # the same with DoRA's input-channel scale
    ("lora", {"dora_wd": True, "dora_axis": "out"}, "linear", 1.0),  # DoRA's output rows in one function
    ("lora", {}, "conv2d", 0.7),
    ("lora", {"use_tucker": True}, "conv2d", 0.7),
    ("loha", {}, "linear_wide", 0.7),  # the Khatri-Rao factor path, dropouts on the output
    ("lokr", {"dim": 1}, "conv2d", 0.7),
    ("glora", {}, "linear", 0.7),  # both chains as plain ops
    ("glora", {}, "conv2d", 0.7),
    ("diag-oft", {}, "linear", 0.7),
    ("boft", {"dim": 2}, "conv2d", 0.7),
]


@pytest.mark.parametrize("algo,options,kind,multiplier", TRAINING_CASES,
                         ids=[f"{a}-{k}-{','.join(o) or 'default'}" for a, o, k, _ in TRAINING_CASES])
def test_training_gradients_are_the_derivative_of_the_step_with_its_masks(algo, options, kind, multiplier):
    """With the seed fixed a training step is a differentiable function of the parameters and the input (the
    masks fixed): each tensor's gradient, along random directions, against central differences of that step."""
    layer, x = make_layer(kind), make_input(kind)
    adapter = randomize(make_adapter(algo, layer, **DROPOUTS, **options).double()).train()
    adapter.multiplier = multiplier
    x = x.clone().requires_grad_(True)

    def loss():
        torch.manual_seed(SEED)
        return adapter(x).sin().sum()

    first = loss()
    first.backward()
    torch.manual_seed(SEED)
    assert not torch.equal(adapter(x), adapter(x)), "dropouts must act in this step"
    tensors = dict(adapter.named_parameters(), x=x)
    directions = torch.Generator().manual_seed(3)
    eps = 1e-6
    with torch.no_grad():
        for name, t in tensors.items():
            for _ in range(2):
                v = torch.randn(t.shape, generator=directions, dtype=t.dtype)
                t.add_(v, alpha=eps)
                up = loss()
                t.sub_(v, alpha=2 * eps)
                down = loss()
                t.add_(v, alpha=eps)
                numeric = float(up - down) / (2 * eps)
                analytic = float((t.grad * v).sum())
                assert abs(numeric - analytic) <= 1e-6 * (abs(analytic) + float(t.grad.norm() * v.norm())), \
                    f"{name}: <grad, v> {analytic:.8g} but the step changes by {numeric:.8g}"
