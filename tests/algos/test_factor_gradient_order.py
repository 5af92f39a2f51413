"""The factors' products in each of the layouts fused_linear asks MKL for, whichever CPU runs the tests (AVX-512
and AVX2 orders forced through cpu_kind.AVX512): thin_t_wide (thin^T wide, or (wide^T thin)^T from rank 16 on
AVX2) and times_tall (wide @ tall, or tall as a transposed contiguous copy below rank 16 on AVX2), alone and on the
Linear paths that use them, against the float64 formula."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from lorakit.algos import cpu_kind, fused_linear, glora_linear, make_adapter

from .conftest import randomize
from .test_contract import check_against_formula


@pytest.fixture(params=[True, False], ids=["avx512-order", "avx2-order"])
def ranks(request, monkeypatch):
    """cpu_kind.AVX512 forced each way; the rank of every thin_t_wide and times_tall call is recorded."""
    monkeypatch.setattr(cpu_kind, "AVX512", request.param)
    seen = {"thin_t_wide": [], "times_tall": []}
    for name, column in (("thin_t_wide", 0), ("times_tall", 1)):
        original = getattr(fused_linear, name)

        def recorded(a, b, original=original, name=name, column=column):
            seen[name].append((a, b)[column].shape[1])
            return original(a, b)

        monkeypatch.setattr(fused_linear, name, recorded)
        monkeypatch.setattr(glora_linear, name, recorded)
    return seen


@pytest.mark.parametrize("rank", [1, 4, 16, 24])
def test_the_products_are_the_same_in_either_layout(ranks, rank):
    torch.manual_seed(0)
    thin, wide = torch.randn(37, rank, dtype=torch.float64), torch.randn(37, 9, dtype=torch.float64)
    tall = torch.randn(9, rank, dtype=torch.float64)
    torch.testing.assert_close(fused_linear.thin_t_wide(thin, wide), thin.t() @ wide, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fused_linear.times_tall(wide, tall), wide @ tall, rtol=1e-12, atol=1e-12)


# (algo, options, positions, multiplier): the plus path takes 10 positions of a 40-wide Linear, the merged one 120
CASES = [
    ("lora", {}, 10, 0.7),
    ("lora", {}, 120, 0.7),
    ("lora", {"dora_wd": True}, 10, 0.7),
    ("lora", {"dora_wd": True}, 120, 0.7),
    ("lora", {"dora_wd": True, "dora_axis": "out"}, 10, 1.0),  # DoRA's rows fused at multiplier 1
    ("lora", {"dora_wd": True, "dora_axis": "out"}, 120, 1.0),
    ("glora", {}, 10, 0.7),  # on many positions GLoRA rebuilds the weight
    ("loha", {}, 10, 0.7),  # its Khatri-Rao pair has rank dim^2; this small layer rebuilds on many positions
]


@pytest.mark.parametrize("dim", [8, 16])
@pytest.mark.parametrize("algo,options,positions,multiplier", CASES,
                         ids=[f"{a}-{','.join(o) or 'default'}-{n}" for a, o, n, _ in CASES])
def test_adapters_train_the_formula_in_either_layout(ranks, algo, options, positions, multiplier, dim):
    torch.manual_seed(0)
    layer = nn.Linear(40, 32).double().requires_grad_(False)
    rank = 4 if algo == "loha" and dim == 16 else dim  # LoHa's pair: 4 x 4 = 16, 8 x 8 = 64
    adapter = randomize(make_adapter(algo, layer, dim=rank, alpha=4, **options).double())
    adapter.multiplier = multiplier
    check_against_formula(adapter, layer, torch.randn(2, positions // 2, 40, dtype=torch.float64))
    assert max(ranks["thin_t_wide"], default=0) >= 16 or dim < 16, "a rank-16 factor gradient must be asked for"
    assert algo == "loha" or min(ranks["times_tall"], default=99) < 16 or dim >= 16, \
        "a rank-8 product with the up factor must be asked for"
