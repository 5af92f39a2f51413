"""extract: known low-rank changes recovered, rank-selection modes against dense float64 singular values,
randomized against exact SVD, files that load_network reads back onto the base and give the tuned weights."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from lorakit import load_network
from lorakit.formats import read_metadata
from lorakit.models.demo import random_model
from lorakit.models.save import save_checkpoint
from lorakit.tools import lowrank
from lorakit.tools.extract import extract_layer, extract_lora

R = 3
LIN = ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
CONV = ("unet", "down_blocks.1.resnets.0.conv1")
CONV_T = ("unet", "up_blocks.1.resnets.1.conv2")
TE = ("text_encoder", "encoder.layers.0.mlp.fc1")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/tools/conftest.py


def _module(model, where):
    comp, path = where
    root = model.unet if comp == "unet" else model.text_encoders[0]
    return root.get_submodule(path)


def _tucker_change(g, w, r):
    out, inp, *k = w.shape
    up, mid, down = torch.randn(out, r, generator=g), torch.randn(r, r, *k, generator=g), torch.randn(r, inp, generator=g)
    return torch.einsum("oa,ab...,bi->oi...", up, mid, down) * 0.05


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(base path, tuned path, base model, tuned model): tuned = base + rank-R changes on four layers."""
    d = tmp_path_factory.mktemp("extract")
    base = random_model("tiny-sd", 0)
    tuned = copy.deepcopy(base)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for where in (LIN, CONV, TE):
            w = _module(tuned, where).weight
            change = torch.randn(w.shape[0], R, generator=g) @ torch.randn(R, w[0].numel(), generator=g) * 0.05
            w += change.reshape(w.shape)
        w = _module(tuned, CONV_T).weight
        w += _tucker_change(g, w, R)
    bp, tp = d / "base.safetensors", d / "tuned.safetensors"
    save_checkpoint(base, bp, dtype=torch.float32)
    save_checkpoint(tuned, tp, dtype=torch.float32)
    return bp, tp, base, tuned


def _weights(model, where):
    return _module(model, where).weight.detach().double()


def test_known_changes_recovered_and_file_loads(pair, tmp_path):
    bp, tp, base, tuned = pair
    out = tmp_path / "x.safetensors"
    res = extract_lora(bp, tp, out, linear_dim=R, conv_dim=R, save_dtype=torch.float32, show_progress=False)
    # only the changed layers (rank R exactly), everything else unchanged and left out
    assert set(res.layers) == {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
                               "lora_unet_down_blocks_1_resnets_0_conv1", "lora_unet_up_blocks_1_resnets_1_conv2",
                               "lora_te_text_model_encoder_layers_0_mlp_fc1"}
    assert all(r["rank"] == R and not r["full"] for r in res.layers.values())
    model = copy.deepcopy(base)
    net = load_network(model.unet, out, text_encoders=model.text_encoders)
    net.merge()
    for where in (LIN, CONV, TE):
        ref, got = _weights(tuned, where), _weights(model, where)
        assert torch.allclose(got, ref, rtol=0, atol=2e-6 * ref.abs().max()), where
    # the Tucker-made change is rank R flattened too, so plain LoCon recovers it
    assert torch.allclose(_weights(model, CONV_T), _weights(tuned, CONV_T), atol=1e-5)
    # every other layer untouched: merged model == tuned model
    for (n, p), (_, q) in zip(model.unet.named_parameters(), tuned.unet.named_parameters()):
        assert torch.allclose(p, q, atol=1e-5), n
    meta = read_metadata(out)
    assert meta["ss_network_dim"] == str(R) and meta["ss_network_module"] == "networks.lora"
    assert json.loads(meta["lorakit_extract"])["mode"] == "fixed" and "sshs_model_hash" in meta
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"


