"""BOFT's stages composed into groups of dense blocks (butterfly_groups) against the stages run one by one: the same
output and gradients in float64, on each path that rotates (a short Linear call, a Linear on many positions, a
conv's dense operator), at any multiplier, with rescale, for groups of equal and of unequal stage counts (the
smaller components set along the diagonal of blocks of the largest size)."""

from __future__ import annotations

import pytest
import torch

from lorakit.algos import butterfly_groups, make_adapter

from .conftest import randomize

CASES = {
    # layer, input, dim (32 channels in blocks of 4: 4 stages)
    "linear_short": (lambda: torch.nn.Linear(16, 32), (2, 3, 16)),
    "linear_many": (lambda: torch.nn.Linear(16, 32), (2, 40, 16)),
    "linear_no_bias": (lambda: torch.nn.Linear(16, 32, bias=False), (7, 16)),
    "conv_k3": (lambda: torch.nn.Conv2d(6, 32, 3, padding=1), (2, 6, 5, 5)),
}


def _run(case, multiplier, rescaled, sizes, monkeypatch):
    make, shape = CASES[case]
    torch.manual_seed(0)
    layer = make().double().requires_grad_(False)
    adapter = randomize(make_adapter("boft", layer, dim=4, rescaled=rescaled).double()).train()
    assert adapter.oft_blocks.shape[0] == 4  # stages
    adapter.multiplier = multiplier
    seen = []

    def group_sizes(stages, *args):
        seen.append((1,) * stages if sizes is None else sizes)
        return seen[-1]

    monkeypatch.setattr(butterfly_groups, "group_sizes", group_sizes)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    out = adapter(x)
    params = [x] + list(adapter.parameters())
    grads = torch.autograd.grad(out.sin().sum(), params)
    return out, grads, seen


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("multiplier,rescaled", [(1.0, False), (0.7, True)])
@pytest.mark.parametrize("sizes", [(4,), (2, 2), (3, 1), (1, 2, 1)])
def test_composed_groups_give_the_stages_output_and_gradients(case, multiplier, rescaled, sizes, monkeypatch):
    want, want_grads, plain = _run(case, multiplier, rescaled, None, monkeypatch)
    got, got_grads, grouped = _run(case, multiplier, rescaled, sizes, monkeypatch)
    assert plain and set(grouped) == {sizes}  # the rotation went through composed_stages
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-11)


def test_group_sizes_compose_only_where_the_tensor_is_large():
    assert butterfly_groups.group_sizes(8, 128, 10, 512) == (4, 4)  # Linear 1280 on 512 positions: blocks of 80
    assert butterfly_groups.group_sizes(8, 128, 10, 256) == (1,) * 8  # few columns: the stages themselves
    assert butterfly_groups.group_sizes(6, 32, 10, 512) == (1,) * 6  # a small tensor: the stages themselves
    assert butterfly_groups.group_sizes(6, 32, 10, 2048) == (3, 3)
    assert butterfly_groups.group_sizes(7, 64, 10, 1024) == (4, 3)  # SDXL's 640 channels: blocks of 80 and 40
    assert butterfly_groups.group_sizes(4, 8, 4, 16384) == (4,)  # 32 channels: one dense block
