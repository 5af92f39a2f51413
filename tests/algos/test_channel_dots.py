"""Per-channel dot products in cache-sized blocks (channel_dots) against the float64 sums, alone and inside the
algorithms whose scale gradients use them (IA3 on the output, folded or not; DoRA on both axes; Diag-OFT folded),
with blocks small enough that every call here is split, the last block short: the dots' blocks and the input
gradient's GEMM taken block by block with them (input_grad_and_reductions)."""

from __future__ import annotations

import pytest
import torch

from lorakit.algos import channel_dots, fused_linear, ia3, make_adapter

from .conftest import randomize
from .test_contract import check_against_formula


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of a few rows, and a record of the input gradients taken with reductions (their row counts)."""
    monkeypatch.setattr(channel_dots, "_BLOCK", 16)
    monkeypatch.setattr(channel_dots, "_GEMM_BLOCK", 16)
    monkeypatch.setattr(ia3, "_MAX_NATIVE_INPUT", 0)  # IA3's short calls too take the output pass with the dots
    calls = []

    def recorded(g, weight, reduce):
        calls.append(g.shape[0])
        return channel_dots.input_grad_and_reductions(g, weight, reduce)

    monkeypatch.setattr(fused_linear, "input_grad_and_reductions", recorded)
    return calls


@pytest.mark.parametrize("sum_a", [False, True])
def test_column_and_row_dots_match_the_sums_in_blocks(small_blocks, sum_a):
    torch.manual_seed(0)
    a, b = torch.randn(37, 5, dtype=torch.float64), torch.randn(37, 5, dtype=torch.float64)  # 3 rows a block
    for got, dim in ((channel_dots.column_dots(a, b, sum_a), 0), (channel_dots.row_dots(a.t(), b.t(), sum_a), 1)):
        dots, sums = got if sum_a else (got, None)
        torch.testing.assert_close(dots, (a * b).sum(0), rtol=1e-12, atol=1e-12)
        if sum_a:
            torch.testing.assert_close(sums, a.sum(0), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("with_weight", [True, False])
def test_input_grad_and_reductions_match_the_whole_products(small_blocks, with_weight):
    torch.manual_seed(0)
    g, y, w = (torch.randn(37, 5, dtype=torch.float64), torch.randn(37, 5, dtype=torch.float64),
               torch.randn(5, 4, dtype=torch.float64))  # 3 rows a block
    weight = w if with_weight else None

    def reduce(rows, gb, grad_b):  # a dot with another tensor's rows, a sum, and a sum over the product's block
        return ((gb * y[rows]).sum(0), gb.sum(0)) + ((grad_b.sum(0),) if with_weight else ())

    grad, sums = channel_dots.input_grad_and_reductions(g, weight, reduce)
    torch.testing.assert_close(sums[0], (g * y).sum(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sums[1], g.sum(0), rtol=1e-12, atol=1e-12)
    if with_weight:
        torch.testing.assert_close(grad, g @ w, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(sums[2], (g @ w).sum(0), rtol=1e-12, atol=1e-12)
    else:
        assert grad is None


def test_column_dots_over_the_real_block_in_float32():
    torch.manual_seed(0)
    a, b = torch.randn(1100, 500), torch.randn(1100, 500)  # 550000 elements: two blocks of 1048 and 52 rows
    dots, sums = channel_dots.column_dots(a, b, sum_a=True)
    torch.testing.assert_close(dots.double(), (a.double() * b.double()).sum(0), rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(sums.double(), a.double().sum(0), rtol=1e-4, atol=1e-3)


# (name, algo, options, layer kind, input shape, whether backward takes the input gradient with reductions)
CASES = [
    ("ia3 folded", "ia3", {}, "linear", (2, ia3._MIN_FOLD_POSITIONS // 2, 6), True),
    ("ia3 output", "ia3", {}, "linear", (3, 7, 6), False),
    ("ia3 conv", "ia3", {}, "conv", (2, 6, 5, 5), False),
    ("dora columns", "lora", {"dim": 2, "dora_wd": True}, "linear", (2, 30, 6), True),
    ("dora columns few", "lora", {"dim": 2, "dora_wd": True}, "linear", (1, 4, 6), False),
    ("dora rows", "lora", {"dim": 2, "dora_wd": True, "dora_axis": "out"}, "linear", (2, 30, 6), True),
    ("diag-oft folded", "diag-oft", {"dim": 3}, "linear", (2, 30, 6), True),
]


@pytest.mark.parametrize("name,algo,options,kind,shape,with_gemm", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("bias", [True, False])
def test_scale_gradients_in_blocks_match_the_formula(small_blocks, name, algo, options, kind, shape, with_gemm, bias):
    torch.manual_seed(0)
    layer = torch.nn.Linear(6, 6, bias=bias) if kind == "linear" else torch.nn.Conv2d(6, 6, 1, bias=bias)
    layer = layer.double().requires_grad_(False)
    adapter = randomize(make_adapter(algo, layer, **options).double(), scale=0.1).eval()
    check_against_formula(adapter, layer, torch.randn(shape, dtype=torch.float64))
    # the GEMM and the reductions were taken in blocks on every call that takes them (rows = positions)
    positions = shape[0] * shape[1] if kind == "linear" else None
    assert (small_blocks and set(small_blocks) == {positions}) if with_gemm else not small_blocks
