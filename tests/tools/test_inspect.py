"""lorakit inspect: the reported numbers (dims, alphas, parameter counts, blocks, zero and NaN tensors, metadata)
against values computed here from the tensors themselves, on files written by lorakit (several algorithms), by
lycoris-lora, by hand in kohya's layout, and in the diffusers/PEFT layout by diffusers and PEFT."""

from __future__ import annotations

import copy
import json
import os
import re

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file as st_load
from safetensors.torch import save_file as st_save

pytest.importorskip("diffusers")

from lorakit import create_network, load_network  # noqa: E402
from lorakit.cli import main  # noqa: E402
from lorakit.tools.inspect import InspectError, inspect_file  # noqa: E402

from ..network.tiny import randomize, tiny_model  # noqa: E402


def sd_block(path: str) -> str | None:
    """The block of a diffusers SD1 U-Net path by DESIGN.md's rule, written out independently of lorakit."""
    m = re.match(r"(down|up)_blocks\.(\d)\.(resnets|attentions|downsamplers|upsamplers)\.(\d)", path)
    if m:
        side, i, kind, j = m.group(1), int(m.group(2)), m.group(3), int(m.group(4))
        if side == "down":
            return f"IN{3 + 3 * i:02d}" if kind == "downsamplers" else f"IN{1 + 3 * i + j:02d}"
        return f"OUT{3 * i + 2:02d}" if kind == "upsamplers" else f"OUT{3 * i + j:02d}"
    if path.startswith("mid_block"):
        return "MID"
    return {"conv_in": "IN00", "conv_out": "FINAL", "time_embedding": "EMB"}.get(path.split(".")[0])


def expected_dim(algo, sub):
    if algo == "lora":
        return sub["lora_down.weight"].shape[0]
    if algo == "loha":
        return sub["hada_w1_a"].shape[1] if sub["hada_w1_a"].dim() == 2 and "hada_t1" not in sub else sub["hada_w1_a"].shape[0]
    if algo == "lokr":
        return sub["lokr_w2_b"].shape[0] if "lokr_w2_b" in sub else None
    if algo == "diag-oft":
        return sub["oft_blocks"].shape[1]
    if algo == "glora":  # a1 (in, dim), a2 (dim, in)
        return sub["a2.weight"].shape[0]
    return None


def groups(tensors):
    out = {}
    for k, v in tensors.items():
        name, _, suffix = k.partition(".")
        out.setdefault(name, {})[suffix] = v
    return out


@pytest.mark.parametrize("algo,opts", [
    ("lora", {"preset": "full", "dim": 4, "alpha": 2, "conv_dim": 2, "conv_alpha": 1}),
    ("loha", {"preset": "attn-mlp", "dim": 4, "alpha": 1}),
    ("lokr", {"preset": "full", "dim": 2, "alpha": 1, "factor": 4}),
    ("ia3", {"preset": "ia3"}),
    ("diag-oft", {"preset": "attn-mlp", "dim": 4}),
    ("glora", {"preset": "attn-mlp", "dim": 4, "alpha": 2}),
])
def test_lorakit_files(tmp_path, algo, opts):
    unet, tes = tiny_model("sd1")
    net = randomize(create_network(unet, tes, algo=algo, **opts), 0.05)
    path = tmp_path / "a.safetensors"
    net.save(path, dtype=torch.float16)
    report = inspect_file(path)
    tensors = st_load(path)
    by_name = {m["name"]: m for m in report["modules"]}
    assert set(by_name) == set(net.entries) and report["summary"]["modules"] == len(net.entries)
    assert report["file_size"] == os.path.getsize(path) and report["layout"] == "kohya/LyCORIS"
    floats = sum(t.is_floating_point() for t in tensors.values())
    assert report["summary"]["dtypes"] == {"float16": floats, **({"int64": len(tensors) - floats} if algo == "ia3" else {})}
    for name, sub in groups(tensors).items():
        m = by_name[name]
        assert m["algo"] == algo
        assert m["parameters"] == sum(t.numel() for k, t in sub.items() if k not in ("alpha", "on_input"))
        if algo in ("lora", "loha", "lokr", "glora"):
            assert m["dim"] == expected_dim(algo, sub)
            if m["dim"] is not None:
                assert m["alpha"] == float(sub["alpha"])
        entry = net.entries[name]
        assert m["block"] == ("BASE" if entry.component == "text_encoder" else sd_block(entry.path))
    assert report["summary"]["parameters"] == sum(t.numel() for k, t in tensors.items()
                                                  if not k.endswith((".alpha", ".on_input")))
    expected_blocks = {("BASE" if e.component == "text_encoder" else sd_block(e.path)) for e in net.entries.values()}
    assert set(report["summary"]["blocks"]) == expected_blocks
    if algo == "lora":  # conv adapters: their own dim and alpha
        assert report["summary"]["dims"] == {"2": sum(1 for s in groups(tensors).values()
                                                      if s["lora_down.weight"].shape[0] == 2),
                                             "4": sum(1 for s in groups(tensors).values()
                                                      if s["lora_down.weight"].shape[0] == 4)}
    assert report["non_finite_tensors"] == [] and report["untrained_modules"] == []


