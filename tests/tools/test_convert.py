"""lorakit convert against independent references: diffusers' and PEFT's own loaders give the U-Net outputs that
lorakit's load_network gives on the kohya file (float64), diffusers' own kohya converter gives the same names and
values, and round trips give the same tensors and metadata back."""

from __future__ import annotations

import copy
import functools
import json
import os

import pytest
import torch

pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

from safetensors.torch import load_file as st_load  # noqa: E402
from safetensors.torch import save_file as st_save  # noqa: E402

from lorakit import create_network, load_network  # noqa: E402
from lorakit.cli import main  # noqa: E402
from lorakit.formats import load_file  # noqa: E402
from lorakit.formats.peft_layout import name_to_path  # noqa: E402
from lorakit.formats.unet_paths import SD_LAYOUT, SDXL_LAYOUT, diffusers_to_ldm  # noqa: E402
from lorakit.tools.convert import ConvertError, convert  # noqa: E402

from ..network.tiny import randomize, tiny_model, unet_inputs  # noqa: E402


def _save(tmp_path, kind, algo, name="a.safetensors", dtype=None, metadata=None, **opts):
    unet, tes = tiny_model(kind)
    net = randomize(create_network(unet, tes, algo=algo, **opts), 0.05)
    path = tmp_path / name
    net.save(path, dtype=dtype, metadata=metadata or {"ss_network_dim": "4", "modelspec.title": "t"})
    return path


def _f64_inputs(unet, kind):
    args, kwargs = unet_inputs(unet, kind)
    args = tuple(a.double() if a.is_floating_point() else a for a in args)
    if kwargs:
        kwargs = {"added_cond_kwargs": {k: v.double() for k, v in kwargs["added_cond_kwargs"].items()}}
    return args, kwargs


@functools.lru_cache(maxsize=None)
@torch.no_grad()
def _base_output(kind):
    u = copy.deepcopy(tiny_model(kind)[0]).double()
    args, kwargs = _f64_inputs(u, kind)
    return u(*args, **kwargs).sample


@torch.no_grad()
def _lorakit_output(kind, path):
    """(U-Net output with lorakit's load_network of the kohya file, output without it), float64."""
    unet, tes = tiny_model(kind)
    u = copy.deepcopy(unet).double()
    load_network(u, path, text_encoders=[copy.deepcopy(t).double() for t in tes], dtype=torch.float64).apply()
    args, kwargs = _f64_inputs(u, kind)
    return u(*args, **kwargs).sample, _base_output(kind)


def _close(out, ref, base):
    assert (ref - base).abs().max() > 1e-3  # the adapter changes the output
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------
# names


def test_every_module_name_of_full_size_models_parses_back():
    """kohya names carry paths with "." -> "_"; the vocabulary must give back every real module path."""
    from lorakit.models.meta import build_on_meta

    for model, layout in (("sd15", SD_LAYOUT), ("sdxl", SDXL_LAYOUT)):
        unet, tes = build_on_meta(model)
        paths = [p for p, _ in unet.named_modules() if p]
        for p in paths:
            assert name_to_path(p.replace(".", "_")) == p
            try:
                sgm = diffusers_to_ldm(p, layout)
            except ValueError:
                continue
            assert name_to_path(sgm.replace(".", "_")) == sgm
        for te in tes:
            for p, _ in te.named_modules():
                if p:
                    assert name_to_path(p.replace(".", "_")) == p
                    assert name_to_path(("text_model." + p).replace(".", "_")) == "text_model." + p


# ---------------------------------------------------------------------------------------------------------
# outputs through diffusers' and PEFT's own loaders


