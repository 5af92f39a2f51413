"""torch.compile (sd-scripts' --torch_compile) traces adapted layers without graph breaks, so a compiled model keeps
whole graphs around its adapters; DoRA's fused paths and cached |W|^2, whose checks read values, step aside while
compiling. Left out, as they break the graph: LoHa's rebuilt-weight path on convolutions (it recomputes its weight
with torch.autograd.grad in backward, which dynamo does not trace), DyLoRA's random rank while training (a new shape
each step) and module_dropout (a random choice to skip the adapter)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorakit.algos import make_adapter

dynamo = pytest.importorskip("torch._dynamo")


ALGOS = [("lora", {}), ("lokr", {}), ("ia3", {}), ("diag-oft", {}), ("boft", {}), ("glora", {}), ("full", {}),
         ("lora", {"dora_wd": True}), ("lora", {"dora_wd": True, "dora_axis": "out"}), ("lora", {"use_tucker": True})]


@pytest.mark.parametrize("algo,options", ALGOS, ids=[f"{a}-{o}" for a, o in ALGOS])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_adapted_layer_traces_without_graph_breaks(algo, options, kind):
    torch.manual_seed(0)
    if kind == "linear":
        layer, x = nn.Linear(16, 16), torch.randn(3, 16)
    else:
        layer, x = nn.Conv2d(8, 8, 3, padding=1), torch.randn(2, 8, 8, 8)
    layer.requires_grad_(False)
    make_adapter(algo, layer, **options).apply().train()
    dynamo.reset()
    explained = dynamo.explain(lambda inputs: layer(inputs).sum())(x)
    assert explained.graph_break_count == 0, [str(b.reason).splitlines()[0] for b in explained.break_reasons]
