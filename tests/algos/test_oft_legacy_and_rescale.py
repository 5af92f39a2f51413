"""Diag-OFT files beside lorakit's own: LyCORIS 2.0's `oft_diag` (each block's rotation R itself, which A1111's
network_oft.py applies), and LyCORIS' `rescale` at a multiplier other than 1 (lycoris/modules/diag_oft.py)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn

from lorakit import load_network
from lorakit.algos import adapter_from_state_dict, detect_algorithm

os.environ["LYCORIS_KERNEL_BACKEND"] = "torch"  # LyCORIS' eager reference bodies, as tests/algos/test_lycoris_interop.py


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 12), nn.Conv2d(12, 16, 3)).double()


def rotations(count: int, size: int, seed: int) -> torch.Tensor:
    """(count, size, size) rotations: the Cayley transforms of random skew-symmetric blocks."""
    b = torch.randn(count, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 0.3
    q = b - b.mT
    eye = torch.eye(size, dtype=torch.float64)
    return torch.linalg.solve(eye - q, eye + q)


def a1111_weight(w: torch.Tensor, r: torch.Tensor, multiplier: float) -> torch.Tensor:
    """A1111's network_oft.py on an `oft_diag` module (is_R): W' = einsum('k n m, k n ... -> k m ...', R, W),
    updown = W' - W, added at the multiplier."""
    k, b, _ = r.shape
    merged = torch.einsum("knm,kn...->km...", r, w.view(k, b, *w.shape[1:])).reshape(w.shape)
    return w + multiplier * (merged - w)


@pytest.mark.parametrize("multiplier", [1.0, 0.7])
def test_old_lycoris_oft_diag_files_load_as_diag_oft(multiplier):
    m = model()
    linear, conv = m[0].weight.clone(), m[1].weight.clone()
    r_linear, r_conv = rotations(4, 3, 0), rotations(4, 4, 1)  # LyCORIS' split: size <= count
    tensors = {"lycoris_0.oft_diag": r_linear, "lycoris_1.oft_diag": r_conv,
               "lycoris_1.alpha": torch.tensor(1.0, dtype=torch.float64)}  # A1111: "self.alpha is unused"
    net = load_network(m, tensors, multiplier=multiplier, dtype=torch.float64)
    assert {a.name for _, a in net.adapters()} == {"diag-oft"}
    net.merge()
    torch.testing.assert_close(m[0].weight, a1111_weight(linear, r_linear, multiplier), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(m[1].weight, a1111_weight(conv, r_conv, multiplier), rtol=1e-10, atol=1e-12)
    assert set(net.state_dict()) == {f"lycoris_{i}.{k}" for i in (0, 1) for k in ("oft_blocks", "alpha")}


def test_an_oft_diag_module_that_is_no_rotation_is_refused_by_name():
    """LyCORIS' first OFT (an additive block, zero at start) or a rescale folded into R: no rotation to convert."""
    m = model()
    scaled = rotations(4, 3, 0) * 1.1
    with pytest.raises(ValueError, match=r"module 'lycoris_0': an old LyCORIS Diag-OFT file \('oft_diag'.*not "
                                         r"rotations \(\|R\^T R - I\| up to 0\.21"):
        load_network(m, {"lycoris_0.oft_diag": scaled})
    with pytest.raises(ValueError, match=r"'oft_diag' of shape \(2, 3, 4, 4\) is no Diag-OFT"):
        load_network(m, {"lycoris_0.oft_diag": torch.zeros(2, 3, 4, 4)})


def test_detect_algorithm_names_an_oft_diag_module():
    with pytest.raises(ValueError, match=r"an old LyCORIS Diag-OFT module \('oft_diag'"):
        detect_algorithm({"oft_diag": rotations(4, 3, 0)})


def test_an_oft_diag_module_in_half_precision_loads():
    """R rounded to float16 is a rotation only to float16's precision: still read as one."""
    m = model()
    r = rotations(4, 3, 0)
    net = load_network(m, {"lycoris_0.oft_diag": r.half()}, dtype=torch.float64)
    w = m[0].weight.clone()
    net.merge()
    torch.testing.assert_close(m[0].weight, a1111_weight(w, r, 1.0), rtol=0, atol=5e-3)


# ----- rescale at a multiplier other than 1 --------------------------------------------------------------------------
@pytest.mark.parametrize("make_layer,x", [(lambda: nn.Linear(24, 16), (3, 5, 24)),
                                          (lambda: nn.Conv2d(24, 16, 3, padding=1), (2, 24, 6, 6))])
def test_rescaled_diag_oft_at_a_multiplier_is_the_linear_blend_of_lycoris_weight(make_layer, x):
    """lorakit: W + m (diag(s) R^T W - W), what every other algorithm does with m (m = 0: the layer unchanged).
    LyCORIS' make_weight: diag(s) ((1 - m) W + m R^T W) (m = 0 still rescales W). Equal at m = 1; they differ by
    (1 - m)(1 - s) W (docs/algorithms.md). LyCORIS runs in float32 ((I - Q).float().inverse() fails in float64)."""
    modules = pytest.importorskip("lycoris.modules")
    torch.manual_seed(0)
    layer = make_layer()
    lyco = modules.DiagOFTModule("lyco", layer, lora_dim=4, rescaled=True)
    with torch.no_grad():
        lyco.oft_blocks.normal_(0, 0.2)
        lyco.rescale.copy_(1 + 0.2 * torch.randn_like(lyco.rescale))
    m, w, s = 0.7, layer.weight.double(), lyco.rescale.detach().double()
    lycoris_at = {k: lyco.get_merged_weight(k)[0].detach().double() for k in (1.0, m)}

    sd = {k: v.detach().double() for k, v in lyco.state_dict().items()}
    adapter = adapter_from_state_dict(layer.double(), sd, multiplier=m)
    ours = w + adapter.delta_weight(m)
    torch.testing.assert_close(w + adapter.delta_weight(1.0), lycoris_at[1.0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours, w + m * (lycoris_at[1.0] - w), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lycoris_at[m], m * lycoris_at[1.0] + (1 - m) * s * w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours - lycoris_at[m], (1 - m) * (1 - s) * w, rtol=1e-4, atol=1e-6)  # not 0

    inputs = torch.randn(*x, dtype=torch.float64)
    op = nn.functional.linear if isinstance(layer, nn.Linear) else nn.functional.conv2d
    extra = {} if isinstance(layer, nn.Linear) else {"padding": 1}
    with torch.no_grad():  # the forward (per-block and dense paths) and the merge give the same weight
        torch.testing.assert_close(adapter(inputs), op(inputs, ours, layer.bias, **extra), rtol=1e-9, atol=1e-10)
        adapter.merge()
        torch.testing.assert_close(layer.weight, ours, rtol=1e-12, atol=1e-12)