@pytest.mark.parametrize("kind,algo,opts", [
    ("sd1", "lora", {"preset": "full", "dim": 4, "alpha": 2, "conv_dim": 2, "conv_alpha": 1}),  # ranks/alphas vary
    ("sdxl", "lora", {"preset": "attn-mlp", "dim": 4, "alpha": 8}),
    ("sdxl", "lokr", {"preset": "attn-mlp", "dim": 2, "alpha": 1, "factor": 4}),
])
def test_diffusers_loader_gives_lorakits_outputs(tmp_path, kind, algo, opts):
    src = _save(tmp_path, kind, algo, **opts)
    convert(src, tmp_path / "d.safetensors", to="diffusers")
    ref, base = _lorakit_output(kind, src)
    unet, _ = tiny_model(kind)
    u = copy.deepcopy(unet)
    u.load_lora_adapter(str(tmp_path), weight_name="d.safetensors", prefix="unet", adapter_name="x")
    u.double()
    args, kwargs = _f64_inputs(u, kind)
    with torch.no_grad():
        _close(u(*args, **kwargs).sample, ref, base)


def test_diffusers_text_encoder_loader_agrees(tmp_path):
    from diffusers.loaders.lora_base import _load_lora_into_text_encoder

    src = _save(tmp_path, "sd1", "lora", preset="attn-mlp", dim=4, alpha=1)
    convert(src, tmp_path / "d.safetensors", to="diffusers")
    sd, meta = load_file(tmp_path / "d.safetensors")
    config = {k: v for k, v in json.loads(meta["lora_adapter_metadata"]).items() if k.startswith("text_encoder.")}
    unet, tes = tiny_model("sd1")
    ids = torch.tensor([[0, 5, 7, 9, 1]])
    te_ref = copy.deepcopy(tes[0]).double()
    net = load_network(copy.deepcopy(unet), src, text_encoders=[te_ref], dtype=torch.float64).apply()
    with torch.no_grad():
        ref = te_ref(ids).last_hidden_state
        net.restore()
        base = te_ref(ids).last_hidden_state
    te = copy.deepcopy(tes[0])
    _load_lora_into_text_encoder(sd, None, te, prefix="text_encoder", metadata=config)
    te.double()
    with torch.no_grad():
        _close(te(ids).last_hidden_state, ref, base)


def test_peft_loha_gives_lorakits_outputs(tmp_path):
    """diffusers loads only LoRA and LoKr; LoHa goes through PEFT's own API with the config we wrote."""
    from peft import LoHaConfig, inject_adapter_in_model, set_peft_model_state_dict

    src = _save(tmp_path, "sd1", "loha", preset="unet-convblock-only", dim=4, alpha=2, conv_dim=2, conv_alpha=4,
                use_tucker=True)
    convert(src, tmp_path / "d.safetensors", to="peft")
    sd, meta = load_file(tmp_path / "d.safetensors")
    config = {k[len("unet."):]: v for k, v in json.loads(meta["lora_adapter_metadata"]).items()
              if k.startswith("unet.")}
    assert config["use_effective_conv2d"] is True
    ref, base = _lorakit_output("sd1", src)
    unet, _ = tiny_model("sd1")
    u = inject_adapter_in_model(LoHaConfig(**config), copy.deepcopy(unet))
    result = set_peft_model_state_dict(u, {k[len("unet."):]: v for k, v in sd.items() if k.startswith("unet.")})
    assert not [k for k in result.unexpected_keys if "hada" in k]
    u.double()
    args, kwargs = _f64_inputs(u, "sd1")
    with torch.no_grad():
        _close(u(*args, **kwargs).sample, ref, base)


