"""Files of other trainers that hold kohya's tensors under other names: OneTrainer's OMI layout and sd-scripts' own
OFT (`networks/oft.py`). Names are written by hand from the trainers' code (OneTrainer
`modules/util/convert/lora/convert_sd_lora.py` / `convert_sdxl_lora.py` / `convert_clip.py`; sd-scripts
`OFTNetwork.OFT_PREFIX_UNET`), not from lorakit's name map; the merged weights are checked against float64
formulas written from the same code."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file as st_load
from safetensors.torch import save_file as st_save

from lorakit import load_network
from lorakit.cli import main
from lorakit.network.load import check_layout
from lorakit.tools.convert import convert
from lorakit.tools.inspect import inspect_file

from .tiny import tiny_model

# (OMI key prefix, kohya name, component index (0 U-Net, 1, 2 text encoders), module path in the tiny model)
OMI_SDXL = [
    ("unet.input_blocks.4.1.transformer_blocks.0.attn1.to_q",
     "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
     0, "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"),
    ("unet.input_blocks.4.1.proj_in", "lora_unet_input_blocks_4_1_proj_in", 0, "down_blocks.1.attentions.0.proj_in"),
    ("unet.output_blocks.2.2.conv", "lora_unet_output_blocks_2_2_conv", 0, "up_blocks.0.upsamplers.0.conv"),
    ("unet.middle_block.0.in_layers.2", "lora_unet_middle_block_0_in_layers_2", 0, "mid_block.resnets.0.conv1"),
    ("clip_l.text_model.encoder.layers.0.self_attn.q_proj", "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
     1, "encoder.layers.0.self_attn.q_proj"),
    ("clip_g.text_model.encoder.layers.1.mlp.fc1", "lora_te2_text_model_encoder_layers_1_mlp_fc1",
     2, "text_model.encoder.layers.1.mlp.fc1"),
]
OMI_SD1 = [  # SD1's OMI U-Net names are LDM paths too; kohya writes SD1 with diffusers paths
    ("unet.input_blocks.1.1.transformer_blocks.0.attn2.to_k",
     "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k",
     0, "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"),
    ("unet.output_blocks.3.0.skip_connection", "lora_unet_up_blocks_1_resnets_0_conv_shortcut",
     0, "up_blocks.1.resnets.0.conv_shortcut"),
    ("clip_l.text_model.encoder.layers.1.self_attn.out_proj", "lora_te_text_model_encoder_layers_1_self_attn_out_proj",
     1, "encoder.layers.1.self_attn.out_proj"),
]


def _module(root, path):
    for part in path.split("."):
        root = getattr(root, part)
    return root


def _components(kind):
    unet, tes = tiny_model(kind)
    return [unet, *tes]


def _omi_lora(kind, table, seed=0):
    """(OMI tensors, the same tensors under kohya names): LoRA factors of rank 2..4, alphas of several dtypes."""
    g = torch.Generator().manual_seed(seed)
    omi, kohya = {}, {}
    for k, (prefix, name, comp, path) in enumerate(table):
        w = _module(_components(kind)[comp], path).weight
        rank, kernel = 2 + k % 3, tuple(w.shape[2:])
        tensors = {"lora_down.weight": torch.randn(rank, w.shape[1], *kernel, generator=g) * 0.1,
                   "lora_up.weight": torch.randn(w.shape[0], rank, *(1,) * len(kernel), generator=g) * 0.1,
                   "alpha": torch.tensor(1.5 + k, dtype=(torch.float32, torch.float16, torch.bfloat16)[k % 3])}
        for suffix, value in tensors.items():
            omi[f"{prefix}.{suffix}"], kohya[f"{name}.{suffix}"] = value, value
    return omi, kohya


@pytest.mark.parametrize("kind, table", [("sdxl", OMI_SDXL), ("sd1", OMI_SD1)], ids=["sdxl", "sd1"])
def test_onetrainer_omi_file_loads_with_the_lora_formula(tmp_path, kind, table):
    """OneTrainer's OMI keys (unet. + SGM path, clip_l./clip_g. + CLIP path, kohya's tensors) load on the modules
    they name: W + m alpha/rank up @ down, in float64 exactly."""
    omi, _ = _omi_lora(kind, table)
    st_save(omi, tmp_path / "omi.safetensors")
    unet, tes = tiny_model(kind)
    net = load_network(unet, tmp_path / "omi.safetensors", tes, multiplier=0.7, dtype=torch.float64)
    assert len(net) == len(table)
    adapters = dict(net.adapters())
    by_module = {(e.component, e.path): adapters[name] for name, e in net.entries.items()}
    for prefix, name, comp, path in table:
        adapter = by_module[(("unet", "text_encoder", "text_encoder_2")[comp], path)]
        w = _module(_components(kind)[comp], path).weight.double()
        down, up = omi[f"{prefix}.lora_down.weight"].double(), omi[f"{prefix}.lora_up.weight"].double()
        scale = float(omi[f"{prefix}.alpha"]) / down.shape[0]
        expected = 0.7 * scale * (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
        torch.testing.assert_close(adapter.delta_weight(0.7), expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("kind, table", [("sdxl", OMI_SDXL), ("sd1", OMI_SD1)], ids=["sdxl", "sd1"])
def test_onetrainer_omi_file_converts_and_inspects_under_kohya_names(tmp_path, kind, table, capsys):
    """`lorakit convert` writes the kohya file sd-scripts would (SGM names for SDXL, diffusers names for SD1,
    lora_te_ for SD1's clip_l), the same tensors; inspect shows the modules under those names."""
    omi, kohya = _omi_lora(kind, table)
    st_save(omi, tmp_path / "omi.safetensors")
    report = convert(tmp_path / "omi.safetensors", tmp_path / "k.safetensors")
    assert (report.source_layout, report.target_layout) == ("omi", "kohya")
    out = st_load(tmp_path / "k.safetensors")
    assert sorted(out) == sorted(kohya)
    assert all(torch.equal(out[k], v) and out[k].dtype == v.dtype for k, v in kohya.items())
    shown = inspect_file(tmp_path / "omi.safetensors")
    assert shown["layout"].startswith("OneTrainer OMI")
    assert {m["name"] for m in shown["modules"] if m["component"] != "unet"} == \
        {n for _, n, c, _ in table if c} and shown["malformed_modules"] == {}
    assert {m["algo"] for m in shown["modules"]} == {"lora"}
    assert main(["inspect", str(tmp_path / "omi.safetensors"), "--summary"]) == 0
    capsys.readouterr()


def test_omi_and_dotted_names_are_named_by_the_tools_that_do_not_read_them(tmp_path):
    """Tools that take kohya files only (resize, merge --loras) point OMI files to `lorakit convert`; other keys
    with a dotted module path are called that, never an adapter named 'unet'."""
    omi, _ = _omi_lora("sdxl", OMI_SDXL)
    with pytest.raises(ValueError, match=r"f: is a OneTrainer OMI-layout file .*lorakit convert --to kohya"):
        check_layout(omi, "f")
    dotted = {"lora_unet.down_blocks.1.attentions.0.proj_in.lora_down.weight": torch.zeros(2, 32)}
    unet, tes = tiny_model("sdxl")
    with pytest.raises(ValueError, match=r"give the module as a dotted path") as err:
        load_network(unet, dotted, tes)
    assert "adapter name" not in str(err.value)
