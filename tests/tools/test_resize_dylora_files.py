"""`lorakit resize` on DyLoRA files that lorakit's own network wrote: Network.save records the algorithm as
sd-scripts records a network (ss_network_module + ss_network_args), so resize cuts them as DyLoRA instead of
re-factorising them by SVD."""

from __future__ import annotations

import json

import pytest
import torch

from lorakit import create_network, load_network
from lorakit.formats import load_file, read_metadata
from lorakit.tools.resize import resize_lora

from ..network.tiny import randomize, tiny_model


@pytest.fixture(scope="module")
def dylora_file(tmp_path_factory):
    unet, tes = tiny_model("sd1")
    net = randomize(create_network(unet, tes, algo="dylora", preset="attn-mlp", dim=8, alpha=4, block_size=2))
    path = tmp_path_factory.mktemp("dylora") / "dy.safetensors"
    net.save(path)
    return path


def test_network_save_records_the_algorithm(dylora_file):
    meta = read_metadata(dylora_file)
    assert meta["ss_network_module"] == "lorakit"
    assert json.loads(meta["ss_network_args"]) == {"algo": "dylora"}


def test_resize_cuts_a_dylora_file_of_lorakits_network(dylora_file):
    source, _ = load_file(dylora_file)
    result = resize_lora(dylora_file, 4)
    downs = [k for k in source if k.endswith("lora_down.weight")]
    assert downs and all(result.layers[k.partition(".")[0]]["cut"] for k in downs)
    for key in downs:
        up = key.replace("lora_down", "lora_up")
        assert torch.equal(result.tensors[key], source[key][:4])
        assert torch.equal(result.tensors[up], source[up][:, :4])
        alpha = key.replace("lora_down.weight", "alpha")
        assert float(result.tensors[alpha]) == float(source[alpha]) == 4.0  # DyLoRA trains every prefix at alpha/k


def test_the_callers_network_keys_win_and_loaded_networks_name_their_algorithm(tmp_path):
    unet, tes = tiny_model("sd1")
    net = create_network(unet, tes, algo="loha", preset="attn-only", dim=2)
    net.save(tmp_path / "given.safetensors", metadata={"ss_network_module": "lycoris.kohya"})
    given = read_metadata(tmp_path / "given.safetensors")
    assert given["ss_network_module"] == "lycoris.kohya" and "ss_network_args" not in given
    loaded = load_network(unet, tmp_path / "given.safetensors", text_encoders=tes)
    loaded.save(tmp_path / "again.safetensors")
    assert json.loads(read_metadata(tmp_path / "again.safetensors")["ss_network_args"]) == {"algo": "loha"}


def test_a_dylora_cut_asked_of_a_file_not_marked_as_dylora_warns(dylora_file, tmp_path):
    """--dylora on a plain LoRA (or a DyLoRA whose metadata was lost) cuts it all the same, but says that the SVD
    resize keeps more of a LoRA trained otherwise; a file marked as DyLoRA cuts silently."""
    import warnings

    tensors, _ = load_file(dylora_file)
    with pytest.warns(UserWarning, match=r"cut as a DyLoRA, but its metadata .* names no DyLoRA"):
        resize_lora(tensors, 4, dylora=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resize_lora(dylora_file, 4, dylora=True)
