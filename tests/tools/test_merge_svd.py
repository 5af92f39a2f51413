"""merge_loras_svd: per module, the SVD truncation of the dense weighted sum (computed in float64 in the test);
modules present in one file only included; the file written with metadata."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lorakit.formats import load_file, save_file
from lorakit.tools.merge_svd import merge_loras_svd


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/tools/conftest.py


def _file(seed, r, names, alpha):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name in names:
        conv = name.endswith("conv")
        sd[f"{name}.lora_down.weight"] = torch.randn(r, 12, *((3, 3) if conv else ()), generator=g)
        sd[f"{name}.lora_up.weight"] = torch.randn(20, r, *((1, 1) if conv else ()), generator=g)
        sd[f"{name}.alpha"] = torch.tensor(alpha)
    return sd


def _dense(sd, name):
    up, down = sd[f"{name}.lora_up.weight"].double().flatten(1), sd[f"{name}.lora_down.weight"].double().flatten(1)
    return float(sd[f"{name}.alpha"]) / down.shape[0] * up @ down


def _truncate(A, k):
    U, S, Vh = np.linalg.svd(A.numpy(), full_matrices=False)
    return torch.from_numpy((U[:, :k] * S[:k]) @ Vh[:k])


def test_equals_svd_of_dense_sum(tmp_path):
    a = _file(0, 4, ["lora_unet_x", "lora_unet_conv"], 2.0)
    b = _file(1, 6, ["lora_unet_x", "lora_unet_only_b"], 6.0)
    b["lora_unet_full.diff"] = torch.randn(20, 12)
    pa, pb, out = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "m.safetensors"
    save_file(a, pa)
    save_file(b, pb)
    merged = merge_loras_svd([pa, pb], [0.7, -0.4], 5, new_conv_rank=3, out=out)
    x = 0.7 * _dense(a, "lora_unet_x") - 0.4 * _dense(b, "lora_unet_x")
    assert torch.allclose(_dense(merged, "lora_unet_x"), _truncate(x, 5), atol=1e-5)
    assert torch.allclose(_dense(merged, "lora_unet_conv"), _truncate(0.7 * _dense(a, "lora_unet_conv"), 3), atol=1e-5)
    assert merged["lora_unet_conv.lora_down.weight"].shape == (3, 12, 3, 3)
    assert torch.allclose(_dense(merged, "lora_unet_only_b"), _truncate(-0.4 * _dense(b, "lora_unet_only_b"), 5),
                          atol=1e-5)
    assert torch.allclose(_dense(merged, "lora_unet_full"), _truncate(-0.4 * b["lora_unet_full.diff"].double(), 5),
                          atol=1e-5)
    t, meta = load_file(out)
    assert set(t) == set(merged) and meta["ss_network_dim"] == "5" and "sshs_model_hash" in meta
    assert json.loads(meta["lorakit_merge_svd"])["ratios"] == [0.7, -0.4]


def test_errors():
    a = _file(0, 4, ["lora_unet_x"], 2.0)
    with pytest.raises(ValueError, match="ratio"):
        merge_loras_svd([a], [1.0, 2.0], 4)
    bad = {"lora_unet_x.lora_down.weight": torch.randn(4, 13), "lora_unet_x.lora_up.weight": torch.randn(20, 4)}
    with pytest.raises(ValueError, match="shape"):
        merge_loras_svd([a, bad], [1.0, 1.0], 4)
    with pytest.raises(ValueError, match="hada_w1_a"):
        merge_loras_svd([{"lora_unet_y.hada_w1_a": torch.ones(2, 2)}], [1.0], 4)


@pytest.mark.parametrize("algo,keys", [("loha", ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")),
                                       ("lokr", ("lokr_w1", "lokr_w2"))])
def test_other_algorithm_is_named_as_concat_names_it(tmp_path, algo, keys):
    """A LoHa/LoKr module (its alpha sorts first) is refused as what it is, not as a module that 'has alpha'."""
    sd = {"lora_unet_y.alpha": torch.tensor(2.0), **{f"lora_unet_y.{k}": torch.ones(2, 2) for k in keys}}
    save_file(sd, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match=rf"other.safetensors: module 'lora_unet_y' is {algo} \(tensors alpha, "
                                         r".*\); only LoRA/LoCon and full modules.*lorakit extract BASE MERGED"):
        merge_loras_svd([tmp_path / "other.safetensors"], [1.0], 4)


def test_a_layer_in_two_shapes_sums_only_as_linear_and_1x1_conv(tmp_path):
    """(out, in) and (out, in, 1, 1) are one layer (written 4-D); (out, in) and (out, in, 3, 3) are not."""
    flat = _file(0, 4, ["lora_unet_x"], 4.0)
    square = {k: v.reshape(*v.shape, 1, 1) if "lora_" in k else v for k, v in _file(1, 2, ["lora_unet_x"], 2.0).items()}
    merged = merge_loras_svd([flat, square], [1.0, 1.0], 6)
    assert merged["lora_unet_x.lora_down.weight"].shape == (6, 12, 1, 1)
    want = _dense(flat, "lora_unet_x") + _dense(square, "lora_unet_x")
    assert torch.allclose(_dense(merged, "lora_unet_x"), want, atol=1e-5)
    with pytest.raises(ValueError, match=r"shape \(20, 12, 3, 3\).*shape \(20, 12\)"):
        merge_loras_svd([flat, {"lora_unet_x.lora_down.weight": torch.randn(2, 12, 3, 3),
                                "lora_unet_x.lora_up.weight": torch.randn(20, 2, 1, 1)}], [1.0, 1.0], 4)


def test_text_encoder_names_in_either_spelling_sum_into_one_module(tmp_path):
    """LyCORIS (and trainers on transformers 5) write lora_te_encoder_..., lorakit and kohya
    lora_te_text_model_encoder_...: the same layer, one module in the merge, as the concatenating merge has it."""
    long, short = "lora_te_text_model_encoder_layers_0_mlp_fc1", "lora_te_encoder_layers_0_mlp_fc1"
    a, b = _file(0, 4, [long], 4.0), _file(1, 4, [short], 4.0)
    pa, pb = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file(a, pa)
    save_file(b, pb)
    merged = merge_loras_svd([pa, pb], [1.0, 0.5], 8)
    assert {k.partition(".")[0] for k in merged} == {long}
    b_as_long = {k.replace(short, long): v for k, v in b.items()}
    want = _dense(a, long) + 0.5 * _dense(b_as_long, long)
    assert torch.allclose(_dense(merged, long), _truncate(want, 8), atol=1e-5)
    save_file({**a, **b}, tmp_path / "both.safetensors")  # one file holding both spellings: refused, naming both
    with pytest.raises(ValueError, match="name the same tensor"):
        merge_loras_svd([tmp_path / "both.safetensors"], [1.0], 4)


def test_quiet_cli_draws_no_progress_bar(tmp_path, capsys):
    from lorakit.cli import main

    pa, pb = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file(_file(0, 4, ["lora_unet_x"], 2.0), pa)
    save_file(_file(1, 4, ["lora_unet_x"], 2.0), pb)
    assert main(["merge", "--loras", str(pa), str(pb), "--new_rank", "2", "--save_to", str(tmp_path / "m.safetensors"),
                 "--quiet"]) == 0
    assert "merge (svd)" not in capsys.readouterr().err


def test_nan_factors_are_named(tmp_path):
    sd = _file(0, 4, ["lora_unet_x"], 2.0)
    sd["lora_unet_x.lora_down.weight"][0, 0] = float("nan")
    save_file(sd, tmp_path / "nan.safetensors")
    with pytest.warns(UserWarning, match="nan.safetensors: 1 tensor"), \
            pytest.raises(ValueError, match="nan.safetensors: module 'lora_unet_x' holds NaN or Inf"):
        merge_loras_svd([tmp_path / "nan.safetensors"], [1.0], 2)


def test_metadata_tells_the_base_model_and_the_ranks_written(tmp_path):
    """As kohya's svd_merge_lora.py: ss_v2, ss_base_model_version and the sai modelspec from the inputs (UIs tell
    an SDXL LoRA by them), the modelspec left out with --no_metadata. ss_network_dim/alpha and the conv args give
    the largest rank written, never a --new_rank above every module's (the SVD does not pad)."""
    from lorakit.cli import main

    pa, pb = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file(_file(0, 4, ["lora_unet_x", "lora_te1_y", "lora_unet_conv"], 2.0), pa,
              metadata={"ss_base_model_version": "sdxl_base_v1-0", "ss_v2": "False"})
    save_file(_file(1, 8, ["lora_unet_x"], 8.0), pb)
    out, bare = tmp_path / "m.safetensors", tmp_path / "bare.safetensors"
    for target, extra in ((out, []), (bare, ["--no_metadata"])):
        assert main(["merge", "--loras", str(pa), str(pb), "--new_rank", "32", "--new_conv_rank", "16", "--save_to",
                     str(target), "--quiet", *extra]) == 0
    tensors, meta = load_file(out)
    ranks = {k.partition(".")[0]: v.shape[0] for k, v in tensors.items() if k.endswith("lora_down.weight")}
    assert ranks == {"lora_unet_x": 12, "lora_te1_y": 4, "lora_unet_conv": 4}
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("12", "12.0")
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "4.0"}
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_v2"] == "False"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert json.loads(meta["lorakit_merge_svd"])["new_rank"] == 32
    _, meta = load_file(bare)
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_network_dim"] == "12"
    assert not any(k.startswith(("modelspec.", "lorakit_")) for k in meta)