def test_tucker_recovers_tucker_change(pair, tmp_path):
    bp, tp, base, tuned = pair
    out = tmp_path / "t.safetensors"
    extract_lora(base, tuned, out, linear_dim=R, conv_dim=R, use_tucker=True, save_dtype=torch.float32,
                 text_encoders=False, show_progress=False)
    from lorakit.formats import load_file
    tensors, _ = load_file(out)
    assert tensors["lora_unet_up_blocks_1_resnets_1_conv2.lora_mid.weight"].shape == (R, R, 3, 3)
    model = copy.deepcopy(base)
    load_network(model.unet, out, text_encoders=model.text_encoders).merge()
    assert torch.allclose(_weights(model, CONV_T), _weights(tuned, CONV_T), atol=1e-5)
    assert torch.allclose(_weights(model, TE), _weights(base, TE))  # text encoder left out


def test_full_fallback_and_min_diff(pair, tmp_path):
    bp, tp, base, tuned = pair
    res = extract_lora(base, tuned, None, linear_dim=20, conv_dim=0, text_encoders=False, show_progress=False)
    lin = res.layers["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"]
    assert lin["full"]  # rank 20 on a 32x32 layer: 20*64 >= 32*32 numbers, stored whole
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.diff"
    assert torch.allclose(res.tensors[key].double(), _weights(tuned, LIN) - _weights(base, LIN), atol=1e-7)
    # conv_dim 0 leaves the kxk convs out (kohya's create_modules skips dim 0), not a rank-0 module each
    assert all(r["kind"] == "linear" for r in res.layers.values())
    assert not any(t.dim() == 4 and t.shape[2:] != (1, 1) for t in res.tensors.values())
    with pytest.raises(ValueError, match="min_diff"):
        extract_lora(base, tuned, None, linear_dim=R, min_diff=1e9, show_progress=False)


def test_min_diff_is_per_layer_unet_included(pair):
    """lorakit's min_diff leaves out each layer whose largest change is <= it, U-Net layers too (kohya's option of
    that name only decides whether the text encoder is extracted; docs/tools.md says so)."""
    _, _, base, tuned = pair
    biggest = {w: float((_weights(tuned, w) - _weights(base, w)).abs().max()) for w in (LIN, CONV, TE)}
    cut = (biggest[LIN] + biggest[TE]) / 2
    assert biggest[LIN] < cut < biggest[TE]
    res = extract_lora(base, tuned, None, linear_dim=R, conv_dim=R, min_diff=cut, show_progress=False)
    assert "lora_te_text_model_encoder_layers_0_mlp_fc1" in res.layers
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in res.skipped


def test_different_architectures_refused(pair):
    _, _, base, _ = pair
    other = copy.copy(base)
    other.kind = "sdxl"
    with pytest.raises(ValueError, match="same architecture"):
        extract_lora(base, other, None, show_progress=False)


def _dense_rank(S, mode, p):
    """Independent reference: loops over float64 singular values."""
    n = len(S)
    if mode == "threshold":
        return sum(1 for s in S if s > p)
    if mode == "ratio":
        return sum(1 for s in S if s > p * S[0])
    if mode == "sv_ratio":
        return sum(1 for s in S if s > S[0] / p)
    vals = {"quantile": S, "sv_cumulative": S, "quantile_energy": S ** 2, "sv_fro": S ** 2}[mode]
    target = (p ** 2 if mode == "sv_fro" else p) * vals.sum()
    acc = 0.0
    for k in range(1, n + 1):
        acc += vals[k - 1]
        if acc >= target:
            return k
    return n


@pytest.mark.parametrize("mode,param", [("threshold", 0.5), ("ratio", 0.2), ("quantile", 0.6), ("quantile", 0.9),
                                        ("quantile_energy", 0.9), ("sv_ratio", 4.0), ("sv_fro", 0.9),
                                        ("sv_cumulative", 0.75)])