def test_peft_dora_along_output_rows_gives_lorakits_outputs(tmp_path):
    """PEFT's DoRA normalises W + s BA per output row (DoraLinearLayer.get_weight_norm: dim=1; convs over every dim
    but 0): lorakit's dora_axis "out". Such a file (Linear and 3x3 convs) converts exactly and back; the default
    axis (input columns) is refused naming it."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    src = _save(tmp_path, "sd1", "lora", preset="full", dim=4, alpha=2, conv_dim=2, conv_alpha=1, dora_wd=True,
                dora_axis="out")
    convert(src, tmp_path / "p.safetensors", to="peft")
    sd, meta = load_file(tmp_path / "p.safetensors")
    config = {k[len("unet."):]: v for k, v in json.loads(meta["lora_adapter_metadata"]).items()
              if k.startswith("unet.")}
    assert config["use_dora"] is True
    unet, _ = tiny_model("sd1")
    u = inject_adapter_in_model(LoraConfig(**config), copy.deepcopy(unet))
    result = set_peft_model_state_dict(u, {k[len("unet."):]: v for k, v in sd.items() if k.startswith("unet.")})
    assert not result.unexpected_keys and not [k for k in result.missing_keys if "lora_" in k]
    u.double()
    ref, base = _lorakit_output("sd1", src)
    args, kwargs = _f64_inputs(u, "sd1")
    with torch.no_grad():
        _close(u(*args, **kwargs).sample, ref, base)
    convert(tmp_path / "p.safetensors", tmp_path / "k.safetensors", to="kohya")
    a, b = st_load(src), st_load(tmp_path / "k.safetensors")
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)
    columns = _save(tmp_path, "sd1", "lora", name="in.safetensors", preset="attn-mlp", dora_wd=True)
    with pytest.raises(ConvertError, match=r"DoRA along input columns .*dora_axis \"in\".* per output row"):
        convert(columns, tmp_path / "o.safetensors", to="peft")


def _peft_unet(config, seed, marker):
    """The tiny SD1 U-Net (float64) with PEFT's own adapter layers of `config`, their `marker` tensors random; its
    PEFT state dict (bare U-Net keys, float32) and the config's fields as diffusers writes them."""
    from peft import get_peft_model_state_dict, inject_adapter_in_model

    torch.manual_seed(seed)
    unet, _ = tiny_model("sd1")
    u = inject_adapter_in_model(config, copy.deepcopy(unet)).double()
    with torch.no_grad():
        for name, p in u.named_parameters():
            if marker in name:
                p.copy_(torch.randn_like(p).float() * 0.1)
    sd = {k: v.float().contiguous() for k, v in get_peft_model_state_dict(u).items()}
    return u, sd, {k: sorted(v) if isinstance(v, set) else v for k, v in config.to_dict().items()}


def test_peft_lokr_with_full_factors_keeps_peft_scale(tmp_path):
    """PEFT scales LoKr by alpha/r even where both factors are stored whole (r at least half of w2's side), where
    kohya loaders apply no alpha: the converted file carries the scale in lokr_w1, so lorakit's load gives PEFT's
    own output (to_k through its rank pattern keeps a low-rank w2 and its alpha)."""
    from peft import LoKrConfig

    config = LoKrConfig(r=4, alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"], decompose_factor=-1,
                        rank_pattern={"to_k": 1}, alpha_pattern={"to_v": 8})
    u, bare, fields = _peft_unet(config, 3, "lokr_")
    sd = {f"unet.{k}": v for k, v in bare.items()}
    assert any(k.endswith("to_q.lokr_w2") for k in sd) and any(k.endswith("to_k.lokr_w2_a") for k in sd)
    st_save(sd, tmp_path / "p.safetensors",
            {"lora_adapter_metadata": json.dumps({f"unet.{k}": v for k, v in fields.items()}, default=str)})
    convert(tmp_path / "p.safetensors", tmp_path / "k.safetensors", to="kohya")
    out, base = _lorakit_output("sd1", tmp_path / "k.safetensors")
    args, kwargs = _f64_inputs(u, "sd1")
    with torch.no_grad():
        _close(out, u(*args, **kwargs).sample, base)


