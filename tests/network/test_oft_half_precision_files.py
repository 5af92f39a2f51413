"""lorakit's own Diag-OFT/BOFT files saved in fp16 or bf16 load without the warning meant for LyCORIS' constrained
files: the saved bound and |Q| are each rounded to the file's dtype, so they may come out a rounding apart the wrong
way. A rotation truly above its bound is still reported at any dtype."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

from lorakit import create_network, load_network
from lorakit.formats.safetensors_io import load_file, save_file


def _model():
    return nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("algo, options", [("diag-oft", {}), ("diag-oft", {"constraint": 1e-3}), ("boft", {}),
                                           ("boft", {"constraint": 1e-3})])
def test_own_half_precision_oft_files_load_silently(tmp_path, dtype, algo, options):
    warned = 0
    for seed in range(8):
        torch.manual_seed(seed)
        net = create_network(_model(), algo=algo, dim=8, **options)
        with torch.no_grad():
            for p in net.parameters():
                p.normal_(0, 0.05)
        path = tmp_path / f"{seed}.safetensors"
        net.save(path, dtype=dtype)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            load_network(_model(), path)
        warned += sum("above their saved bound" in str(w.message) for w in caught)
    assert warned == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_a_rotation_above_its_bound_is_reported_at_any_dtype(tmp_path, dtype):
    net = create_network(_model(), algo="diag-oft", dim=8, constraint=1e-3)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.05)
    net.save(tmp_path / "a.safetensors", dtype=dtype)
    tensors, metadata = load_file(tmp_path / "a.safetensors")
    for key in [k for k in tensors if k.endswith(".oft_blocks")]:  # 5% past the bound (LyCORIS files: out_dim times)
        tensors[key] = (tensors[key].double() * 1.05).to(dtype)
    save_file(tensors, tmp_path / "b.safetensors", metadata=metadata)
    with pytest.warns(UserWarning, match=r"OFT module\(s\) hold a rotation above their saved bound"):
        load_network(_model(), tmp_path / "b.safetensors")