def test_a_bias_change_of_a_module_stored_whole_is_named_as_left_out(tmp_path, caplog):
    """A LoRA has no bias: the merged file cannot carry a full module's diff_b, and says so (kohya's svd_merge_lora
    reads no diff at all)."""
    b = {"lora_unet_full.diff": torch.randn(20, 12), "lora_unet_full.diff_b": torch.randn(20)}
    path = tmp_path / "b.safetensors"
    save_file(b, path)
    merged = merge_loras_svd([path], [1.0], 4)
    assert not any(k.endswith("diff_b") for k in merged)
    assert "1 module(s) stored whole change their bias too (diff_b, e.g. lora_unet_full)" in caplog.text
    caplog.clear()
    b["lora_unet_full.diff_b"] = torch.zeros(20)  # an unchanged bias loses nothing
    save_file(b, path)
    merge_loras_svd([path], [1.0], 4)
    assert "diff_b" not in caplog.text


ATTN = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"  # in a U-Net block (IN04)


def test_modules_stored_whole_in_two_files_sum_and_take_their_block_weight():
    """A module stored whole (diff) in both files sums both parts, each at ratio x block weight, as a LoRA
    module's part does; a 1x1 conv LoRA takes new_rank (new_conv_rank is for kernels > 1)."""
    g = torch.Generator().manual_seed(5)
    d1, d2 = torch.randn(20, 12, generator=g), torch.randn(20, 12, generator=g)
    conv1x1 = {k: v.reshape(*v.shape, 1, 1) if "lora_" in k else v
               for k, v in _file(2, 6, ["lora_unet_down_blocks_1_attentions_0_proj_in"], 6.0).items()}
    a = {f"{ATTN}.diff": d1, **conv1x1}
    b = {f"{ATTN}.diff": d2}
    merged = merge_loras_svd([a, b], [1.0, -0.5], 12, new_conv_rank=2, progress=False)
    want = d1.double() - 0.5 * d2.double()
    assert torch.allclose(_dense(merged, ATTN), want, atol=1e-5)  # rank 12 of a 20x12 change: exact
    proj = "lora_unet_down_blocks_1_attentions_0_proj_in"
    assert merged[f"{proj}.lora_down.weight"].shape == (6, 12, 1, 1)  # rank 6 < new_rank 12, not new_conv_rank 2
    assert torch.allclose(_dense(merged, proj), _dense(conv1x1, proj), atol=1e-5)
    halves = merge_loras_svd([a, b], [1.0, -0.5], 12, block_weights=",".join(["0.5"] * 25), progress=False)
    assert torch.allclose(_dense(halves, ATTN), 0.5 * want, atol=1e-5)
    assert torch.allclose(_dense(halves, proj), 0.5 * _dense(conv1x1, proj), atol=1e-5)
