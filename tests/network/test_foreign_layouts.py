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


# sd-scripts OFT modules on the tiny SD1 U-Net: (module path, block count); out_dim / count channels per block
SD_SCRIPTS_OFT = [("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", 4),   # Linear 16: 4 x 4
                  ("down_blocks.0.attentions.0.proj_in", 4),                           # conv 1x1 16: 4 x 4
                  ("down_blocks.2.attentions.1.transformer_blocks.0.ff.net.2", 8),     # Linear 32: 8 x 4
                  ("up_blocks.1.resnets.0.conv1", 16)]                                 # conv 3x3 32: 16 x 2


def _sd_scripts_oft_file(alpha, scale, dtype=torch.float32, table=SD_SCRIPTS_OFT, seed=0):
    """What OFTNetwork.save_weights writes: oft_unet_<path>.oft_blocks (dim, out/dim, out/dim), raw (unclamped),
    and the alpha buffer (the constraint per output channel)."""
    g = torch.Generator().manual_seed(seed)
    unet, _ = tiny_model("sd1")
    t = {}
    for path, count in table:
        size = _module(unet, path).weight.shape[0] // count
        name = "oft_unet_" + path.replace(".", "_")
        t[f"{name}.oft_blocks"] = (torch.randn(count, size, size, generator=g) * scale).to(dtype)
        t[f"{name}.alpha"] = torch.tensor(alpha, dtype=dtype)
    return t


def _sd_scripts_oft_weight(blocks, alpha, weight, m):
    """sd-scripts OFTInfModule.merge_to (get_weight, then einsum 'k n m, k n ... -> k m ...'), float64; A1111's
    network_oft.py (is_kohya) computes the same with the multiplier on the difference."""
    b = blocks.double()
    count, size, _ = b.shape
    constraint = float(alpha) * weight.shape[0]
    q = b - b.transpose(1, 2)
    norm = torch.norm(q.flatten())
    q = q * ((torch.clamp(norm, max=constraint) + 1e-8) / (norm + 1e-8))
    eye = torch.eye(size, dtype=torch.float64).unsqueeze(0).repeat(count, 1, 1)
    r = torch.matmul(eye + q, (eye - q).inverse())
    r = m * (r - eye) + eye
    w = weight.double().reshape(count, size, -1)
    return torch.einsum("k n m, k n ... -> k m ...", r, w).reshape(weight.shape)


@pytest.mark.parametrize("alpha, scale", [(1e-3, 0.05), (0.5, 0.01), (0.0, 0.05)],
                         ids=["shrunk", "within-bound", "alpha-0"])
@pytest.mark.parametrize("m", [1.0, 0.7])
def test_sd_scripts_oft_file_merges_as_sd_scripts_does(tmp_path, alpha, scale, m):
    """sd-scripts' own OFT files (networks/oft.py, oft_unet_ names, alpha * out_dim the bound on |Q|, a larger Q
    shrunk by (bound + 1e-8) / (|Q| + 1e-8)) load as Diag-OFT and merge to sd-scripts' weights in float64."""
    import copy
    import warnings

    t = _sd_scripts_oft_file(alpha, scale)
    st_save(t, tmp_path / "oft.safetensors")
    unet, tes = tiny_model("sd1")
    model = copy.deepcopy(unet).double()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # sd-scripts shrinks Q itself: nothing to warn about
        net = load_network(model, tmp_path / "oft.safetensors", tes, multiplier=m, dtype=torch.float64)
    assert sorted(net.names()) == sorted("lora_unet_" + p.replace(".", "_") for p, _ in SD_SCRIPTS_OFT)
    assert {a.name for _, a in net.adapters()} == {"diag-oft"}
    net.merge()
    for path, _ in SD_SCRIPTS_OFT:
        name = "oft_unet_" + path.replace(".", "_")
        expected = _sd_scripts_oft_weight(t[f"{name}.oft_blocks"], t[f"{name}.alpha"], _module(unet, path).weight, m)
        torch.testing.assert_close(_module(model, path).weight, expected, rtol=1e-12, atol=1e-14)


