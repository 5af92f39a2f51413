"""A1111 tells an SDXL LoRA by ss_base_model_version (starting "sdxl_") and takes any other file with metadata
for SD1, hiding it from its Lora tab while an SDXL model is loaded. Every file lorakit writes for SDXL therefore
carries sd-scripts' base model keys, unless its metadata (or the input's) already says."""

from __future__ import annotations

import pytest

from lorakit.formats import read_metadata
from lorakit.network import create_network
from lorakit.tools.convert import convert
from lorakit.tools.merge import merge_loras
from lorakit.tools.resize import resize_lora

from ..network.tiny import randomize, tiny_model

SDXL = {"ss_v2": "False", "ss_base_model_version": "sdxl_base_v1-0"}


def _saved(tmp_path, kind, metadata=None):
    unet, tes = tiny_model(kind)
    net = create_network(unet, tes, algo="lora", dim=4, alpha=2)
    randomize(net)
    path = tmp_path / f"{kind}.safetensors"
    net.save(path, metadata=metadata)
    return path


def _base_keys(path):
    meta = read_metadata(path)
    return {k: meta[k] for k in ("ss_v2", "ss_base_model_version") if k in meta}


def test_network_save_writes_the_architectures_keys(tmp_path):
    assert _base_keys(_saved(tmp_path, "sdxl", {"ss_network_dim": "4"})) == SDXL
    assert _base_keys(_saved(tmp_path, "sd1")) == {"ss_v2": "False", "ss_base_model_version": "sd_v1"}
    given = {"ss_base_model_version": "sdxl_base_v1-0_custom"}  # the caller's value is kept
    assert _base_keys(_saved(tmp_path / "given", "sdxl", given)) == given


@pytest.mark.parametrize("tool", ["merge", "merge_svd", "resize", "convert", "convert_peft"])
def test_tools_name_an_sdxl_lora_when_the_input_does_not(tmp_path, tool):
    from safetensors.torch import load_file, save_file

    source = _saved(tmp_path, "sdxl")
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(source), bare)  # what a file from another tool looks like: no metadata at all
    out = tmp_path / "out.safetensors"
    if tool == "merge":
        merge_loras([bare, bare], [1.0, 0.5], out, progress=False)
    elif tool == "merge_svd":
        merge_loras([bare], [1.0], out, new_rank=2, progress=False)
    elif tool == "resize":
        resize_lora(bare, 2, out)
    elif tool == "convert":
        convert(bare, out, to="kohya", unet_names="diffusers")
    else:  # to diffusers and back: the diffusers file names its second text encoder
        convert(bare, tmp_path / "peft.safetensors", to="diffusers")
        convert(tmp_path / "peft.safetensors", out, to="kohya")
    assert _base_keys(out) == SDXL


def test_convert_takes_the_architecture_the_user_names(tmp_path):
    from safetensors.torch import load_file, save_file

    bare = tmp_path / "bare.safetensors"
    save_file(load_file(_saved(tmp_path, "sd1")), bare)
    convert(bare, tmp_path / "sd2.safetensors", to="kohya", arch="sd2")
    assert _base_keys(tmp_path / "sd2.safetensors") == {"ss_v2": "True", "ss_base_model_version": "sd_v2"}
    convert(bare, tmp_path / "unknown.safetensors", to="kohya")  # SD1 or SD2: the names cannot tell
    assert _base_keys(tmp_path / "unknown.safetensors") == {}
