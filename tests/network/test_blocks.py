"""U-Net blocks and kohya's per-block vectors, on full-size SD1.5 / SDXL built on the meta device."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from lorakit.network.blocks import (
    KOHYA_SD25,
    KOHYA_SDXL23,
    LBW12,
    LBW17,
    LBW26,
    SDXL20,
    Location,
    expand_block_values,
    kohya_block_dims_alphas,
    kohya_block_index,
    kohya_block_lr_weight,
    kohya_lr_shape,
    layout_for,
    locate,
    parse_kohya_block_lr_kwargs,
    pick_layout,
)
from lorakit.network.names import adapter_name, diffusers_to_ldm, sdxl_diffusers_to_sgm

from . import kohya_default_targets, meta_model


# ------------------------------------------------------------------------------------- layouts


def test_layout_names():
    assert KOHYA_SD25.names == tuple(f"IN{k:02d}" for k in range(12)) + ("MID",) + tuple(f"OUT{k:02d}" for k in range(12))
    assert KOHYA_SDXL23.names == (("EMB",) + tuple(f"IN{k:02d}" for k in range(9)) + ("MID0", "MID1", "MID2")
                                  + tuple(f"OUT{k:02d}" for k in range(9)) + ("FINAL",))
    assert SDXL20.names == ("BASE",) + tuple(f"IN{k:02d}" for k in range(9)) + ("MID",) + tuple(f"OUT{k:02d}" for k in range(9))
    assert [len(l) for l in (KOHYA_SD25, KOHYA_SDXL23, SDXL20, LBW26, LBW17, LBW12)] == [25, 23, 20, 26, 17, 12]
    assert SDXL20.position("M00") == SDXL20.position("mid") == 10
    assert SDXL20.position("IN4") == 5 and SDXL20.position("OUT08") == 19 and SDXL20.position("BASE") == 0
    with pytest.raises(ValueError):
        SDXL20.position("IN09")
    assert layout_for("sdxl", 20) is SDXL20 and layout_for("sdxl", 23) is KOHYA_SDXL23
    assert layout_for("sd1", 25) is KOHYA_SD25 and layout_for("sd2", 17) is LBW17
    with pytest.raises(ValueError):
        layout_for("sd1", 20)



def test_a_mapping_of_block_values_takes_the_layout_of_its_arch_in_any_case():
    """pick_layout: {block: value} is read with SDXL20's names for SDXL, with kohya's 25 blocks for SD1/SD2 or an
    unknown arch; the arch is read in any case, as layout_for reads it for a vector."""
    values = {"IN04": 0.5, "MID": 2.0}
    assert pick_layout("sdxl", values) is SDXL20 and pick_layout("SDXL", values) is SDXL20
    assert pick_layout("SDXL", [1.0] * 20) is SDXL20
    assert pick_layout("sd1", values) is KOHYA_SD25 and pick_layout(None, values) is KOHYA_SD25
    assert pick_layout("sdxl", values, "LBW12") is LBW12

SD_INDEX = {  # diffusers path -> kohya 25-block index (and name)
    "conv_in": (0, "IN00"),
    "down_blocks.0.resnets.0.conv1": (1, "IN01"),
    "down_blocks.0.attentions.0.proj_in": (1, "IN01"),
    "down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q": (2, "IN02"),
    "down_blocks.0.downsamplers.0.conv": (3, "IN03"),
    "down_blocks.1.resnets.0.conv_shortcut": (4, "IN04"),
    "down_blocks.2.attentions.1.proj_out": (8, "IN08"),
    "down_blocks.2.downsamplers.0.conv": (9, "IN09"),
    "down_blocks.3.resnets.1.conv2": (11, "IN11"),
    "mid_block.resnets.0.conv1": (12, "MID"),
    "mid_block.attentions.0.transformer_blocks.0.ff.net.2": (12, "MID"),
    "up_blocks.0.resnets.0.conv1": (13, "OUT00"),
    "up_blocks.0.resnets.2.conv1": (15, "OUT02"),
    "up_blocks.0.upsamplers.0.conv": (15, "OUT02"),
    "up_blocks.1.attentions.0.proj_in": (16, "OUT03"),
    "up_blocks.2.upsamplers.0.conv": (21, "OUT08"),
    "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_v": (24, "OUT11"),
}


def test_sd_block_index_examples():
    for path, (idx, name) in SD_INDEX.items():
        assert KOHYA_SD25.index(path) == idx, path
        assert KOHYA_SD25.name(path) == name, path
        ldm = diffusers_to_ldm(path)
        assert KOHYA_SD25.index(ldm) == idx, ldm  # LDM paths give the same block
        assert LBW26.name(path) == name and LBW26.index(path) == idx + 1
    for path in ("time_embedding.linear_1", "conv_norm_out", "conv_out", "down_blocks.1", "up_blocks.0.resnets"):
        assert KOHYA_SD25.index(path) is None, path
    assert KOHYA_SD25.index("mid_block.attentions") == KOHYA_SD25.index("mid_block") == 12  # all in MID
    assert KOHYA_SD25.index("encoder.layers.0.mlp.fc1", "text_encoder") is None
    assert LBW26.name("encoder.layers.0.mlp.fc1", "text_encoder") == "BASE"
    assert LBW17.name("down_blocks.0.downsamplers.0.conv") is None
    assert LBW17.index("up_blocks.1.attentions.0.proj_in") == LBW17.names.index("OUT03")


SDXL_INDEX = {  # diffusers path -> (kohya 23 index, kohya 23 name, SDXL20 name)
    "time_embedding.linear_1": (0, "EMB", None),
    "add_embedding.linear_2": (0, "EMB", None),
    "conv_in": (1, "IN00", "IN00"),
    "down_blocks.0.resnets.0.conv1": (2, "IN01", "IN01"),
    "down_blocks.0.downsamplers.0.conv": (4, "IN03", "IN03"),
    "down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q": (5, "IN04", "IN04"),
    "down_blocks.2.attentions.1.proj_out": (9, "IN08", "IN08"),
    "mid_block.resnets.0.norm1": (10, "MID0", "MID"),
    "mid_block.attentions.0.proj_in": (11, "MID1", "MID"),
    "mid_block.resnets.1.conv2": (12, "MID2", "MID"),
    "up_blocks.0.resnets.0.conv1": (13, "OUT00", "OUT00"),
    "up_blocks.0.upsamplers.0.conv": (15, "OUT02", "OUT02"),
    "up_blocks.1.attentions.2.proj_out": (18, "OUT05", "OUT05"),
    "up_blocks.2.resnets.2.conv2": (21, "OUT08", "OUT08"),
    "conv_norm_out": (22, "FINAL", None),
    "conv_out": (22, "FINAL", None),
}


def test_sdxl_block_index_examples():
    for path, (idx, name, name20) in SDXL_INDEX.items():
        sgm = sdxl_diffusers_to_sgm(path)
        for p in (path, sgm):
            assert KOHYA_SDXL23.index(p) == idx, p
            assert KOHYA_SDXL23.name(p) == name, p
            assert SDXL20.name(p) == name20, p
        assert kohya_block_index(adapter_name("lora_unet_", sgm), is_sdxl=True) == idx
    for te in ("text_encoder", "text_encoder_2"):
        assert SDXL20.index("text_model.encoder.layers.0.mlp.fc1", te) == 0
        assert KOHYA_SDXL23.index("text_model.encoder.layers.0.mlp.fc1", te) is None
    assert SDXL20.index("mid_block") == 10 and KOHYA_SDXL23.index("mid_block") is None
    assert LBW12.name("down_blocks.2.attentions.0.proj_in") == "IN07"
    assert LBW12.name("down_blocks.0.resnets.0.conv1") is None


def test_locate():
    assert locate("down_blocks.1.attentions.1.proj_in") == Location("in", 5) == locate("input_blocks.5.1.proj_in")
    assert locate("mid_block.attentions.0.norm") == Location("mid", 1) == locate("middle_block.1.norm")
    assert locate("up_blocks.1.upsamplers.0") == Location("out", 5)
    assert locate("anything", "text_encoder_2") == Location("base")
    assert locate("encoder.layers.0", "vae") is None
    assert locate("down_blocks") is None and locate("input_blocks") is None


@pytest.mark.parametrize("model", ["sd15", "sdxl"])
def test_path_index_matches_kohya_name_index(model):
    """Over every U-Net module holding parameters, the path-based index equals sd-scripts'
    get_block_index on the module's kohya name; for SD1/SD2 except the modules kohya puts in no block."""
    unet, _ = meta_model(model)
    sdxl = model == "sdxl"
    layout = KOHYA_SDXL23 if sdxl else KOHYA_SD25
    outside = Counter()
    for path, module in unet.named_modules():
        if not any(True for _ in module.parameters(recurse=False)):
            continue
        name_path = sdxl_diffusers_to_sgm(path) if sdxl else path
        kohya = kohya_block_index(adapter_name("lora_unet_", name_path), sdxl)
        ours = layout.index(path)
        if kohya == -1:
            outside[path] += 1
            assert not sdxl
            assert path in ("conv_in", "time_embedding.linear_1", "time_embedding.linear_2", "conv_norm_out", "conv_out")
            assert ours == (0 if path == "conv_in" else None)
        else:
            assert ours == kohya, path
    assert len(outside) == (0 if sdxl else 5)


