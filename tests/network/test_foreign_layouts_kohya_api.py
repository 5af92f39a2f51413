"""The kohya API's load_weights (sd-scripts' --network_weights path) and the inspect/convert tools read other
trainers' files as load_network does: OneTrainer's OMI names, and embeddings bundled in a LoRA left out."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file as st_load
from safetensors.torch import save_file as st_save

from lorakit import kohya
from lorakit.tools.convert import convert
from lorakit.tools.inspect import inspect_file

from .test_foreign_layouts import OMI_SDXL
from .tiny import tiny_model


def test_load_weights_reads_a_onetrainer_omi_file_under_kohya_names(tmp_path):
    unet, tes = tiny_model("sdxl")
    net = kohya.create_network(1.0, 4, 1.0, None, tes, unet, algo="lora", conv_dim=4)
    own = net.state_dict()
    g = torch.Generator().manual_seed(0)
    omi, expected = {}, {}
    for prefix, name, _, _ in OMI_SDXL:  # the network's own tensors, changed, under OneTrainer's names
        for suffix in ("lora_down.weight", "lora_up.weight", "alpha"):
            value = torch.randn(own[f"{name}.{suffix}"].shape, generator=g)
            omi[f"{prefix}.{suffix}"] = expected[f"{name}.{suffix}"] = value
    st_save(omi, tmp_path / "omi.safetensors")
    missing, unexpected = net.load_weights(str(tmp_path / "omi.safetensors"))
    assert not unexpected and not set(missing) & set(expected)
    loaded = net.state_dict()
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key


def test_inspect_and_convert_leave_out_embeddings_bundled_in_a_lora(tmp_path):
    """A1111 reads bundle_emb.<name>.* as textual inversions; load_network leaves them out with a warning, and so
    do inspect and convert (they refused the file)."""
    unet, tes = tiny_model("sd1")
    net = kohya.create_network(1.0, 4, 1.0, None, tes[0], unet, preset="attn-mlp")
    tensors = {k: v.contiguous() for k, v in net.state_dict().items()}
    path = tmp_path / "bundled.safetensors"
    st_save({**tensors, "bundle_emb.mytoken.string_to_param.*": torch.randn(2, 32)}, path)
    with pytest.warns(UserWarning, match="mytoken"):
        report = inspect_file(path)
    assert report["summary"]["modules"] == len({k.partition(".")[0] for k in tensors})
    assert not report["malformed_modules"]
    with pytest.warns(UserWarning, match="mytoken"):
        convert(path, tmp_path / "d.safetensors", to="diffusers")
    assert not any("bundle_emb" in k for k in st_load(tmp_path / "d.safetensors"))
