"""convert's metadata and names against references computed here: kohya's sshs hashes recomputed with hashlib from
the written bytes, sd-scripts' U-Net name style per architecture, PEFT's scale lora_alpha / r kept in the kohya
alpha."""

from __future__ import annotations

import hashlib
import json

import pytest
import safetensors.torch
import torch

from lorakit.formats import load_file, save_file
from lorakit.tools.convert import convert

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/tools/conftest.py

PROJ_IN = "lora_unet_down_blocks_0_attentions_0_proj_in"


def _header_and_data(path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _kohya_hashes(path) -> tuple[str, str]:
    """sd-scripts' train_util.precalculate_safetensors_hashes for the file's tensors: sha256 of the data after the
    header (addnet_hash_safetensors), and the old A1111 hash, sha256 of 64 KiB at 1 MiB of the file serialized with
    only its ss_ metadata, first 8 hex digits (addnet_hash_legacy)."""
    header, data = _header_and_data(path)
    ss_only = {k: v for k, v in header.get("__metadata__", {}).items() if k.startswith("ss_")}
    serialized = safetensors.torch.save(safetensors.torch.load_file(str(path)), ss_only)
    return hashlib.sha256(data).hexdigest(), hashlib.sha256(serialized[0x100000:0x110000]).hexdigest()[:8]


@pytest.mark.parametrize("options", [{"dtype": "fp16"}, {"to": "diffusers"}], ids=["cast", "relayout"])
def test_sshs_hashes_are_those_of_the_written_tensors(tmp_path, options):
    """A1111 shows sshs_model_hash[:12] as the LoRA's hash: a convert that changes the tensors' bytes (a cast, or
    new names, which reorder the data) writes the hashes of what it wrote, not the input's. Over 1 MiB of fp16
    tensors, so the legacy hash reads tensor bytes, not the empty tail past the end of a small file."""
    g = torch.Generator().manual_seed(0)
    tensors = {f"{PROJ_IN}.lora_down.weight": torch.randn(8, 80_000, generator=g),
               f"{PROJ_IN}.lora_up.weight": torch.randn(320, 8, generator=g),
               f"{PROJ_IN}.alpha": torch.tensor(4.0),
               "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.randn(8, 768, generator=g),
               "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.randn(3072, 8, generator=g)}
    src, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_file(tensors, src, metadata={"ss_network_dim": "8", "sshs_model_hash": "0" * 64, "sshs_legacy_hash": "0" * 8})
    convert(src, out, **options)
    meta = _header_and_data(out)[0]["__metadata__"]
    assert (meta["sshs_model_hash"], meta["sshs_legacy_hash"]) == _kohya_hashes(out)
    assert meta["sshs_model_hash"] != "0" * 64 and meta["sshs_legacy_hash"] != hashlib.sha256(b"").hexdigest()[:8]


# one attention layer per architecture: (diffusers name, SGM name as sd-scripts' original U-Nets name it)
ATTN = {"sdxl": ("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q",
                 "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"),
        "sd1": ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
                "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q")}


@pytest.mark.parametrize("arch,given,want", [("sdxl", 0, 1), ("sd1", 1, 0)], ids=["sdxl-to-sgm", "sd1-to-diffusers"])
def test_unet_names_kohya_is_sd_scripts_style_for_the_architecture(tmp_path, arch, given, want):
    """--unet-names kohya writes the names sd-scripts trains with: SGM names for SDXL (sdxl_original_unet.py's
    input_blocks.4.1), diffusers names for SD1/SD2 (original_unet.py keeps diffusers' down_blocks.0.attentions.0)."""
    name = ATTN[arch][given]
    src, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_file({f"{name}.lora_down.weight": torch.randn(2, 8), f"{name}.lora_up.weight": torch.randn(8, 2),
               f"{name}.alpha": torch.tensor(2.0)}, src)
    convert(src, out, unet_names="kohya", arch=arch)
    tensors, _ = load_file(out)
    assert sorted(tensors) == [f"{ATTN[arch][want]}.{k}" for k in ("alpha", "lora_down.weight", "lora_up.weight")]


def test_peft_module_of_another_rank_than_r_keeps_the_configs_scale(tmp_path):
    """PEFT scales a LoRA layer by lora_alpha / r (LoraLayer.update_layer). A module whose rank is not the config's
    r (and no rank_pattern names it) keeps that scale in the kohya file: alpha = lora_alpha / r * its dim."""
    g = torch.Generator().manual_seed(1)
    ranks = {"proj_in": 2, "proj_out": 4}
    tensors = {}
    for layer, rank in ranks.items():
        tensors[f"unet.down_blocks.0.attentions.0.{layer}.lora_A.weight"] = torch.randn(rank, 8, generator=g)
        tensors[f"unet.down_blocks.0.attentions.0.{layer}.lora_B.weight"] = torch.randn(8, rank, generator=g)
    config = {"unet.r": 4, "unet.lora_alpha": 8, "unet.peft_type": "LORA", "unet.target_modules": list(ranks)}
    src, out = tmp_path / "peft.safetensors", tmp_path / "kohya.safetensors"
    save_file(tensors, src, metadata={"lora_adapter_metadata": json.dumps(config)})
    convert(src, out, to="kohya", arch="sd1")
    kohya, _ = load_file(out)
    for layer, rank in ranks.items():
        alpha = float(kohya[f"lora_unet_down_blocks_0_attentions_0_{layer}.alpha"])
        assert alpha / rank == pytest.approx(8 / 4), layer