@pytest.mark.parametrize("model", ["sd15", "sdxl"])
def test_default_targets_per_block(model):
    unet, tes = meta_model(model)
    targets = kohya_default_targets(unet, tes)
    if model == "sd15":
        per = Counter(KOHYA_SD25.name(p) for c, p in targets if c == "unet")
        assert per == {n: 12 for n in ("IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "MID",
                                       *(f"OUT{k:02d}" for k in range(3, 12)))}
        assert set(per) == set(LBW17.names) - {"BASE"}  # LBW 17 = the blocks holding attentions
        assert Counter(LBW17.name(p, c) for c, p in targets)["BASE"] == 72
    else:
        per = Counter(SDXL20.name(p, c) for c, p in targets)
        assert per == {"BASE": 264, "IN04": 22, "IN05": 22, "IN07": 102, "IN08": 102, "MID": 102,
                       "OUT00": 102, "OUT01": 102, "OUT02": 102, "OUT03": 22, "OUT04": 22, "OUT05": 22}
        assert set(per) == set(LBW12.names)
        assert Counter(KOHYA_SDXL23.name(p) for c, p in targets if c == "unet")["MID1"] == 102


def test_blocks_a_short_lbw_vector_leaves_out_get_weight_0():
    """LoRA Block Weight's to26() fills the blocks its 17 and 12 values leave out with 0; EMB and FINAL, which
    none of its layouts lists, keep 1. Every other layout keeps 1 for what it does not list."""
    assert LBW17.unlisted == LBW12.unlisted == 0.0
    assert all(l.unlisted == 1.0 for l in (KOHYA_SD25, KOHYA_SDXL23, SDXL20, LBW26))
    half = LBW17.block_values([0.5] * 17)
    weights = {p: LBW17.module_weight(half, p) for p in (
        "conv_in", "down_blocks.0.downsamplers.0.conv", "up_blocks.0.resnets.0.conv1", "down_blocks.3.resnets.1.conv2",
        "down_blocks.0.attentions.0.proj_in", "mid_block.resnets.0.conv1", "time_embedding.linear_1", "conv_out")}
    assert weights == {"conv_in": 0.0, "down_blocks.0.downsamplers.0.conv": 0.0, "up_blocks.0.resnets.0.conv1": 0.0,
                       "down_blocks.3.resnets.1.conv2": 0.0, "down_blocks.0.attentions.0.proj_in": 0.5,
                       "mid_block.resnets.0.conv1": 0.5, "time_embedding.linear_1": 1.0, "conv_out": 1.0}
    assert LBW17.module_weight(half, "encoder.layers.0.mlp.fc1", "text_encoder") == 0.5
    xl = LBW12.block_values([2.0] * 12)
    assert [LBW12.module_weight(xl, p) for p in ("input_blocks.0.0", "input_blocks.3.0.op", "output_blocks.8.0.skip_connection",
                                                 "input_blocks.4.1.proj_in", "time_embed.0", "label_emb.0.0", "out.2")] \
        == [0.0, 0.0, 0.0, 2.0, 1.0, 1.0, 1.0]
    # a mapping names some blocks of a layout: the others keep 1
    some = KOHYA_SD25.block_values({"IN04": 0.5, "M00": 0})
    assert [KOHYA_SD25.module_weight(some, p) for p in ("down_blocks.1.attentions.0.proj_in", "mid_block.resnets.1.conv1",
                                                        "conv_in", "time_embedding.linear_1")] == [0.5, 0.0, 1.0, 1.0]
    assert KOHYA_SD25.module_weight(some, "encoder.layers.0.mlp.fc1", "text_encoder") == 1.0
    with pytest.raises(ValueError, match="layout lbw12 takes 12 values, got 3"):
        LBW12.block_values([1, 2, 3])