def test_modes_against_dense_float64(mode, param):
    g = torch.Generator().manual_seed(3)
    A = torch.randn(40, 7, generator=g) @ torch.diag(torch.logspace(1, -1, 7)) @ torch.randn(7, 60, generator=g) / 8
    S = np.linalg.svd(A.double().numpy(), compute_uv=False)
    want = max(1, _dense_rank(S, mode, param))
    lr = lowrank.low_rank(A, mode, param)
    assert lr.rank == want
    # and the factors are the rank-k truncation (Eckart-Young): error^2 = the dropped energy
    err = float(((lr.up @ lr.down).double() - A.double()).square().sum())
    assert err == pytest.approx(float((S[want:] ** 2).sum()), rel=1e-3, abs=1e-8)
    assert lr.report["energy"] == pytest.approx(float((S[:want] ** 2).sum() / (S ** 2).sum()), rel=1e-6)


def test_bad_modes_named():
    with pytest.raises(ValueError, match="unknown rank-selection mode"):
        lowrank.check_mode("bogus", 1)
    with pytest.raises(ValueError, match="fraction"):
        lowrank.check_mode("quantile", 1.5)
    with pytest.raises(ValueError, match="ratio >= 1"):
        lowrank.check_mode("sv_ratio", 0.5)


def test_randomized_close_to_exact():
    g = torch.Generator().manual_seed(5)
    m, n, r = 300, 500, 40
    s = torch.logspace(0, -2, r)
    A = (torch.randn(m, r, generator=g) * s) @ torch.randn(r, n, generator=g) / 20 + 1e-4 * torch.randn(m, n, generator=g)
    S = np.linalg.svd(A.double().numpy(), compute_uv=False)
    for k in (8, 20):
        best = float(np.sqrt((S[k:] ** 2).sum()))
        gen = torch.Generator().manual_seed(0)
        U, Sk, Vh = lowrank.top_svd(A, k, "randomized", niter=2, generator=gen)
        err = float((A.double() - (U * Sk @ Vh).double()).norm())
        assert best <= err <= 1.01 * best
        U, Sk, Vh = lowrank.top_svd(A, k, "exact")
        assert float((A.double() - (U * Sk @ Vh).double()).norm()) == pytest.approx(best, rel=1e-4)


def test_extract_layer_conv_exact_rank():
    g = torch.Generator().manual_seed(7)
    delta = (torch.randn(24, R, generator=g) @ torch.randn(R, 16 * 9, generator=g)).reshape(24, 16, 3, 3)
    sub, rep = extract_layer(delta, "fixed", R, None)
    rebuilt = (sub["lora_up.weight"].flatten(1) @ sub["lora_down.weight"].flatten(1)).reshape(delta.shape)
    assert torch.allclose(rebuilt, delta, atol=1e-4) and float(sub["alpha"]) == R


def test_tucker_report_is_what_the_saved_factors_keep():
    """With Tucker the input mode is cut to the rank as well, which can lose much more than the SVD of the
    flattened change: the report (and so --verbose) gives the norm the saved up, mid and down keep."""
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(8, 16, 3, 3, generator=g, dtype=torch.float64)
    tensors, report = extract_layer(delta, "fixed", 2, None, tucker=True, svd="exact", full_fallback=False)
    up, mid, down = (tensors[k].double() for k in ("lora_up.weight", "lora_mid.weight", "lora_down.weight"))
    kept = torch.einsum("oa,abhw,bi->oihw", up.flatten(1), mid, down.flatten(1))
    fro = float(torch.linalg.norm(kept) / torch.linalg.norm(delta))
    assert report["fro"] == pytest.approx(fro, rel=1e-9) and report["energy"] == pytest.approx(fro ** 2, rel=1e-9)
    assert float(torch.linalg.norm(delta - kept) ** 2) == pytest.approx(
        float(torch.linalg.norm(delta) ** 2) * (1 - fro ** 2), rel=1e-9)  # kept is a projection of delta
    _, plain = extract_layer(delta, "fixed", 2, None, svd="exact", full_fallback=False)
    assert report["fro"] < plain["fro"] - 0.05
    exact = _tucker_change(g, torch.zeros(8, 16, 3, 3), 2).double()
    assert extract_layer(exact, "fixed", 2, None, tucker=True, svd="exact", full_fallback=False)[1]["fro"] == \
        pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("shape", [(4, 64, 3, 3), (64, 4, 3, 3)], ids=["conv_out", "conv_in"])