@pytest.mark.parametrize("prefixed", [True, False])
def test_peft_rslora_converts_at_peft_scale(tmp_path, prefixed):
    """use_rslora: PEFT scales a LoRA by lora_alpha / sqrt(r) (to_k at its rank pattern's r), so the kohya alpha is
    lora_alpha sqrt(r). The config is read with diffusers' "unet." prefix (save_lora_weights) or without one (the
    config alone, as save_lora_adapter writes it)."""
    from peft import LoraConfig

    config = LoraConfig(r=16, lora_alpha=8, use_rslora=True, target_modules=["to_q", "to_k", "to_v"],
                        rank_pattern={"to_k": 4}, init_lora_weights=False)
    u, bare, fields = _peft_unet(config, 4, "lora_")
    sd = {f"unet.{k}": v for k, v in bare.items()}
    meta = {f"unet.{k}" if prefixed else k: v for k, v in fields.items()}
    st_save(sd, tmp_path / "p.safetensors", {"lora_adapter_metadata": json.dumps(meta, default=str)})
    convert(tmp_path / "p.safetensors", tmp_path / "k.safetensors", to="kohya")
    alphas = {k: float(v) for k, v in st_load(tmp_path / "k.safetensors").items() if k.endswith(".alpha")}
    assert {round(a, 9) for k, a in alphas.items() if "to_q" in k} == {8 * 4.0}  # 8 sqrt(16)
    assert {round(a, 9) for k, a in alphas.items() if "to_k" in k} == {8 * 2.0}  # 8 sqrt(4)
    out, base = _lorakit_output("sd1", tmp_path / "k.safetensors")
    args, kwargs = _f64_inputs(u, "sd1")
    with torch.no_grad():
        _close(out, u(*args, **kwargs).sample, base)


def test_a_bare_unet_adapter_as_diffusers_save_lora_adapter_writes_it_converts(tmp_path, capsys):
    """diffusers' UNet2DConditionModel.save_lora_adapter (and PEFT's get_peft_model_state_dict on a U-Net) write keys
    without the "unet." prefix and the config without one: load_network points to convert, and convert reads them
    as the U-Net's (as ComfyUI does), giving PEFT's own outputs. A diffusers U-Net's weights are still no adapter."""
    from peft import LoraConfig

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "proj_in", "conv1"],
                        init_lora_weights=False)
    u, sd, fields = _peft_unet(config, 5, "lora_")
    unet, _ = tiny_model("sd1")
    assert all(k.startswith(("down_blocks.", "mid_block.", "up_blocks.")) for k in sd)
    st_save(sd, tmp_path / "bare.safetensors", {"lora_adapter_metadata": json.dumps(fields, default=str)})
    with pytest.raises(ValueError, match="lorakit convert"):
        load_network(copy.deepcopy(unet), tmp_path / "bare.safetensors")
    assert main(["convert", str(tmp_path / "bare.safetensors"), str(tmp_path / "k.safetensors"), "--to", "kohya",
                 "--no-progress"]) == 0
    out, base = _lorakit_output("sd1", tmp_path / "k.safetensors")
    args, kwargs = _f64_inputs(u, "sd1")
    with torch.no_grad():
        _close(out, u(*args, **kwargs).sample, base)
    st_save({k: v.contiguous() for k, v in unet.state_dict().items()}, tmp_path / "unet.safetensors")
    capsys.readouterr()
    assert main(["convert", str(tmp_path / "unet.safetensors"), str(tmp_path / "u.safetensors"), "--to", "kohya"]) == 1
    assert "lorakit convert: error:" in capsys.readouterr().err


@pytest.mark.parametrize("metadata, named", [
    ({"unet.r": 4, "unet.alpha": None}, r"'unet.alpha' = None: expected a positive number"),
    ([1, 2], r"expected a JSON object of PEFT config fields, got list"),
    ({"unet.r": "4"}, r"'unet.r' = '4': expected a positive number"),
    ({"unet.rank_pattern": {"to_k": "x"}}, r"'unet.rank_pattern' = .*: expected an object of positive numbers"),
])
def test_a_peft_config_of_the_wrong_kind_is_refused_naming_the_field(tmp_path, metadata, named):
    src = _save(tmp_path, "sd1", "lora", preset="attn-only", dim=4)
    convert(src, tmp_path / "p.safetensors", to="peft")
    sd, _ = load_file(tmp_path / "p.safetensors")
    st_save(sd, tmp_path / "odd.safetensors", {"lora_adapter_metadata": json.dumps(metadata)})
    with pytest.raises(ConvertError, match=rf"metadata 'lora_adapter_metadata': {named}"):
        convert(tmp_path / "odd.safetensors", tmp_path / "k.safetensors", to="kohya")
    assert not (tmp_path / "k.safetensors").exists()


