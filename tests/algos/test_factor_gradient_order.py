"""The factors' gradients in both of the orders fused_linear.thin_t_wide asks MKL for (thin^T wide on AVX-512 CPUs
and below rank 16; (wide^T thin)^T from rank 16 on others), whichever CPU runs the tests: each order against the
float64 formula, on the Linear paths that use it."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from lorakit.algos import cpu_kind, fused_linear, glora_linear, make_adapter

from .conftest import randomize
from .test_contract import check_against_formula


@pytest.fixture(params=[True, False], ids=["avx512-order", "avx2-order"])
def thin_ranks(request, monkeypatch):
    """cpu_kind.AVX512 forced each way; the thin operand's rank of every thin_t_wide call is recorded."""
    monkeypatch.setattr(cpu_kind, "AVX512", request.param)
    ranks = []
    original = fused_linear.thin_t_wide

    def recorded(thin, wide):
        ranks.append(thin.shape[1])
        return original(thin, wide)

    monkeypatch.setattr(fused_linear, "thin_t_wide", recorded)
    monkeypatch.setattr(glora_linear, "thin_t_wide", recorded)
    return ranks


@pytest.mark.parametrize("rank", [1, 4, 16, 24])
def test_thin_t_wide_is_the_product_in_either_order(thin_ranks, rank):
    torch.manual_seed(0)
    thin, wide = torch.randn(37, rank, dtype=torch.float64), torch.randn(37, 9, dtype=torch.float64)
    torch.testing.assert_close(fused_linear.thin_t_wide(thin, wide), thin.t() @ wide, rtol=1e-12, atol=1e-12)


# (algo, options, positions, multiplier): the plus path takes 10 positions of a 40-wide Linear, the merged one 120
CASES = [
    ("lora", {}, 10, 0.7),
    ("lora", {}, 120, 0.7),
    ("lora", {"dora_wd": True}, 10, 0.7),
    ("lora", {"dora_wd": True}, 120, 0.7),
    ("lora", {"dora_wd": True, "dora_axis": "out"}, 10, 1.0),  # DoRA's rows fused at multiplier 1
    ("lora", {"dora_wd": True, "dora_axis": "out"}, 120, 1.0),
    ("glora", {}, 10, 0.7),  # on many positions GLoRA rebuilds the weight
    ("loha", {"dim": 4}, 10, 0.7),  # its Khatri-Rao pair has rank 4 x 4 = 16; this small layer rebuilds on many
]


@pytest.mark.parametrize("algo,options,positions,multiplier", CASES,
                         ids=[f"{a}-{','.join(o) or 'default'}-{n}" for a, o, n, _ in CASES])
def test_rank_16_adapters_train_the_formula_in_either_order(thin_ranks, algo, options, positions, multiplier):
    torch.manual_seed(0)
    layer = nn.Linear(40, 32).double().requires_grad_(False)
    adapter = randomize(make_adapter(algo, layer, **{"dim": 16, "alpha": 4, **options}).double())
    adapter.multiplier = multiplier
    check_against_formula(adapter, layer, torch.randn(2, positions // 2, 40, dtype=torch.float64))
    assert max(thin_ranks, default=0) >= 16, "the path must ask for a rank-16 factor gradient"