def test_tucker_never_keeps_less_than_the_plain_form_where_a_side_is_small(shape):
    """conv_out (4 outputs) and conv_in (4 inputs): at a rank reaching half the smaller side the Tucker form would
    cut the input mode to that rank (conv_out kept 42% of its norm, the plain path all of it), so these layers
    are extracted as without --use_tucker: whole where the factors are not smaller (LyCORIS stores conv_out
    whole), else plain LoCon."""
    delta = torch.randn(*shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for fallback in (True, False):
        tucker, t_rep = extract_layer(delta, "fixed", 8, None, tucker=True, svd="exact", full_fallback=fallback)
        plain, p_rep = extract_layer(delta, "fixed", 8, None, svd="exact", full_fallback=fallback)
        assert sorted(tucker) == sorted(plain) and "lora_mid.weight" not in tucker
        assert t_rep["fro"] == pytest.approx(p_rep["fro"], rel=1e-12)
    if shape[0] == 4:  # the factors would hold more numbers than conv_out's change: stored whole, exactly
        assert "diff" in extract_layer(delta, "fixed", 8, None, tucker=True, svd="exact")[0]
    # below half the smaller side the Tucker form is kept
    wide = torch.randn(16, 16, 3, 3, generator=torch.Generator().manual_seed(4))
    sub, rep = extract_layer(wide, "fixed", 7, None, tucker=True, svd="exact")
    assert sub["lora_mid.weight"].shape == (7, 7, 3, 3) and rep["tucker"]
    assert not extract_layer(wide, "fixed", 8, None, tucker=True, svd="exact", full_fallback=False)[1]["tucker"]


def test_changes_a_lora_cannot_carry_are_listed(pair):
    """A changed norm layer (or any tensor outside the preset's layers) is lost in a LoRA: listed, not silent."""
    bp, tp, base, tuned = pair
    tuned = copy.deepcopy(tuned)
    with torch.no_grad():
        tuned.unet.conv_norm_out.weight += 0.1
        tuned.text_encoders[0].get_submodule(TE[1]).bias += 0.1  # a selected layer's bias: counted apart
    res = extract_lora(base, tuned, None, linear_dim=R, conv_dim=R, show_progress=False)
    assert res.not_extracted == ["unet:conv_norm_out.weight"]
    assert res.bias_dropped == ["lora_te_text_model_encoder_layers_0_mlp_fc1"]
    assert json.loads(res.metadata["lorakit_extract"])["not_extracted_tensors"] == 1


LIN_NAME = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


def test_modules_stored_whole_label_the_file_lycoris(pair, tmp_path):
    """sd-scripts' merge_lora.py and --network_weights read only lora_down/lora_up: a file with `diff` modules is
    labelled as sd-scripts labels LyCORIS files (lycoris.kohya, algo locon, or full when every module is
    whole), dims as written. The keys the UIs read to place a LoRA (ss_base_model_version, ss_v2) stay."""
    _, _, base, tuned = pair
    # rank 20 on the 32x32 attention layer is not smaller than the layer: stored whole; the 3x3 conv: rank R
    mixed = extract_lora(base, tuned, None, linear_dim=20, conv_dim=R, text_encoders=False, show_progress=False)
    assert mixed.layers[LIN_NAME]["full"] and not mixed.layers["lora_unet_down_blocks_1_resnets_0_conv1"]["full"]
    meta = mixed.metadata
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert json.loads(meta["ss_network_args"]) == {"algo": "locon", "conv_dim": str(R), "conv_alpha": str(R),
                                                   "use_tucker": False}
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("Dynamic", "Dynamic")  # no Linear kept low-rank
    assert (meta["ss_base_model_version"], meta["ss_v2"]) == ("sd_v1", "False")
    whole = extract_lora(base, tuned, None, linear_dim=20, conv_dim=0, text_encoders=False, show_progress=False)
    assert set(whole.layers) == {LIN_NAME}
    assert whole.metadata["ss_network_module"] == "lycoris.kohya"
    assert json.loads(whole.metadata["ss_network_args"])["algo"] == "full"


def test_cli_warns_once_about_modules_stored_whole(pair, tmp_path, capsys):
    from lorakit.cli import main

    bp, tp, base, tuned = pair
    out = tmp_path / "w.safetensors"
    assert main(["extract", str(bp), str(tp), str(out), "--linear_dim", "20", "--conv_dim", "0",
                 "--no_text_encoder"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "1 of 1 modules are stored whole" in warnings[0]
    assert "merge_lora.py" in warnings[0] and "lycoris.kohya" in warnings[0]
    model = copy.deepcopy(base)  # and the file loads and applies as before
    load_network(model.unet, out).merge()
    assert torch.allclose(_weights(model, LIN), _weights(tuned, LIN), atol=2e-3 * _weights(tuned, LIN).abs().max())
    assert main(["extract", str(bp), str(tp), str(tmp_path / "n.safetensors"), "--linear_dim", str(R),
                 "--conv_dim", "0", "--no_text_encoder"]) == 0
    assert "warning" not in capsys.readouterr().err


def _sdxl_targets(model) -> dict[str, torch.nn.Module]:
    """A U-Net attention Linear, a 3x3 resnet conv, and fc1 of the first layer of each text encoder."""
    te1, te2 = model.text_encoders
    fc1 = "encoder.layers.0.mlp.fc1"
    return {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q":
            model.unet.get_submodule("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"),
            "lora_unet_input_blocks_1_0_in_layers_2": model.unet.get_submodule("down_blocks.0.resnets.0.conv1"),
            "lora_te1_text_model_encoder_layers_0_mlp_fc1": next(m for n, m in te1.named_modules() if n.endswith(fc1)),
            "lora_te2_text_model_encoder_layers_0_mlp_fc1": next(m for n, m in te2.named_modules() if n.endswith(fc1))}


def test_sdxl_known_changes_recovered_with_both_text_encoders(tmp_path):
    """SDXL: rank-R changes in the U-Net (Linear and 3x3 conv, SGM names) and in both text encoders (lora_te1_,
    lora_te2_) come back exactly; nothing else is written; the metadata says SDXL."""
    base = random_model("tiny-sdxl", 0)
    tuned = copy.deepcopy(base)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in _sdxl_targets(tuned).values():
            w = layer.weight
            w += (torch.randn(w.shape[0], R, generator=g) @ torch.randn(R, w[0].numel(), generator=g)
                  * 0.05).reshape(w.shape)
    out = tmp_path / "xl.safetensors"
    res = extract_lora(base, tuned, out, linear_dim=R, conv_dim=R, save_dtype=torch.float32, show_progress=False)
    assert set(res.layers) == set(_sdxl_targets(base))
    assert all(r["rank"] == R and not r["full"] for r in res.layers.values())
    model = copy.deepcopy(base)
    load_network(model.unet, out, text_encoders=model.text_encoders).merge()
    merged, want = _sdxl_targets(model), _sdxl_targets(tuned)
    for name, layer in merged.items():
        ref = want[name].weight.detach().double()
        assert torch.allclose(layer.weight.detach().double(), ref, rtol=0, atol=2e-6 * ref.abs().max()), name
    meta = read_metadata(out)
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_network_module"] == "networks.lora"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"


PROJ_IN = ("unet", "down_blocks.0.attentions.0.proj_in")


def test_1x1_convs_take_linear_dim(pair):
    """kohya's extract_lora_from_models.py: rank = conv_dim only for conv2d_3x3 (kernel != (1, 1)); SD1's 1x1
    proj_in takes dim, and the metadata counts it with the Linear modules."""
    _, _, base, _ = pair
    tuned = copy.deepcopy(base)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for where in (PROJ_IN, CONV):
            w = _module(tuned, where).weight
            w += (torch.randn(w.shape[0], 4, generator=g) @ torch.randn(4, w[0].numel(), generator=g)
                  * 0.05).reshape(w.shape)
    res = extract_lora(base, tuned, None, linear_dim=4, conv_dim=2, full_fallback=False, text_encoders=False,
                       show_progress=False)
    proj, conv = "lora_unet_down_blocks_0_attentions_0_proj_in", "lora_unet_down_blocks_1_resnets_0_conv1"
    assert {n: (r["kind"], r["rank"]) for n, r in res.layers.items()} == {proj: ("linear", 4), conv: ("conv", 2)}
    assert res.tensors[f"{proj}.lora_down.weight"].shape == (4, 32, 1, 1)
    change = _weights(tuned, PROJ_IN) - _weights(base, PROJ_IN)
    got = (res.tensors[f"{proj}.lora_up.weight"].double().flatten(1)
           @ res.tensors[f"{proj}.lora_down.weight"].double().flatten(1))
    assert torch.allclose(got, change.flatten(1), atol=1e-6)  # a rank-4 change: recovered exactly
    assert (res.metadata["ss_network_dim"], json.loads(res.metadata["ss_network_args"])["conv_dim"]) == ("4", "2")


def test_v_prediction_base_is_named_in_ss_base_model_version(pair):
    """sd-scripts' get_model_version_str_for_sd1_sd2 adds "_v" for v-parameterization: sd_v1_v here."""
    _, _, base, tuned = pair
    v_base, v_tuned = copy.copy(base), copy.copy(tuned)
    v_base.v_parameterization = v_tuned.v_parameterization = True
    res = extract_lora(v_base, v_tuned, None, linear_dim=R, conv_dim=0, text_encoders=False, show_progress=False)
    assert (res.metadata["ss_base_model_version"], res.metadata["ss_v2"]) == ("sd_v1_v", "False")


@pytest.mark.parametrize("mode,param,want", [("threshold", 2.0, 1), ("ratio", 0.5, 1), ("sv_ratio", 2.0, 1),
                                             ("sv_ratio", 4.0, 2), ("quantile", 0.75, 2),
                                             ("quantile_energy", 20 / 21.25, 2), ("sv_fro", 0.5, 1)])
def test_modes_at_a_tie_keep_what_the_table_says(mode, param, want):
    """Singular values exactly at the bound: threshold, ratio and sv_ratio keep only S_i strictly above it
    (LyCORIS' and kohya's `S > bound`); the cumulative modes keep the smallest k whose prefix reaches the target.
    S = [4, 2, 1, 0.5] holds every bound exactly in float64 (sum 7.5, energy 21.25)."""
    S = torch.tensor([4.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    assert lowrank.select_rank(S, mode, param) == want


@pytest.mark.parametrize("mode,param", [("fixed", 2.5), ("threshold", -0.1), ("ratio", 1.5), ("ratio", -0.1),
                                        ("sv_fro", 1.01), ("sv_cumulative", 2.0), ("quantile_energy", -0.5),
                                        ("sv_ratio", 0.99), ("quantile", float("nan"))])
def test_each_mode_refuses_a_parameter_out_of_its_range(mode, param):
    with pytest.raises(ValueError, match=mode):
        lowrank.check_mode(mode, param)


def test_factors_share_the_singular_values_evenly():
    """up = U sqrt(S), down = sqrt(S) Vh: column i of up and row i of down both have norm sqrt(S_i) (the balance
    that keeps both factors' magnitudes in fp16's range), not all of S on one side."""
    g = torch.Generator().manual_seed(11)
    A = torch.randn(30, 5, generator=g, dtype=torch.float64) @ torch.randn(5, 40, generator=g, dtype=torch.float64) * 50
    S = torch.linalg.svdvals(A)[:4]
    for mode, param in (("fixed", 4), ("threshold", float(S[3]) * 0.999)):
        lr = lowrank.low_rank(A, mode, param, svd="exact")
        assert lr.rank == 4
        assert torch.allclose(lr.up.norm(dim=0), S.sqrt(), rtol=1e-9)
        assert torch.allclose(lr.down.norm(dim=1), S.sqrt(), rtol=1e-9)


def test_factors_exactly_as_large_as_the_layer_are_stored_whole():
    """A layer is stored whole when its factors hold at least as many numbers as the change: rank 16 of a 32x32
    layer holds 16 * 64 = 1024 = 32 * 32 (stored whole), rank 15 holds fewer (factors)."""
    delta = torch.randn(32, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    sub, rep = extract_layer(delta, "fixed", 16, None, svd="exact")
    assert set(sub) == {"diff"} and rep["full"] and torch.equal(sub["diff"], delta)
    sub, rep = extract_layer(delta, "fixed", 15, None, svd="exact")
    assert "diff" not in sub and rep["rank"] == 15 and not rep["full"]


CONV_NAMES = {"lora_unet_down_blocks_1_resnets_0_conv1", "lora_unet_up_blocks_1_resnets_1_conv2"}


def test_other_modes_take_the_conv_param_and_the_caps_of_their_own_kind(pair):
    """Modes other than fixed: --linear_dim caps the Linear layers and --conv_dim the kxk convs, each its own;
    --conv_param selects the convs' ranks (None: --linear_param's). Every change here has rank R = 3 (the rest
    is float32 rounding, far below 1e-3 of S_0); ratio 0.999 keeps S_0 only."""
    _, _, base, tuned = pair

    def ranks(linear, conv, **options):
        res = extract_lora(base, tuned, None, mode="ratio", full_fallback=False, text_encoders=False,
                           show_progress=False, **options)
        assert {n for n, r in res.layers.items() if r["kind"] == "conv"} == CONV_NAMES and len(res.layers) == 3
        assert {n: r["rank"] for n, r in res.layers.items()} == {n: conv if n in CONV_NAMES else linear
                                                                  for n in res.layers}

    ranks(1, 2, linear_param=1e-3, linear_dim=1, conv_dim=2)
    ranks(1, R, linear_param=0.999, conv_param=1e-3, linear_dim=None)


def test_a_changed_bias_of_a_layer_stored_whole_is_extracted_and_applied(pair, tmp_path):
    """Stored whole, a layer carries its bias change too (diff_b = tuned - base): the merged model has the tuned
    bias."""
    bp, tp, base, tuned = pair
    tuned = copy.deepcopy(tuned)
    conv = _module(tuned, CONV)
    with torch.no_grad():
        conv.bias += torch.linspace(-0.2, 0.3, conv.bias.numel())
    out = tmp_path / "b.safetensors"
    res = extract_lora(base, tuned, out, linear_dim=64, conv_dim=64, text_encoders=False, save_dtype=torch.float32,
                       show_progress=False)
    name = "lora_unet_down_blocks_1_resnets_0_conv1"
    assert res.layers[name]["full"] and not res.bias_dropped
    want = conv.bias.detach().double() - _module(base, CONV).bias.detach().double()
    assert torch.allclose(res.tensors[f"{name}.diff_b"].double(), want, atol=1e-7)
    model = copy.deepcopy(base)
    load_network(model.unet, out).merge()
    assert torch.allclose(_module(model, CONV).bias.detach().double(), conv.bias.detach().double(), atol=1e-6)


def test_layers_of_different_shapes_and_a_negative_min_diff_are_refused(pair):
    _, _, base, tuned = pair
    with pytest.raises(ValueError, match="min_diff must be >= 0"):
        extract_lora(base, tuned, None, linear_dim=R, min_diff=-1.0, show_progress=False)
    other = copy.deepcopy(base)
    layer = _module(other, TE)
    layer.weight = torch.nn.Parameter(torch.zeros(layer.weight.shape[0], 1))  # broadcasts against the base's
    with pytest.raises(ValueError, match=r"encoder\.layers\.0\.mlp\.fc1 .* has shape"):
        extract_lora(base, other, None, linear_dim=R, show_progress=False)
