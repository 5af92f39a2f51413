"""resize: the kept change is the best rank-k approximation (Eckart-Young, dense float64 in the test), dynamic
methods pick kohya's ranks, metadata and hashes are updated, DyLoRA cuts keep the first k components."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lorakit.formats import load_file, save_file, sshs_hashes
from lorakit.tools.resize import resize_lora


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/tools/conftest.py


def _lora(seed=0, r=8, alpha=4.0):
    g = torch.Generator().manual_seed(seed)
    return {
        "lora_unet_a.lora_down.weight": torch.randn(r, 40, generator=g),
        "lora_unet_a.lora_up.weight": torch.randn(30, r, generator=g) * torch.logspace(0, -1, r),
        "lora_unet_a.alpha": torch.tensor(alpha),
        "lora_unet_c.lora_down.weight": torch.randn(r, 12, 3, 3, generator=g),
        "lora_unet_c.lora_up.weight": torch.randn(16, r, 1, 1, generator=g),
        "lora_unet_c.alpha": torch.tensor(alpha),
        "lora_unet_n.w_norm": torch.randn(16, generator=g),
    }


def _dense(t, name):
    up, down = t[f"{name}.lora_up.weight"].double(), t[f"{name}.lora_down.weight"].double()
    return float(t[f"{name}.alpha"]) / down.shape[0] * up.flatten(1) @ down.flatten(1)


def _best(A, k):
    U, S, Vh = np.linalg.svd(A.numpy(), full_matrices=False)
    return torch.from_numpy((U[:, :k] * S[:k]) @ Vh[:k]), S


def test_eckart_young_and_metadata(tmp_path):
    src = tmp_path / "in.safetensors"
    save_file(_lora(), src, metadata={"ss_network_dim": "8", "ss_network_alpha": "4.0", "sshs_model_hash": "old",
                                      "ss_network_args": json.dumps({"conv_dim": "8", "conv_alpha": "4.0"})})
    out = tmp_path / "out.safetensors"
    res = resize_lora(src, 3, out, new_conv_rank=2)
    t, meta = load_file(out)
    for name, k in (("lora_unet_a", 3), ("lora_unet_c", 2)):
        want, S = _best(_dense(_lora(), name), k)
        assert torch.allclose(_dense(t, name), want, atol=1e-5)
        assert float(t[f"{name}.alpha"]) == pytest.approx(4.0 / 8 * k)  # scale kept
        rep = res.layers[name]
        assert rep["old_rank"] == 8 and rep["rank"] == k
        assert rep["energy"] == pytest.approx((S[:k] ** 2).sum() / (S ** 2).sum(), rel=1e-5)
    assert torch.equal(t["lora_unet_n.w_norm"], _lora()["lora_unet_n.w_norm"])  # other algorithms copied
    # network dim/alpha describe the Linear modules, conv_dim/conv_alpha the kxk convs: updated as a pair
    assert meta["ss_network_dim"] == "3" and meta["ss_network_alpha"] == "1.5"
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1.0"}
    assert meta["sshs_model_hash"] == sshs_hashes(t, meta)[0] != "old"
    assert json.loads(meta["lorakit_resize"])["old_dim"] == 8


@pytest.mark.parametrize("method,param", [("sv_ratio", 3.0), ("sv_fro", 0.9), ("sv_cumulative", 0.7)])
def test_dynamic_methods(method, param):
    res = resize_lora(_lora(), 6, dynamic_method=method, dynamic_param=param)
    A = _dense(_lora(), "lora_unet_a")
    S = np.linalg.svd(A.numpy(), compute_uv=False)
    S = S[S > 1e-9 * S[0]]
    if method == "sv_ratio":
        want = int((S > S[0] / param).sum())
    elif method == "sv_fro":
        want = int(np.searchsorted(np.cumsum(S ** 2) / (S ** 2).sum(), param ** 2)) + 1
    else:
        want = int(np.searchsorted(np.cumsum(S) / S.sum(), param)) + 1
    want = max(1, min(want, 6))
    assert res.layers["lora_unet_a"]["rank"] == want
    best, _ = _best(A, want)
    assert torch.allclose(_dense(res.tensors, "lora_unet_a"), best, atol=1e-5)
    assert res.metadata["ss_network_dim"] == "Dynamic"


def test_tucker_module_resized_exactly():
    g = torch.Generator().manual_seed(4)
    sd = {"lora_unet_t.lora_down.weight": torch.randn(4, 6, 1, 1, generator=g),
          "lora_unet_t.lora_mid.weight": torch.randn(4, 4, 3, 3, generator=g),
          "lora_unet_t.lora_up.weight": torch.randn(10, 4, 1, 1, generator=g), "lora_unet_t.alpha": torch.tensor(2.0)}
    dense = 0.5 * torch.einsum("oa,ab...,bi->oi...", sd["lora_unet_t.lora_up.weight"].flatten(1).double(),
                               sd["lora_unet_t.lora_mid.weight"].double(), sd["lora_unet_t.lora_down.weight"].flatten(1).double())
    res = resize_lora(sd, 10)  # the full rank of the flattened product: exact
    assert torch.allclose(_dense(res.tensors, "lora_unet_t").reshape(dense.shape), dense, atol=1e-5)


def test_dylora_cut(tmp_path):
    sd = _lora()
    res = resize_lora(sd | {}, 3, dylora=True)
    for name in ("lora_unet_a", "lora_unet_c"):
        assert torch.equal(res.tensors[f"{name}.lora_down.weight"], sd[f"{name}.lora_down.weight"][:3])
        assert torch.equal(res.tensors[f"{name}.lora_up.weight"], sd[f"{name}.lora_up.weight"][:, :3])
        assert float(res.tensors[f"{name}.alpha"]) == 4.0
    src = tmp_path / "dy.safetensors"
    save_file(sd, src, metadata={"ss_network_module": "networks.dylora"})
    auto = resize_lora(src, 2)  # metadata says DyLoRA: cut by default
    assert torch.equal(auto.tensors["lora_unet_a.lora_down.weight"], sd["lora_unet_a.lora_down.weight"][:2])


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="new_rank"):
        resize_lora(_lora(), 0)
    with pytest.raises(ValueError, match="dynamic_method"):
        resize_lora(_lora(), 4, dynamic_method="sv_bogus", dynamic_param=1)
    with pytest.raises(ValueError, match="no LoRA/LoCon module"):
        resize_lora({"x.w_norm": torch.ones(2)}, 4)


def test_half_a_module_is_an_error_not_copied(tmp_path):
    """A module missing lora_up (a damaged file) stops the resize, naming file and module; nothing is written."""
    half = {k: v for k, v in _lora().items() if k != "lora_unet_c.lora_up.weight"}
    save_file(half, tmp_path / "half.safetensors")
    with pytest.raises(ValueError, match=r"half\.safetensors: module 'lora_unet_c' has lora_down\.weight but no "
                                         r"lora_up\.weight"):
        resize_lora(str(tmp_path / "half.safetensors"), 4, out=tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_cli(tmp_path, capsys):
    from lorakit.cli import main

    src, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_file(_lora(), src)
    assert main(["resize", str(src), str(out), "--new_rank", "2", "--save_precision", "fp16"]) == 0
    t, meta = load_file(out)
    assert t["lora_unet_a.lora_down.weight"].shape == (2, 40) and t["lora_unet_a.lora_down.weight"].dtype == torch.float16
    assert "Frobenius norm retained" in capsys.readouterr().out


@pytest.mark.parametrize("half_first", [True, False])
def test_default_dtype_is_each_tensors_own_in_a_mixed_file(tmp_path, half_first):
    """Without --save_precision a file mixing dtypes keeps each module's (and each alpha's): the first module's
    dtype was used for every tensor, so fp32 modules and alphas were rounded to fp16 when an fp16 module sorted
    first. Both orders of the same file."""
    half, full = ("lora_unet_a", "lora_unet_c") if half_first else ("lora_unet_c", "lora_unet_a")
    sd = {k: v.half() if k.startswith(half) and not k.endswith("alpha") else v for k, v in _lora().items()}
    sd[f"{full}.alpha"] = sd[f"{full}.alpha"].to(torch.float64)
    src, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_file(sd, src)
    resize_lora(src, 3, out)
    t, _ = load_file(out)
    assert {k: v.dtype for k, v in t.items()} == {k: v.dtype for k, v in sd.items()}
    want, _ = _best(_dense(sd, full), 3)
    assert torch.allclose(_dense(t, full), want, atol=1e-5)  # no fp16 rounding (1e-3) of the fp32 module


def test_float8_factors_are_resized_into_float16(tmp_path):
    """A float8 file's new factors are written as float16 (which holds every float8 value), not float8, which
    would round them 100x more; its float32 alpha stays float32. --save_precision still decides when given."""
    sd = {k: v if k.endswith("alpha") else (0.1 * v).to(torch.float8_e4m3fn) for k, v in _lora().items()}
    src, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_file(sd, src)
    resize_lora(src, 3, out)
    t, _ = load_file(out)
    assert t["lora_unet_n.w_norm"].dtype == torch.float8_e4m3fn  # copied unchanged
    for name in ("lora_unet_a", "lora_unet_c"):
        assert t[f"{name}.lora_up.weight"].dtype == t[f"{name}.lora_down.weight"].dtype == torch.float16
        assert t[f"{name}.alpha"].dtype == torch.float32
        want, _ = _best(_dense(sd, name), 3)
        assert float((_dense(t, name) - want).norm() / want.norm()) < 2e-3  # float16 rounding, not float8's
    resize_lora(src, 3, out, save_dtype=torch.bfloat16)
    assert {v.dtype for v in load_file(out)[0].values()} == {torch.bfloat16}


def test_untrained_modules_are_left_out_of_the_mean_retained_norm(tmp_path, capsys):
    """A module whose lora_up is all zero has no change to keep (kohya: fro_retained NaN, left out of its
    'Average Frobenius norm retention'); it was counted as 100%."""
    from lorakit.cli import main

    sd = _lora()
    sd["lora_unet_z.lora_down.weight"] = torch.randn(8, 40)
    sd["lora_unet_z.lora_up.weight"] = torch.zeros(30, 8)
    src, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_file(sd, src)
    res = resize_lora(src, 3, out)
    assert res.layers["lora_unet_z"]["rank"] == 1 and res.layers["lora_unet_z"]["fro"] is None
    trained = [res.layers[n]["fro"] for n in ("lora_unet_a", "lora_unet_c")]
    mean = json.loads(load_file(out)[1]["lorakit_resize"])["mean_fro_retained"]
    assert mean == pytest.approx(sum(trained) / 2) and mean < 1
    out.unlink()
    assert main(["resize", str(src), str(out), "--new_rank", "3", "--verbose"]) == 0
    printed = capsys.readouterr().out
    assert f"mean {sum(trained) / 2:.2%}" in printed and "over the 2 modules with a change" in printed
    assert "no change (untrained)" in printed


def test_bundled_embeddings_are_left_out_by_every_lora_tool(tmp_path):
    """A1111 reads embeddings bundled in a LoRA file (bundle_emb.<name>.*); the tools work on the adapters and say
    that they leave the embeddings out (they refused the file)."""
    from lorakit.tools.concat import concat_loras
    from lorakit.tools.merge_svd import merge_loras_svd

    tensors = {k: v for k, v in _lora().items() if k.startswith("lora_unet_a.")}
    path = tmp_path / "with_emb.safetensors"
    save_file({**tensors, "bundle_emb.mychar.string_to_param.*": torch.randn(2, 16)}, path)
    with pytest.warns(UserWarning, match=r"leaves out the 1 embedding\(s\) bundled in the file \(mychar"):
        resized = resize_lora(str(path), new_rank=2)
    assert not any(k.startswith("bundle_emb") for k in resized.tensors)
    with pytest.warns(UserWarning, match="bundled in the file"):
        merge_loras_svd([str(path)], [1.0], new_rank=2, progress=False)
    with pytest.warns(UserWarning, match="bundled in the file"):
        concatenated, _, _ = concat_loras([str(path)], [1.0], progress=False)
    assert set(concatenated) == set(tensors)


def _module(g, down_shape, up_shape, alpha=None):
    sub = {"lora_down.weight": torch.randn(*down_shape, generator=g),
           "lora_up.weight": torch.randn(*up_shape, generator=g)}
    return sub if alpha is None else {**sub, "alpha": torch.tensor(alpha)}


def _file(modules):
    return {f"{name}.{k}": v for name, sub in modules.items() for k, v in sub.items()}


def _ref_dense(sub):
    """Dense float64 change of one module as kohya and the UIs read it: a missing alpha is alpha = rank."""
    down, up = sub["lora_down.weight"].double(), sub["lora_up.weight"].double()
    alpha = float(sub["alpha"]) if "alpha" in sub else down.shape[0]
    return alpha / down.shape[0] * up.flatten(1) @ down.flatten(1)


def test_a_module_without_alpha_keeps_its_change():
    """An old LoRA file without `.alpha` tensors means alpha = rank, scale 1 (kohya's create_network_from_weights:
    'support old LoRA without alpha', resize_lora.py: scale 1.0): resize and merge_svd keep scale * up @ down."""
    from lorakit.tools.merge_svd import merge_loras_svd

    sub = _module(torch.Generator().manual_seed(11), (4, 16), (8, 4))
    sd = _file({"lora_unet_q": sub})
    want = _ref_dense(sub)
    for k in (4, 2):
        best, _ = _best(want, k)
        assert torch.allclose(_dense(resize_lora(dict(sd), k).tensors, "lora_unet_q"), best, atol=1e-5)
    merged = merge_loras_svd([dict(sd)], [1.0], 4, progress=False)
    assert torch.allclose(_dense(merged, "lora_unet_q"), want, atol=1e-5)


def test_1x1_convs_take_new_rank_and_the_dims_written_are_the_largest(tmp_path):
    """--new_conv_rank is the rank of the kxk convs only (sd-scripts' resize_lora.py help 'rank ... for Conv2d 3x3';
    svd_merge_lora.py and extract_lora_from_models.py give 1x1 convs the linear rank), so SD1's 1x1 proj_in takes
    new_rank. ss_network_dim and conv_dim are the largest ranks written: an untrained module keeps 1 component
    and a module already below the rank keeps its own (kohya writes new_rank, which is the largest here)."""
    g = torch.Generator().manual_seed(12)
    modules = {"lora_unet_p": _module(g, (8, 16, 1, 1), (12, 8, 1, 1), 8.0),
               "lora_unet_l": _module(g, (8, 16), (12, 8), 4.0),
               "lora_unet_s": _module(g, (3, 16), (12, 3), 3.0),
               "lora_unet_z": _module(g, (8, 16), (12, 8), 8.0),
               "lora_unet_c": _module(g, (8, 6, 3, 3), (10, 8, 1, 1), 4.0),
               "lora_unet_c1": _module(g, (1, 6, 3, 3), (10, 1, 1, 1), 1.0)}
    modules["lora_unet_z"]["lora_up.weight"].zero_()
    src = tmp_path / "in.safetensors"
    save_file(_file(modules), src, metadata={"ss_network_args": json.dumps({"conv_dim": "8", "conv_alpha": "4"})})
    res = resize_lora(src, 4, new_conv_rank=2)
    ranks = {name: res.tensors[f"{name}.lora_down.weight"].shape[0] for name in modules}
    assert ranks == {"lora_unet_p": 4, "lora_unet_l": 4, "lora_unet_s": 3, "lora_unet_z": 1, "lora_unet_c": 2,
                     "lora_unet_c1": 1}
    for name in ("lora_unet_p", "lora_unet_c"):
        best, _ = _best(_ref_dense(modules[name]), ranks[name])
        assert torch.allclose(_dense(res.tensors, name), best, atol=1e-5), name
    assert res.metadata["ss_network_dim"] == "4"
    assert json.loads(res.metadata["ss_network_args"])["conv_dim"] == "2"


def test_an_integer_alpha_gives_a_float_new_alpha():
    """sd-scripts saves alpha as int64 with network_alpha 0; the resized alpha (alpha / rank x new rank) is
    fractional and must not be truncated."""
    from lorakit.tools.resize import default_save_dtypes

    sub = {"lora_up.weight": torch.zeros(4, 8), "lora_down.weight": torch.zeros(8, 4), "alpha": torch.tensor(4)}
    tensors = {f"m.{k}": v for k, v in sub.items()}
    assert default_save_dtypes(tensors, {"m": sub})["m.alpha"] == torch.float32


def test_a_dynamic_method_is_capped_by_new_rank_and_new_conv_rank():
    """new_rank / new_conv_rank cap what a dynamic method selects (kohya's resize: the rank never exceeds
    new_rank); sv_fro 0.9999 alone would keep nearly all 8 components here."""
    res = resize_lora(_lora(), 3, new_conv_rank=2, dynamic_method="sv_fro", dynamic_param=0.9999)
    assert (res.layers["lora_unet_a"]["rank"], res.layers["lora_unet_c"]["rank"]) == (3, 2)
    for name, k in (("lora_unet_a", 3), ("lora_unet_c", 2)):
        best, _ = _best(_dense(_lora(), name), k)
        assert torch.allclose(_dense(res.tensors, name), best, atol=1e-5)


def test_a_tucker_module_is_a_conv_and_takes_new_conv_rank():
    """A Tucker module (lora_mid; its lora_down is 1x1) changes a kxk conv: it takes new_conv_rank."""
    g = torch.Generator().manual_seed(4)
    sd = {"lora_unet_t.lora_down.weight": torch.randn(4, 6, 1, 1, generator=g),
          "lora_unet_t.lora_mid.weight": torch.randn(4, 4, 3, 3, generator=g),
          "lora_unet_t.lora_up.weight": torch.randn(10, 4, 1, 1, generator=g), "lora_unet_t.alpha": torch.tensor(2.0)}
    res = resize_lora(sd, 3, new_conv_rank=2)
    assert res.layers["lora_unet_t"]["rank"] == 2 and res.layers["lora_unet_t"]["conv"]
    assert res.tensors["lora_unet_t.lora_down.weight"].shape == (2, 6, 3, 3)


@pytest.mark.parametrize("method,param", [("sv_fro", 1.5), ("sv_cumulative", -0.1), ("sv_ratio", 0.5),
                                          ("sv_fro", None)])
def test_a_dynamic_param_out_of_its_range_is_refused(method, param):
    with pytest.raises(ValueError, match="dynamic_param"):
        resize_lora(_lora(), 4, dynamic_method=method, dynamic_param=param)


def test_a_dylora_cut_refuses_a_dynamic_method():
    with pytest.raises(ValueError, match="DyLoRA cut"):
        resize_lora(_lora(), 4, dynamic_method="sv_fro", dynamic_param=0.9, dylora=True)


def test_a_zero_module_keeps_one_component():
    """An untrained module (lora_up all zero) keeps rank 1 (kohya's MIN_SV), not the cap, and stays zero."""
    sd = _lora()
    sd["lora_unet_a.lora_up.weight"] = torch.zeros_like(sd["lora_unet_a.lora_up.weight"])
    res = resize_lora(sd, 4)
    assert res.layers["lora_unet_a"]["rank"] == 1 and res.tensors["lora_unet_a.lora_down.weight"].shape == (1, 40)
    assert not _dense(res.tensors, "lora_unet_a").any()