# ---------------------------------------------------------------------- kohya vectors


def test_lr_shapes():
    n = 12
    assert kohya_lr_shape("sine", n) == [math.sin(math.pi * (i / (n - 1)) / 2) for i in range(n)]
    assert kohya_lr_shape("cosine", n) == [math.sin(math.pi * (i / (n - 1)) / 2) for i in reversed(range(n))]
    assert kohya_lr_shape("linear", 9) == [i / 8 for i in range(9)]
    assert kohya_lr_shape("reverse_linear", 9) == [i / 8 for i in reversed(range(9))]
    assert kohya_lr_shape("zeros+0.5", 12) == [0.5] * 12
    assert kohya_lr_shape("cosine+.5", 12)[0] == pytest.approx(1.5) and kohya_lr_shape("cosine+.5", 12)[-1] == pytest.approx(0.5)
    with pytest.raises(ValueError):
        kohya_lr_shape("square", 12)


def test_block_lr_weight_sd():
    assert kohya_block_lr_weight(False) is None
    w = kohya_block_lr_weight(False, down_lr_weight="sine", mid_lr_weight=[2.0], up_lr_weight="cosine+.5")
    assert len(w) == 25
    assert w[:12] == [0] + kohya_lr_shape("sine", 12)[1:]  # sin(0) = 0 is not above the threshold
    assert w[12] == 2.0 and w[13:] == kohya_lr_shape("cosine+.5", 12)
    # short lists are filled with 1.0, long ones cut; values not above the threshold become 0
    w = kohya_block_lr_weight(False, [0.5, -1.0, 0.05], None, [2.0] * 14, zero_threshold=0.1)
    assert w == [0.5, 0, 0] + [1.0] * 9 + [1.0] + [2.0] * 12
    # only mid given: down/up all 1.0
    assert kohya_block_lr_weight(False, mid_lr_weight=[0.0]) == [1.0] * 12 + [0] + [1.0] * 12