def test_untrained_lorakit_file_is_reported_untrained(tmp_path):
    unet, tes = tiny_model("sdxl")
    net = create_network(unet, tes, algo="lora", preset="attn-mlp", dim=2)  # lora_up starts at zero
    net.save(tmp_path / "z.safetensors")
    report = inspect_file(tmp_path / "z.safetensors")
    ups = sorted(k for k in st_load(tmp_path / "z.safetensors") if k.endswith("lora_up.weight"))
    assert report["zero_tensors"] == ups
    assert len(report["untrained_modules"]) == len(net.entries)
    # SDXL blocks: attentions sit in IN04, IN05, IN07, IN08, MID, OUT00-OUT05 (and the text encoders)
    assert report["summary"]["blocks"] == ["BASE", "IN04", "IN05", "IN07", "IN08", "MID"] + [f"OUT0{k}" for k in range(6)]


def test_lycoris_package_file(tmp_path):
    lycoris = pytest.importorskip("lycoris")
    from lycoris.wrapper import LycorisNetwork

    saved = {k: copy.copy(v) for k, v in vars(LycorisNetwork).items() if k.isupper()}
    try:
        model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 16, 24), nn.Linear(24, 12))
        lnet = lycoris.create_lycoris(model, 1.0, linear_dim=4, linear_alpha=2.0, algo="loha")
        lnet.apply_to()
        lnet.save_weights(str(tmp_path / "l.safetensors"), torch.float32, {"ss_network_module": "lycoris.kohya"})
    finally:
        for k, v in saved.items():
            setattr(LycorisNetwork, k, v)
    report = inspect_file(tmp_path / "l.safetensors")
    tensors = st_load(tmp_path / "l.safetensors")
    subs = groups(tensors)
    assert report["layout"].startswith("LyCORIS (generic")
    assert {m["name"] for m in report["modules"]} == set(subs) == {"lycoris_0", "lycoris_2", "lycoris_3"}
    for m in report["modules"]:
        assert m["algo"] == "loha" and m["dim"] == 4 and m["alpha"] == 2.0 and m["block"] is None
        assert m["parameters"] == sum(t.numel() for k, t in subs[m["name"]].items() if k != "alpha")
    assert len(report["untrained_modules"]) == 3  # LoHa starts with hada_w2_b = 0
    assert report["metadata"]["ss"] == {"ss_network_module": "lycoris.kohya"}


def test_kohya_style_file_by_hand(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_"
    t = {}
    for proj, dim, alpha in (("q", 8, 4.0), ("k", 4, 1.0), ("v", 8, 8.0)):
        t[f"{base}{proj}.lora_down.weight"] = torch.randn(dim, 320, generator=g).half()
        t[f"{base}{proj}.lora_up.weight"] = torch.randn(320, dim, generator=g).half()
        t[f"{base}{proj}.alpha"] = torch.tensor(alpha).half()
    t[f"{base}k.lora_up.weight"].zero_()
    t[f"{base}v.lora_down.weight"][0, 0] = float("nan")
    t["lora_te_text_model_encoder_layers_11_mlp_fc1.lora_down.weight"] = torch.randn(8, 768, generator=g).half()
    t["lora_te_text_model_encoder_layers_11_mlp_fc1.lora_up.weight"] = torch.randn(3072, 8, generator=g).half()
    tags = {"5_cat": {"cat": 10, "sitting": 3, " sky": 1}, "3_dog": {"dog": 7, "sitting": 4}}
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": "8", "ss_tag_frequency": json.dumps(tags),
            "modelspec.title": "by hand", "modelspec.architecture": "stable-diffusion-v1/lora"}
    st_save(t, tmp_path / "k.safetensors", metadata=meta)
    report = inspect_file(tmp_path / "k.safetensors", top_tags=3)
    by = {m["name"]: m for m in report["modules"]}
    assert (by[base + "q"]["dim"], by[base + "q"]["alpha"], by[base + "q"]["scale"]) == (8, 4.0, 0.5)
    assert (by[base + "k"]["dim"], by[base + "k"]["alpha"]) == (4, 1.0)
    assert by[base + "q"]["block"] == "IN04"  # down_blocks.1.attentions.0 = input_blocks.4
    te = by["lora_te_text_model_encoder_layers_11_mlp_fc1"]
    assert (te["dim"], te["alpha"], te["block"], te["parameters"]) == (8, 8.0, "BASE", 8 * 768 + 3072 * 8)
    assert report["zero_tensors"] == [f"{base}k.lora_up.weight"] and report["untrained_modules"] == [base + "k"]
    assert report["non_finite_tensors"] == [f"{base}v.lora_down.weight"]
    assert report["metadata"]["tag_frequency_top"] == [["cat", 10], ["sitting", 7], ["dog", 7]] or \
        report["metadata"]["tag_frequency_top"] == [("cat", 10), ("sitting", 7), ("dog", 7)]
    assert report["metadata"]["modelspec"] == {k: v for k, v in meta.items() if k.startswith("modelspec.")}
    assert report["summary"]["blocks"] == ["BASE", "IN04"]


