"""Issue 2: no algorithm keeps a tensor the size of the layer's weight for backward (a rebuilt or merged weight would
cost a weight's memory per adapted layer). `full` keeps its own parameter, which costs nothing more, and rebuilds
W + diff in backward. Checked on what autograd saves, with plain autograd through W + diff as the control that the
check sees such a tensor."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from lorakit.algos import make_adapter

# sizes where no activation has as many elements as the weight, so an element count identifies it
LAYERS = {
    "linear few positions": (lambda: nn.Linear(64, 48), (2, 7, 64)),
    "linear many positions": (lambda: nn.Linear(64, 48), (2, 100, 64)),
    "conv 3x3": (lambda: nn.Conv2d(16, 24, 3), (1, 16, 12, 12)),
    "conv 3x3 large input": (lambda: nn.Conv2d(16, 24, 3), (2, 16, 40, 40)),
    "conv 1x1 large input": (lambda: nn.Conv2d(16, 24, 1), (2, 16, 40, 40)),
}
ALGOS = [("lora", {"dim": 4}), ("lora", {"dim": 4, "dora_wd": True}),
         ("lora", {"dim": 4, "dora_wd": True, "dora_axis": "out"}), ("lora", {"dim": 4, "bypass_mode": False}),
         ("lora", {"dim": 4, "use_tucker": True}), ("loha", {"dim": 4}), ("loha", {"dim": 4, "bypass_mode": False}),
         ("loha", {"dim": 4, "use_tucker": True}), ("lokr", {"dim": 2}), ("lokr", {"dim": 2, "dora_wd": True}),
         ("ia3", {}), ("ia3", {"train_on_input": True}), ("dylora", {"dim": 4, "block_size": 2}),
         ("glora", {"dim": 4}), ("diag-oft", {"dim": 4}), ("diag-oft", {"dim": 4, "rescaled": True}),
         ("boft", {"dim": 6}), ("full", {})]


def _weight_sized_saved(algo: str, options: dict, layer_name: str, plain_full: bool = False) -> list[tuple]:
    make_layer, shape = LAYERS[layer_name]
    torch.manual_seed(0)
    layer = make_layer().requires_grad_(False)
    adapter = make_adapter(algo, layer, **options)
    with torch.no_grad():  # away from the zero start, so that no path is skipped
        for p in adapter.parameters():
            p.add_(0.1 * torch.randn_like(p))
    adapter.train()
    x = torch.randn(shape, requires_grad=True)
    # what is kept anyway: the input, the layer's weight and the adapter's own parameters
    own = {t.untyped_storage().data_ptr() for t in (layer.weight, x, *adapter.parameters())}
    found = []

    def pack(t):
        if t.numel() == layer.weight.numel() and t.untyped_storage().data_ptr() not in own:
            found.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        # the control (plain_full): autograd through the plain ops keeps W + diff
        y = adapter.spec.op(x, layer.weight + adapter.diff, layer.bias) if plain_full else adapter(x)
    y.square().sum().backward()
    return found


@pytest.mark.parametrize("layer_name", list(LAYERS))
@pytest.mark.parametrize("algo,options", ALGOS, ids=[f"{a}-{'-'.join(f'{k}={v}' for k, v in o.items())}"
                                                     for a, o in ALGOS])
def test_no_weight_sized_tensor_is_kept_for_backward(algo, options, layer_name):
    assert _weight_sized_saved(algo, options, layer_name) == []


@pytest.mark.parametrize("layer_name", list(LAYERS))
def test_the_check_sees_a_merged_weight(layer_name):
    assert _weight_sized_saved("full", {}, layer_name, plain_full=True)
