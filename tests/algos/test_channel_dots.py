"""Per-channel dot products in cache-sized blocks (channel_dots) against the float64 sums, alone and inside the
algorithms whose scale gradients use them (IA3 on the output, folded or not; DoRA on both axes), with a block
small enough that every call here is split, the last block short."""

from __future__ import annotations

import pytest
import torch

from lorakit.algos import channel_dots, ia3, make_adapter

from .conftest import randomize
from .test_contract import check_against_formula


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(channel_dots, "_BLOCK", 16)


@pytest.mark.parametrize("sum_a", [False, True])
def test_column_and_row_dots_match_the_sums_in_blocks(small_blocks, sum_a):
    torch.manual_seed(0)
    a, b = torch.randn(37, 5, dtype=torch.float64), torch.randn(37, 5, dtype=torch.float64)  # 3 rows a block
    for got, dim in ((channel_dots.column_dots(a, b, sum_a), 0), (channel_dots.row_dots(a.t(), b.t(), sum_a), 1)):
        dots, sums = got if sum_a else (got, None)
        torch.testing.assert_close(dots, (a * b).sum(0), rtol=1e-12, atol=1e-12)
        if sum_a:
            torch.testing.assert_close(sums, a.sum(0), rtol=1e-12, atol=1e-12)


def test_column_dots_over_the_real_block_in_float32():
    torch.manual_seed(0)
    a, b = torch.randn(1100, 500), torch.randn(1100, 500)  # 550000 elements: two blocks of 1048 and 52 rows
    dots, sums = channel_dots.column_dots(a, b, sum_a=True)
    torch.testing.assert_close(dots.double(), (a.double() * b.double()).sum(0), rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(sums.double(), a.double().sum(0), rtol=1e-4, atol=1e-3)


CASES = [
    ("ia3 folded", "ia3", {}, "linear", (2, ia3._MIN_FOLD_POSITIONS // 2, 6)),
    ("ia3 output", "ia3", {}, "linear", (3, 7, 6)),
    ("ia3 conv", "ia3", {}, "conv", (2, 6, 5, 5)),
    ("dora columns", "lora", {"dim": 2, "dora_wd": True}, "linear", (2, 30, 6)),
    ("dora columns few", "lora", {"dim": 2, "dora_wd": True}, "linear", (1, 4, 6)),
    ("dora rows", "lora", {"dim": 2, "dora_wd": True, "dora_axis": "out"}, "linear", (2, 30, 6)),
]


@pytest.mark.parametrize("name,algo,options,kind,shape", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("bias", [True, False])
def test_scale_gradients_in_blocks_match_the_formula(small_blocks, name, algo, options, kind, shape, bias):
    torch.manual_seed(0)
    layer = torch.nn.Linear(6, 5, bias=bias) if kind == "linear" else torch.nn.Conv2d(6, 5, 1, bias=bias)
    layer = layer.double().requires_grad_(False)
    adapter = randomize(make_adapter(algo, layer, **options).double(), scale=0.1).eval()
    check_against_formula(adapter, layer, torch.randn(shape, dtype=torch.float64))