def test_peft_layout_file_written_by_diffusers(tmp_path):
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    unet, _ = tiny_model("sd1")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_v"], rank_pattern={"^mid_block.*to_q": 2},
                        alpha_pattern={"^up_blocks.1.*to_v": 1})
    u = inject_adapter_in_model(config, copy.deepcopy(unet))
    sd = get_peft_model_state_dict(u)
    StableDiffusionLoraLoaderMixin.save_lora_weights(str(tmp_path), unet_lora_layers=sd,
                                                     unet_lora_adapter_metadata=config.to_dict())
    path = tmp_path / "pytorch_lora_weights.safetensors"
    report = inspect_file(path)
    modules = [p for p, mod in unet.named_modules() if p.endswith((".to_q", ".to_v")) and isinstance(mod, nn.Linear)]
    assert report["layout"] == "diffusers/PEFT" and report["summary"]["modules"] == len(modules)
    by_path = {m["name"]: m for m in report["modules"]}
    for p in modules:
        m = by_path["lora_unet_" + p.replace(".", "_")]
        r = 2 if p.startswith("mid_block") and p.endswith("to_q") else 4
        a = 1.0 if p.startswith("up_blocks.1") and p.endswith("to_v") else 8.0
        assert (m["algo"], m["dim"], m["alpha"], m["block"]) == ("lora", r, a, sd_block(p))
    assert len(report["untrained_modules"]) == len(modules)  # PEFT's lora_B starts at zero