def test_a_single_mid_lr_weight_number_is_a_one_value_list():
    """kohya_block_lr_weight takes mid_lr_weight as one number too (what a scalar `mid_lr_weight` option is):
    SD1/SD2's one middle block, SDXL's first middle sub-block, the others filled with 1.0."""
    assert kohya_block_lr_weight(False, mid_lr_weight=2.0) == [1.0] * 12 + [2.0] + [1.0] * 12
    assert kohya_block_lr_weight(True, mid_lr_weight=0.5) == kohya_block_lr_weight(True, mid_lr_weight=[0.5])
    assert kohya_block_lr_weight(True, mid_lr_weight=0)[10:13] == [0, 1.0, 1.0]

def test_block_lr_weight_sdxl():
    w = kohya_block_lr_weight(True, down_lr_weight="linear", mid_lr_weight=[0.1, 0.2, 0.3], up_lr_weight=[0.5] * 9)
    assert len(w) == 23
    assert w[0] == 1.0 and w[-1] == 1.0  # EMB and FINAL
    assert w[1:10] == [0] + [i / 8 for i in range(1, 9)]
    assert w[10:13] == [0.1, 0.2, 0.3] and w[13:22] == [0.5] * 9
    assert kohya_block_lr_weight(True, mid_lr_weight=[0.5]) == [1.0] * 10 + [0.5, 1.0, 1.0] + [1.0] * 10


def test_parse_block_lr_kwargs():
    kw = {"down_lr_weight": "1,1,,0.5", "mid_lr_weight": "2", "up_lr_weight": "sine+.1", "block_lr_zero_threshold": "0.2"}
    w = parse_kohya_block_lr_kwargs(False, kw)
    assert w[:4] == [1.0, 1.0, 0, 0.5] and w[4:12] == [1.0] * 8 and w[12] == 2.0
    assert w[13] == 0 and w[14:] == [v for v in kohya_lr_shape("sine+.1", 12)[1:]]  # 0.1 <= 0.2 -> 0
    assert parse_kohya_block_lr_kwargs(False, {"network_dim": "4"}) is None
    with pytest.raises(ValueError, match="down_lr_weight"):
        parse_kohya_block_lr_kwargs(False, {"down_lr_weight": "0.5"})
    assert len(parse_kohya_block_lr_kwargs(True, {"mid_lr_weight": "1,0,1"})) == 23


def test_block_dims_alphas():
    dims, alphas, cd, ca = kohya_block_dims_alphas(False, 8, 4.0)
    assert dims == [8] * 25 and alphas == [4.0] * 25 and cd is None and ca is None
    bd = ",".join(str(i) for i in range(25))
    dims, alphas, cd, ca = kohya_block_dims_alphas(False, 8, 4.0, block_dims=bd, conv_dim=2)
    assert dims == list(range(25)) and cd == [2] * 25 and ca == [1.0] * 25
    lr = kohya_block_lr_weight(False, mid_lr_weight=[0.0])
    dims, _, cd, ca = kohya_block_dims_alphas(False, 8, 4.0, conv_block_dims=[3] * 25, block_lr_weight=lr)
    assert dims[12] == 0 and cd[12] == 0 and dims[11] == 8 and cd[13] == 3 and ca == [1.0] * 25
    dims, alphas, _, _ = kohya_block_dims_alphas(True, 16, 8, block_alphas=[1.0] * 23)
    assert dims == [16] * 23 and alphas == [1.0] * 23
    with pytest.raises(ValueError, match="block_dims"):
        kohya_block_dims_alphas(True, 4, 1, block_dims="4,4")