def test_diffusers_own_kohya_converter_agrees_on_names_values_and_alphas(tmp_path):
    from diffusers.loaders.lora_conversion_utils import (_convert_non_diffusers_lora_to_diffusers,
                                                         _maybe_map_sgm_blocks_to_diffusers)
    from diffusers.utils.state_dict_utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft

    for kind in ("sd1", "sdxl"):
        src = _save(tmp_path, kind, "lora", name=f"{kind}.safetensors", preset="attn-mlp", dim=4, alpha=3)
        kohya = st_load(src)
        convert(src, tmp_path / f"{kind}_d.safetensors", to="diffusers")
        ours, meta = load_file(tmp_path / f"{kind}_d.safetensors")
        configs = json.loads(meta["lora_adapter_metadata"])
        unet, _ = tiny_model(kind)
        mapped = _maybe_map_sgm_blocks_to_diffusers(dict(kohya), unet.config)
        theirs, alphas = _convert_non_diffusers_lora_to_diffusers(mapped)
        peft_sd = {}
        for comp in ("unet", "text_encoder", "text_encoder_2"):
            part = {k[len(comp) + 1:]: v for k, v in theirs.items() if k.startswith(comp + ".")}
            if not part:
                continue
            conv = convert_unet_state_dict_to_peft(part) if comp == "unet" else convert_state_dict_to_peft(part)
            peft_sd.update({f"{comp}.{k}": v for k, v in conv.items()})
        assert set(peft_sd) == set(ours)
        assert all(torch.equal(peft_sd[k], ours[k]) for k in ours)
        for key, alpha in alphas.items():  # every module's alpha, as diffusers reads it from the kohya file
            comp, path = key.split(".", 1)
            path = path.removesuffix(".alpha").removeprefix("text_model.")
            cfg = {k.split(".", 1)[1]: v for k, v in configs.items() if k.startswith(comp + ".")}
            assert cfg["alpha_pattern"].get(path, cfg["lora_alpha"]) == alpha
        assert len(alphas) == len({k.rsplit(".lora_", 1)[0] for k in ours})


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_diffusers_own_layout_converts_back_to_the_same_kohya_file(tmp_path, kind):
    """What diffusers' training scripts save (convert_state_dict_to_diffusers of a PEFT model: U-Net attention
    as to_q.lora.down/up, CLIP attention as q_proj.lora_linear_layer.down/up, the rest lora_A/lora_B) converts
    to the kohya tensors it came from; load_network points at convert for it."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_diffusers

    src = _save(tmp_path, kind, "lora", preset="attn-mlp", dim=4, alpha=3)
    convert(src, tmp_path / "peft.safetensors", to="diffusers")
    peft_sd, meta = load_file(tmp_path / "peft.safetensors")
    theirs = convert_state_dict_to_diffusers(dict(peft_sd))
    assert any(".lora.down." in k for k in theirs) and any(".lora_linear_layer.down." in k for k in theirs)
    st_save(theirs, str(tmp_path / "diffusers.safetensors"), metadata=meta)
    unet, tes = tiny_model(kind)
    with pytest.raises(ValueError, match="lorakit convert"):
        load_network(copy.deepcopy(unet), tmp_path / "diffusers.safetensors", text_encoders=tes)
    convert(tmp_path / "diffusers.safetensors", tmp_path / "back.safetensors", to="kohya")
    back, original = st_load(tmp_path / "back.safetensors"), st_load(src)
    assert set(back) == set(original)
    assert all(torch.equal(back[k], original[k]) for k in original)


def test_diffusers_old_attention_processor_layout_is_named(tmp_path):
    st_save({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight":
             torch.zeros(2, 8)}, str(tmp_path / "old.safetensors"))
    with pytest.raises(ConvertError, match="old attention-processor layout"):
        convert(tmp_path / "old.safetensors", tmp_path / "o.safetensors", to="kohya")


# ---------------------------------------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("kind,algo,dtype,opts", [
    ("sd1", "lora", None, {"preset": "full", "dim": 4, "alpha": 2, "conv_dim": 2, "conv_alpha": 1}),
    ("sdxl", "lora", torch.float16, {"preset": "attn-mlp", "dim": 4, "alpha": 1}),
    ("sd1", "loha", torch.bfloat16, {"preset": "full", "dim": 2, "alpha": 1, "use_tucker": True}),
    ("sdxl", "lokr", None, {"preset": "attn-mlp", "dim": 2, "alpha": 1, "factor": 4}),
])
def test_kohya_to_peft_to_kohya_is_exact(tmp_path, kind, algo, dtype, opts):
    src = _save(tmp_path, kind, algo, dtype=dtype, **opts)
    convert(src, tmp_path / "p.safetensors", to="peft")
    convert(tmp_path / "p.safetensors", tmp_path / "k.safetensors", to="kohya")
    a, ma = load_file(src)
    b, mb = load_file(tmp_path / "k.safetensors")
    assert list(sorted(a)) == list(sorted(b))
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k
    assert ma == mb  # metadata back as it was, kohya's hashes included
    # and the other way: peft -> kohya -> peft gives the same tensors and config
    convert(tmp_path / "k.safetensors", tmp_path / "p2.safetensors", to="peft")
    p1, m1 = load_file(tmp_path / "p.safetensors")
    p2, m2 = load_file(tmp_path / "p2.safetensors")
    assert set(p1) == set(p2) and all(torch.equal(p1[k], p2[k]) for k in p1) and m1 == m2


def test_sdxl_name_styles_round_trip_and_match_the_module_map(tmp_path):
    src = _save(tmp_path, "sdxl", "lora", preset="full", dim=2, alpha=1)
    convert(src, tmp_path / "d.safetensors", unet_names="diffusers")
    convert(tmp_path / "d.safetensors", tmp_path / "s.safetensors", unet_names="sgm")
    a, d, s = (st_load(tmp_path / n) for n in ("a.safetensors", "d.safetensors", "s.safetensors"))
    assert a.keys() == s.keys() and all(torch.equal(a[k], s[k]) for k in a)
    # the diffusers names are those of the U-Net's own module paths (what LyCORIS' loader looks up)
    unet, tes = tiny_model("sdxl")
    net = create_network(unet, tes, algo="lora", preset="full", dim=2)
    expected = {"lora_unet_" + e.path.replace(".", "_") for n, e in net.entries.items() if e.component == "unet"}
    assert {k.split(".")[0] for k in d if k.startswith("lora_unet_")} == expected
    assert any(k.startswith("lora_unet_input_blocks_4_1_") for k in a)
    assert not any(k.startswith("lora_unet_input_blocks") for k in d)
    for key, value in d.items():  # the same tensors under the other name
        name, _, suffix = key.partition(".")
        if name.startswith("lora_unet_"):
            name = "lora_unet_" + diffusers_to_ldm(name_to_path(name[10:]), SDXL_LAYOUT).replace(".", "_")
        assert torch.equal(a[f"{name}.{suffix}"], value)


def test_dtypes(tmp_path):
    src = _save(tmp_path, "sd1", "lora", preset="attn-mlp", dim=4, alpha=2)
    convert(src, tmp_path / "h.safetensors", dtype="fp16")
    convert(tmp_path / "h.safetensors", tmp_path / "f.safetensors", dtype="fp32")
    convert(tmp_path / "f.safetensors", tmp_path / "h2.safetensors", dtype="fp16")
    convert(src, tmp_path / "b.safetensors", to="peft", dtype="bf16")
    a, h, f, h2, b = (st_load(tmp_path / n) for n in ("a.safetensors", "h.safetensors", "f.safetensors",
                                                      "h2.safetensors", "b.safetensors"))
    assert all(torch.equal(h[k], a[k].half()) for k in a)  # fp32 -> fp16: rounding to nearest
    assert all(torch.equal(h[k], h2[k]) and h2[k].dtype == torch.float16 for k in a)  # fp16 -> fp32 -> fp16 exact
    assert {t.dtype for t in b.values()} == {torch.bfloat16}


# ---------------------------------------------------------------------------------------------------------
# bad input


def _no_output(tmp_path, out):
    assert not os.path.exists(out) and not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


@pytest.mark.parametrize("algo,opts,named", [
    ("diag-oft", {"dim": 2}, "OFT"), ("glora", {}, "GLoRA"), ("ia3", {"preset": "ia3"}, "(IA)^3"),
    ("lora", {"use_tucker": True, "preset": "full"}, "Tucker"), ("lora", {"dora_wd": True}, "DoRA"),
    ("full", {}, "full"),
])
def test_what_peft_lacks_is_an_error_naming_it(tmp_path, algo, opts, named):
    src = _save(tmp_path, "sd1", algo, **{"preset": "attn-mlp", **opts})
    with pytest.raises(ConvertError, match=r"PEFT") as e:
        convert(src, tmp_path / "o.safetensors", to="peft")
    assert named in str(e.value) and "a.safetensors" in str(e.value)
    _no_output(tmp_path, tmp_path / "o.safetensors")


def test_checkpoints_unknown_targets_and_generic_files_are_refused(tmp_path, capsys):
    ckpt = tmp_path / "model.safetensors"
    st_save({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 2),
             "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(2, 2)}, ckpt)
    with pytest.raises(ConvertError, match=r"model\.safetensors: is a model checkpoint \(sd1\), not an adapter"):
        convert(ckpt, tmp_path / "o.safetensors", to="kohya")
    src = _save(tmp_path, "sd1", "lora", preset="attn-mlp")
    with pytest.raises(ConvertError, match=r"--to 'onnx': unknown target format; expected one of kohya"):
        convert(src, tmp_path / "o.safetensors", to="onnx")
    generic = tmp_path / "g.safetensors"
    st_save({"lycoris_blocks_0.lora_down.weight": torch.zeros(2, 4), "lycoris_blocks_0.lora_up.weight": torch.zeros(4, 2)},
            generic)
    with pytest.raises(ConvertError, match=r"generic model \(lycoris_"):
        convert(generic, tmp_path / "o.safetensors", to="peft")
    _no_output(tmp_path, tmp_path / "o.safetensors")
    # the CLI: exit code 2 and the message
    assert main(["convert", str(ckpt), str(tmp_path / "o.safetensors"), "--to", "peft"]) == 1
    assert "is a model checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["convert", "--help"])
    assert e.value.code == 0 and "diffusers/PEFT" in capsys.readouterr().out
    assert main(["convert", str(src), str(tmp_path / "o.safetensors"), "--to", "diffusers", "--no-progress"]) == 0
    assert st_load(tmp_path / "o.safetensors")
    (tmp_path / "folder.safetensors").mkdir()  # an OSError of the writer: one line too, not a traceback
    assert main(["convert", str(src), str(tmp_path / "folder.safetensors"), "--to", "diffusers", "--no-progress"]) == 1
    assert "folder.safetensors: is a folder" in capsys.readouterr().err


def test_unet_name_options_that_do_not_apply_are_refused(tmp_path):
    """--unet-names names kohya output's U-Net style: an unknown style, or one given for diffusers output (which
    has diffusers names only), is an error naming the option, and nothing is written."""
    src = _save(tmp_path, "sd1", "lora", preset="attn-mlp")
    for to, style in (("kohya", "bogus"), ("diffusers", "sgm"), ("peft", "kohya")):
        with pytest.raises(ConvertError, match="--unet-names"):
            convert(src, tmp_path / "o.safetensors", to=to, unet_names=style)
    _no_output(tmp_path, tmp_path / "o.safetensors")