def test_checkpoint_and_bad_files_are_named(tmp_path, capsys):
    ckpt = tmp_path / "model.safetensors"
    st_save({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2),
             "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.zeros(2),
             "conditioner.embedders.1.model.ln_final.weight": torch.zeros(2)}, ckpt)
    with pytest.raises(InspectError,
                       match=r"model\.safetensors: is not an adapter file: it is a model checkpoint \(sdxl\)"):
        inspect_file(ckpt)
    assert main(["inspect", str(ckpt)]) == 1
    assert "model checkpoint (sdxl)" in capsys.readouterr().err
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    assert main(["inspect", str(tmp_path / "junk.safetensors")]) == 2
    assert "junk.safetensors" in capsys.readouterr().err
    # --json gives the same report as the function
    unet, tes = tiny_model("sd1")
    create_network(unet, tes, algo="lora", preset="attn-only", dim=2).save(tmp_path / "a.safetensors")
    assert main(["inspect", str(tmp_path / "a.safetensors"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(inspect_file(tmp_path / "a.safetensors")))
    assert main(["inspect", str(tmp_path / "a.safetensors")]) == 0
    text = capsys.readouterr().out
    n = len(st_load(tmp_path / "a.safetensors")) // 3
    assert f"algorithms: lora x{n}" in text
    assert "blocks:     BASE IN01 IN02 IN04 IN05 IN07 IN08 MID " + " ".join(f"OUT{k:02d}" for k in range(3, 12)) in text


def test_malformed_modules_are_reported_and_fail_the_check(tmp_path, capsys):
    """A module missing a factor, or with factors of different ranks, is what load_network, merge and resize
    refuse: inspect names each with its problem and exits 1 after the report; lorakit's own files have none."""
    g = torch.Generator().manual_seed(0)
    t = {"lora_unet_a.lora_down.weight": torch.randn(4, 32, generator=g),  # no lora_up
         "lora_unet_a.alpha": torch.tensor(1.0),
         "lora_unet_b.lora_down.weight": torch.randn(4, 32, generator=g),
         "lora_unet_b.lora_up.weight": torch.randn(32, 3, generator=g),  # rank 3 against 4
         "lora_unet_c.hada_w1_a": torch.randn(8, 2, generator=g), "lora_unet_c.hada_w1_b": torch.randn(2, 8, generator=g),
         "lora_unet_c.hada_w2_a": torch.randn(8, 2, generator=g),  # no hada_w2_b
         "lora_unet_d.lora_down.weight": torch.randn(4, 32, generator=g),
         "lora_unet_d.lora_up.weight": torch.randn(32, 4, generator=g)}
    st_save(t, tmp_path / "bad.safetensors")
    report = inspect_file(tmp_path / "bad.safetensors")
    assert report["malformed_modules"] == {
        "lora_unet_a": "no lora_up.weight",
        "lora_unet_b": "lora_up.weight (32, 3) and lora_down.weight (4, 32) have different ranks (3, 4)",
        "lora_unet_c": "no hada_w2_b"}
    assert main(["inspect", str(tmp_path / "bad.safetensors")]) == 1
    out, err = capsys.readouterr()
    assert "malformed:  3 module(s): lora_unet_a: no lora_up.weight" in out and "3 malformed module(s)" in err
    unet, tes = tiny_model("sd1")
    for algo, opts in (("lora", {"use_tucker": True, "conv_dim": 2}), ("loha", {"use_tucker": True}),
                       ("lokr", {"decompose_both": True, "factor": 4}), ("glora", {})):
        create_network(unet, tes, algo=algo, preset="full", dim=2, **opts).save(tmp_path / "ok.safetensors")
        assert inspect_file(tmp_path / "ok.safetensors")["malformed_modules"] == {}, algo


def test_tensors_no_loader_reads_are_malformed(tmp_path, capsys):
    """A module whose tensors no algorithm has, or with a tensor its algorithm does not have, is refused by
    load_network and merge ("no adapter algorithm has the tensors", "Unexpected key(s)"): inspect says so and
    exits 1, as for a missing factor. LyCORIS 2.0's Diag-OFT rotations (oft_diag) are what load_network reads
    them as: Diag-OFT when they are rotations, refused when they are not."""
    unet, tes = tiny_model("sd1")
    g = torch.Generator().manual_seed(0)
    path = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    name = "lora_unet_" + path.replace(".", "_")
    q = torch.randn(4, 4, 4, generator=g) * 0.1
    rotations = torch.linalg.matrix_exp(q - q.mT)
    t = {f"{name}.lora_down.weight": torch.randn(4, 16, generator=g),
         f"{name}.lora_up.weight": torch.randn(16, 4, generator=g), f"{name}.scale_weight": torch.ones(16),
         "lora_unet_mid_block_attentions_0_proj_in.hada_x": torch.randn(4, 8, generator=g),
         "lora_unet_down_blocks_0_attentions_0_proj_in.oft_diag": rotations,
         "lora_unet_down_blocks_0_attentions_0_proj_out.oft_diag": torch.randn(4, 4, 4, generator=g)}
    st_save(t, tmp_path / "odd.safetensors")
    report = inspect_file(tmp_path / "odd.safetensors")
    malformed = report["malformed_modules"]
    assert malformed.pop(name) == "tensor(s) ['scale_weight'] that lora does not have"
    assert malformed.pop("lora_unet_mid_block_attentions_0_proj_in") == "no adapter algorithm has the tensors ['hada_x']"
    assert "old LyCORIS Diag-OFT" in malformed.pop("lora_unet_down_blocks_0_attentions_0_proj_out")
    assert malformed == {}
    legacy = next(m for m in report["modules"] if m["name"] == "lora_unet_down_blocks_0_attentions_0_proj_in")
    assert (legacy["algo"], legacy["dim"]) == ("diag-oft", 4)
    assert main(["inspect", str(tmp_path / "odd.safetensors")]) == 1
    assert "3 malformed module(s)" in capsys.readouterr().err
    with pytest.raises(ValueError, match="scale_weight"):
        load_network(unet, {k: v for k, v in t.items() if k.startswith(name)}, tes)
    load_network(unet, {k: v for k, v in t.items() if "attentions_0_proj_in" in k and "down" in k}, tes)
    for algo, opts in (("ia3", {}), ("diag-oft", {"dim": 4, "rescaled": True}), ("boft", {"dim": 4}),
                       ("full", {}), ("dylora", {"dim": 4}), ("lora", {"dora_wd": True})):
        create_network(unet, tes, algo=algo, preset="attn-only", **opts).save(tmp_path / "ok.safetensors")
        assert inspect_file(tmp_path / "ok.safetensors")["malformed_modules"] == {}, algo


def test_oft_modules_report_their_block_size_and_no_scale(tmp_path):
    """A Diag-OFT module's dim is its block size, and it has no scale alpha / dim (OFT rotates the weight): the
    report gives no scale for it (test_kohya_style_file_by_hand: a LoRA module's is alpha / dim)."""
    unet, tes = tiny_model("sd1")
    path = tmp_path / "o.safetensors"
    randomize(create_network(unet, tes, algo="diag-oft", preset="attn-mlp", dim=4), 0.05).save(path)
    report = inspect_file(path)
    subs = groups(st_load(path))
    assert report["modules"] and set(subs) == {m["name"] for m in report["modules"]}
    for m in report["modules"]:
        assert (m["algo"], m["dim"], m["scale"]) == ("diag-oft", subs[m["name"]]["oft_blocks"].shape[-1], None)