# sd-scripts' default network_dim 4 (its block count) below sqrt(out_dim): blocks larger than their count, a split
# LyCORIS' factorization never makes
SD_SCRIPTS_OFT_LARGE_BLOCKS = [("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", 2),  # Linear 16: 2 x 8
                               ("down_blocks.2.attentions.1.transformer_blocks.0.ff.net.2", 2),    # Linear 32: 2 x 16
                               ("up_blocks.1.resnets.0.conv1", 4)]                                 # conv 3x3 32: 4 x 8


@pytest.mark.parametrize("m", [1.0, 0.7])
def test_sd_scripts_oft_with_blocks_larger_than_their_count_merges_as_sd_scripts_does(tmp_path, m):
    """sd-scripts' dim is the block count (4 by default): blocks of out_dim / dim channels, larger than their count.
    Diag-OFT keeps the file's split: the merged weight is sd-scripts' (float64), inspect finds nothing malformed, and
    the network saved and loaded again keeps the blocks' shape and weight."""
    import copy

    t = _sd_scripts_oft_file(1e-3, 0.05, table=SD_SCRIPTS_OFT_LARGE_BLOCKS)
    st_save(t, tmp_path / "oft.safetensors")
    unet, tes = tiny_model("sd1")
    model = copy.deepcopy(unet).double()
    net = load_network(model, tmp_path / "oft.safetensors", tes, multiplier=m, dtype=torch.float64)
    net.save(tmp_path / "saved.safetensors")
    net.merge()
    for path, count in SD_SCRIPTS_OFT_LARGE_BLOCKS:
        name = "oft_unet_" + path.replace(".", "_")
        expected = _sd_scripts_oft_weight(t[f"{name}.oft_blocks"], t[f"{name}.alpha"], _module(unet, path).weight, m)
        torch.testing.assert_close(_module(model, path).weight, expected, rtol=1e-12, atol=1e-14)
    saved = st_load(tmp_path / "saved.safetensors")
    again = load_network(copy.deepcopy(unet).double(), tmp_path / "saved.safetensors", tes, multiplier=m,
                         dtype=torch.float64)
    for path, count in SD_SCRIPTS_OFT_LARGE_BLOCKS:
        name = "lora_unet_" + path.replace(".", "_")
        size = _module(unet, path).weight.shape[0] // count
        assert saved[f"{name}.oft_blocks"].shape == (count, size, size)
        torch.testing.assert_close(again.state_dict()[f"{name}.oft_blocks"], net.state_dict()[f"{name}.oft_blocks"])
    report = inspect_file(tmp_path / "oft.safetensors")
    assert report["layout"].startswith("sd-scripts OFT") and report["malformed_modules"] == {}


def test_sd_scripts_oft_file_inspects_with_its_own_names_and_alphas(tmp_path):
    t = _sd_scripts_oft_file(1e-3, 0.05)
    st_save(t, tmp_path / "oft.safetensors")
    report = inspect_file(tmp_path / "oft.safetensors")
    assert report["malformed_modules"] == {}
    assert {m["name"]: (m["algo"], m["component"], m["block"], m["dim"]) for m in report["modules"]} == {
        "oft_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": ("diag-oft", "unet", "IN01", 4),
        "oft_unet_down_blocks_0_attentions_0_proj_in": ("diag-oft", "unet", "IN01", 4),
        "oft_unet_down_blocks_2_attentions_1_transformer_blocks_0_ff_net_2": ("diag-oft", "unet", "IN08", 4),
        "oft_unet_up_blocks_1_resnets_0_conv1": ("diag-oft", "unet", "OUT03", 2)}
    assert report["summary"]["alphas"] == {str(float(torch.tensor(1e-3))): 4}