def test_expand_onto_modules():
    unet, tes = meta_model("sd15")
    targets = kohya_default_targets(unet, tes)
    lr = kohya_block_lr_weight(False, down_lr_weight="linear", mid_lr_weight=[0.5], up_lr_weight="reverse_linear")
    values = expand_block_values(lr, targets, KOHYA_SD25)
    assert values[("unet", "down_blocks.0.attentions.0.proj_in")] == pytest.approx(1 / 11)    # IN01
    assert values[("unet", "down_blocks.2.attentions.1.proj_out")] == pytest.approx(8 / 11)   # IN08
    assert values[("unet", "mid_block.attentions.0.proj_in")] == 0.5
    assert values[("unet", "up_blocks.3.attentions.2.proj_out")] == 0                        # OUT11 -> 0
    assert values[("text_encoder", "encoder.layers.0.mlp.fc1")] is None                       # TE: no block
    assert len(values) == 264

    paths = ["conv_in", "time_embedding.linear_1", "conv_out", "down_blocks.0.resnets.0.conv1"]
    vec = [float(i) for i in range(25)]
    assert expand_block_values(vec, paths, KOHYA_SD25, outside=-1.0) == {
        "conv_in": 0.0, "time_embedding.linear_1": -1.0, "conv_out": -1.0, "down_blocks.0.resnets.0.conv1": 1.0}
    # sd-scripts' own indexing: -1 (no block) picks the last value
    assert expand_block_values(vec, paths, KOHYA_SD25, exact_kohya=True) == {
        "conv_in": 24.0, "time_embedding.linear_1": 24.0, "conv_out": 24.0, "down_blocks.0.resnets.0.conv1": 1.0}

    unet, tes = meta_model("sdxl")
    rates = [float(i) for i in range(20)]
    targets = kohya_default_targets(unet, tes)
    values = expand_block_values(rates, targets, SDXL20)
    assert values[("text_encoder_2", "text_model.encoder.layers.31.mlp.fc2")] == 0.0  # BASE
    assert values[("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q")] == 5.0  # IN04
    assert values[("unet", "mid_block.attentions.0.proj_in")] == 10.0
    assert values[("unet", "up_blocks.1.attentions.2.proj_out")] == 16.0  # OUT05
    vec = [float(i) for i in range(23)]
    sdxl_paths = ["time_embedding.linear_1", "conv_out", "input_blocks.4.1.proj_in", "mid_block.resnets.1.conv1"]
    assert (expand_block_values(vec, sdxl_paths, KOHYA_SDXL23)
            == expand_block_values(vec, sdxl_paths, KOHYA_SDXL23, exact_kohya=True)
            == {"time_embedding.linear_1": 0.0, "conv_out": 22.0, "input_blocks.4.1.proj_in": 5.0,
                "mid_block.resnets.1.conv1": 12.0})
    with pytest.raises(ValueError):
        expand_block_values(rates[:19], targets, SDXL20)
    with pytest.raises(ValueError):
        expand_block_values(rates, targets, SDXL20, exact_kohya=True)


def test_lr_weight_lists_of_another_length_warn_as_sd_scripts(caplog):
    """sd-scripts' get_block_lr_weight cuts and fills the lists with a warning; SDXL takes 9 down/up values."""
    with caplog.at_level("WARNING"):
        w = kohya_block_lr_weight(True, down_lr_weight=[1.0, 2.0] + [0.5] * 10, up_lr_weight=[1.0] * 14,
                                  mid_lr_weight=[0.5])
    assert w[1:10] == [1.0, 2.0] + [0.5] * 7 and w[10:13] == [0.5, 1.0, 1.0]
    assert ("down_weight or up_weight is too long. Parameters after 9-th are ignored. (down_lr_weight has 12, "
            "up_lr_weight has 14 values; this model's take 9)") in caplog.text
    assert "mid_weight is too short. Parameters after 3-th are filled with 1. (mid_lr_weight has 1" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        kohya_block_lr_weight(False, down_lr_weight="sine", mid_lr_weight=[1.0])
    assert not caplog.text
