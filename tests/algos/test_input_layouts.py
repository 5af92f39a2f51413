"""Every algorithm x layer x option combination on inputs that are not contiguous (what models pass: diffusers'
Transformer2DModel hands its Linear proj_in a permuted view, convs see channels-last or strided slices), and a
contiguous input whose output gradient comes back strided: the output, the input's gradient and every
parameter's gradient equal those of the same values laid out contiguously (test_contract checks the contiguous
case against the dense formula)."""

from __future__ import annotations

import pytest
import torch

from lorakit.algos import make_adapter

from .conftest import INPUTS, case_params, make_layer, randomize


def permuted_view(shape):
    """(n, positions, c) as the permuted view of a channel-first (n, c, h, w) tensor, as diffusers makes it."""
    n, p, c = shape
    return torch.randn(n, c, p, 1, dtype=torch.float64).permute(0, 2, 3, 1).reshape(n, p, c)


def linear_layouts(many: bool):
    """Non-contiguous inputs for the Linear(12, 8) of the cases; with many, more positions than twice its input
    width (the merged and folded paths)."""
    p = 20 if many else 5
    return {
        "permuted": permuted_view((2, p, 12)),
        "transposed-2d": torch.randn(12, 2 * p, dtype=torch.float64).t(),
        "strided-rows": torch.randn(2, 2 * p, 12, dtype=torch.float64)[:, ::2],
        "broadcast-batch": torch.randn(1, p, 12, dtype=torch.float64).expand(2, p, 12),
    }


def conv_layouts(kind):
    shape = INPUTS[kind]
    x = torch.randn(shape, dtype=torch.float64)
    layouts = {"strided-last-axis": torch.randn(*shape[:-1], 2 * shape[-1], dtype=torch.float64)[..., ::2]}
    if x.dim() == 4:
        layouts["channels-last"] = x.contiguous(memory_format=torch.channels_last)
    if x.dim() == 5:
        layouts["channels-last-3d"] = x.contiguous(memory_format=torch.channels_last_3d)
    return layouts


def run(adapter, x, strided_grad=False):
    """Output, input gradient and parameter gradients under the loss sum(sin(y)); with strided_grad the loss is
    taken on a permuted view of y, so that the output's gradient reaches the adapter non-contiguous."""
    x = x.detach().clone() if x.is_contiguous() else x.detach()
    x.requires_grad_(True)
    out = adapter(x)
    (out.movedim(-1, 0) if strided_grad else out).sin().sum().backward()
    grads = {n: p.grad.clone() for n, p in adapter.named_parameters() if p.grad is not None}
    adapter.zero_grad()
    return out, x.grad, grads


@pytest.mark.parametrize("algo,options,kind,many", [p for p in case_params(with_positions=True)
                                                     if p.values[2] not in ("layernorm", "groupnorm")])
def test_non_contiguous_inputs_match_contiguous_ones(algo, options, kind, many):
    layer = make_layer(kind)
    adapter = randomize(make_adapter(algo, layer, **options).double()).eval()
    adapter.multiplier = 0.7
    layouts = linear_layouts(many) if kind == "linear" else conv_layouts(kind)
    layouts["contiguous, strided output gradient"] = layouts[next(iter(layouts))].contiguous()
    for name, x in layouts.items():
        strided_grad = x.is_contiguous()
        out, gx, grads = run(adapter, x, strided_grad)
        ref_out, ref_gx, ref_grads = run(adapter, x.contiguous())
        torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-12, msg=f"{name}: output")
        torch.testing.assert_close(gx, ref_gx, rtol=1e-10, atol=1e-12, msg=f"{name}: input gradient")
        assert grads.keys() == ref_grads.keys(), name
        for n in grads:
            torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-9, atol=1e-11, msg=f"{name}: {n}")
