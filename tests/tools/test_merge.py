"""lorakit merge: adapters merged into a checkpoint compute what the model running them computes; LoRAs
concatenated into one carry exactly the weighted sum of their changes; bad input is refused by name.

References: the model with the loaded networks applied (bypass forward, stacked in file order) in float64, and
dense LoRA changes computed here from the saved tensors (up @ down * alpha / rank, as the UIs compute them)."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re

import pytest
import torch

from lorakit import create_network, load_network
from lorakit.cli import main
from lorakit.formats import load_file
from lorakit.network.blocks import KOHYA_SD25, LBW17, kohya_block_index
from lorakit.tools.merge import merge_into_model, save_model

demo = pytest.importorskip("lorakit.models.demo")


# ----------------------------------------------------------------------------------------------- helpers
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/tools/conftest.py


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """kind -> (float32 model, its checkpoint file)."""
    from lorakit.models.save import save_checkpoint

    folder = tmp_path_factory.mktemp("models")
    out = {}
    for kind, name in (("sd1", "tiny-sd"), ("sdxl", "tiny-sdxl")):
        model = demo.random_model(name, seed=0)
        path = folder / f"{name}.safetensors"
        save_checkpoint(model, path, dtype=torch.float32)
        out[kind] = (model, str(path))
    return out


def clone(model, dtype=torch.float64):
    """A copy of the U-Net and text encoders in `dtype` (the VAE is shared: merging never touches it)."""
    return dataclasses.replace(model, unet=copy.deepcopy(model.unet).to(dtype),
                               text_encoders=[copy.deepcopy(e).to(dtype) for e in model.text_encoders])


def outputs(model) -> list[torch.Tensor]:
    """U-Net noise prediction and every text encoder's hidden states on fixed inputs."""
    g = torch.Generator().manual_seed(0)
    dtype = next(model.unet.parameters()).dtype
    unet = model.unet
    x = torch.randn(1, 4, 8, 8, generator=g).to(dtype)
    cond = torch.randn(1, 6, unet.config.cross_attention_dim, generator=g).to(dtype)
    kwargs = {}
    if model.kind == "sdxl":
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(1, 32, generator=g).to(dtype),
                                       "time_ids": torch.randn(1, 6, generator=g).to(dtype)}
    ids = torch.randint(0, 1000, (1, 6), generator=g)
    with torch.no_grad():
        return [unet(x, torch.tensor([10]), cond, **kwargs).sample,
                *[e(ids).last_hidden_state for e in model.text_encoders]]


def adapter_file(model, path, algo, seed, **options):
    """Save a network of `algo` on `model` whose parameters are random (so its change is not zero)."""
    options.setdefault("dim", 4)
    net = create_network(model.unet, model.text_encoders, algo=algo, **options)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if not name.endswith(("dora_scale", "rescale")):
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    net.save(path)
    return str(path)


def runtime_outputs(model, files, ratios, block_weights=None):
    """The model with every file's network applied (stacked in order) at its ratio and block weights."""
    nets = []
    for i, (f, r) in enumerate(zip(files, ratios)):
        net = load_network(model.unet, f, model.text_encoders, multiplier=r, dtype=torch.float64)
        if block_weights is not None and block_weights[i] is not None:
            net.set_block_multipliers(block_weights[i])
        nets.append(net.apply())
    try:
        return outputs(model)
    finally:
        for net in reversed(nets):
            net.restore()


def assert_same(got, want, base=None):
    for i, (a, b) in enumerate(zip(got, want)):
        assert (a - b).abs().max().item() < 1e-10 * max(1.0, b.abs().max().item()), f"output {i}"
    if base is not None:  # the adapters changed every output (the check above is not vacuous)
        for i, (a, b) in enumerate(zip(got, base)):
            assert (a - b).abs().max().item() > 1e-4, f"output {i} did not change"


# (algo, options) per model; 32/48/256-channel layers: BOFT's power-of-two block counts need 32-channel layers
SD_ALGOS = [
    ("lora", dict(preset="attn-mlp", dora_wd=True)),  # DoRA first: it sees the weight merged so far
    ("locon", dict(preset="full", conv_dim=2, conv_alpha=1, alpha=2)),
    ("locon", dict(preset="unet-convblock-only", use_tucker=True, conv_dim=3)),
    ("loha", dict(preset="full")),
    ("lokr", dict(preset="full", factor=4)),
    ("ia3", dict(preset="ia3")),
    ("diag-oft", dict(preset="full")),
    ("boft", dict(preset={"unet_target_name": ["down_blocks.0", "up_blocks.3"],
                          "text_encoder_target_module": ["CLIPAttention"]}, dim=16)),
    ("full", dict(preset="attn-only")),
    ("glora", dict(preset="attn-mlp")),
]
SDXL_ALGOS = [
    ("locon", dict(preset="full", conv_dim=2)),
    ("lokr", dict(preset="attn-mlp")),
    ("ia3", dict(preset="ia3")),
    ("diag-oft", dict(preset="attn-mlp")),
    ("boft", dict(preset={"unet_target_name": ["down_blocks.0", "up_blocks.2"],
                          "text_encoder_target_module": ["CLIPAttention"]}, dim=16)),
    ("full", dict(preset="attn-only")),
    ("lora", dict(preset="attn-only", train_norm=True)),  # with norm adapters on the LayerNorms/GroupNorms
]


# ------------------------------------------------------------------------------- merged == running the adapters
@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_every_algorithm_merged_equals_the_adapters_running(models, tmp_path, kind):
    model, _ = models[kind]
    algos = SD_ALGOS if kind == "sd1" else SDXL_ALGOS
    files = [adapter_file(model, tmp_path / f"{i}_{a}.safetensors", a, seed=i, **o) for i, (a, o) in enumerate(algos)]
    ratios = [0.7, -0.5, 1.3, 0.4, 0.8, 1.0, 0.6, 0.9, -0.3, 0.5][: len(files)]
    base = clone(model)
    merged = merge_into_model(clone(model), files, ratios, progress=False)
    assert_same(outputs(merged), runtime_outputs(base, files, ratios), base=outputs(base))


def test_block_weights_equal_block_multipliers(models, tmp_path):
    """kohya's 25 values for one file and LoRA Block Weight's 17 (BASE = text encoders) for another."""
    model, _ = models["sd1"]
    files = [adapter_file(model, tmp_path / "a.safetensors", "locon", 1, preset="full", conv_dim=2),
             adapter_file(model, tmp_path / "b.safetensors", "loha", 2, preset="attn-mlp")]
    g = torch.Generator().manual_seed(3)
    v25 = torch.rand(len(KOHYA_SD25), generator=g).tolist()
    v17 = ",".join(f"{v:.3f}" for v in torch.rand(len(LBW17), generator=g).tolist())
    block_weights = [v25, v17]
    base = clone(model)
    merged = merge_into_model(clone(model), files, [0.8, 1.2], block_weights=block_weights, progress=False)
    got = outputs(merged)
    assert_same(got, runtime_outputs(base, files, [0.8, 1.2], [v25, [float(v) for v in v17.split(",")]]))
    plain = runtime_outputs(base, files, [0.8, 1.2])
    assert all((a - b).abs().max() > 1e-4 for a, b in zip(got, plain))  # the weights did act, U-Net and TE


def test_sdxl_block_weights_by_name_and_20_values(models, tmp_path):
    model, _ = models["sdxl"]
    files = [adapter_file(model, tmp_path / "a.safetensors", "lora", 1, preset="attn-mlp")]
    v20 = [0.0] + [0.5] * 9 + [2.0] + [1.5] * 9
    base = clone(model)
    merged = merge_into_model(clone(model), files, [0.9], block_weights=[json.dumps(v20)], progress=False)
    assert_same(outputs(merged), runtime_outputs(base, files, [0.9], [v20]))
    assert torch.equal(outputs(merged)[1], outputs(base)[1])  # BASE = 0: the text encoders are untouched
    merged = merge_into_model(clone(model), files, [0.9], block_weights="BASE=0,IN04=0.5,MID=2", progress=False)
    assert_same(outputs(merged), runtime_outputs(base, files, [0.9], [{"BASE": 0, "IN04": 0.5, "MID": 2}]))


# ------------------------------------------------------------------------------------------------ CLI and files
def test_cli_saves_single_file_and_diffusers_folder_that_reload(models, tmp_path, capsys):
    from lorakit.models.load import load_model

    model, ckpt = models["sd1"]
    files = [adapter_file(model, tmp_path / "a.safetensors", "lora", 1, preset="attn-mlp"),
             adapter_file(model, tmp_path / "b.safetensors", "lokr", 2, preset="unet-convblock-only", factor=4)]
    expected = merge_into_model(clone(model, torch.float32), files, [0.8, 0.5], progress=False)
    want = {k: v.to(torch.float16) for k, v in expected.unet.state_dict().items()}

    out = tmp_path / "merged.safetensors"  # kohya's option names
    assert main(["merge", "--sd_model", ckpt, "--models", *files, "--ratios", "0.8", "0.5", "--save_to", str(out),
                 "--save_precision", "fp16", "--quiet", "--concat"]) == 0  # kohya ignores --concat here too
    reloaded = load_model(out, dtype=None)
    state = reloaded.unet.state_dict()
    assert all(state[k].dtype == torch.float16 and torch.equal(state[k], v) for k, v in want.items())
    te = reloaded.text_encoders[0].state_dict()
    assert all(torch.equal(te[k], v.to(torch.float16)) for k, v in expected.text_encoders[0].state_dict().items())

    printed = capsys.readouterr()
    assert "saved checkpoint" in printed.out and "--concat/--shuffle" in printed.err and "ignored" in printed.err

    folder = tmp_path / "merged_diffusers"  # what the CLI calls for a --save_to without a checkpoint suffix
    assert save_model(expected, folder, "bf16") == "diffusers"
    reloaded = load_model(folder, dtype=None)
    for got, want in ((reloaded.unet, expected.unet), (reloaded.text_encoders[0], expected.text_encoders[0])):
        state = got.state_dict()
        assert all(state[k].dtype == torch.bfloat16 and torch.equal(state[k], v.to(torch.bfloat16))
                   for k, v in want.state_dict().items())


# ------------------------------------------------------------------------------------------------ LoRA + LoRA
def dense(sd: dict, name: str) -> torch.Tensor:
    """A LoRA module's change as the UIs compute it: up @ (mid) @ down * alpha / rank."""
    down, up = sd[f"{name}.lora_down.weight"].double(), sd[f"{name}.lora_up.weight"].double()
    rank = down.shape[0]
    scale = float(sd.get(f"{name}.alpha", rank)) / rank
    if f"{name}.lora_mid.weight" in sd:
        mid = sd[f"{name}.lora_mid.weight"].double()
        return torch.einsum("or,rs...,si->oi...", up.flatten(1), mid, down.flatten(1)) * scale
    return (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:]) * scale


def module_names(sd: dict) -> set[str]:
    return {k.split(".")[0] for k in sd}


def test_concat_is_the_weighted_sum_of_changes(models, tmp_path):
    """Different ranks and alphas, LoCon 3x3 convs, modules in only one file, a negative ratio, block weights."""
    model, _ = models["sd1"]
    a = adapter_file(model, tmp_path / "a.safetensors", "lora", 1, preset="attn-mlp", dim=4, alpha=2)
    b = adapter_file(model, tmp_path / "b.safetensors", "locon", 2, preset="full", dim=8, alpha=16, conv_dim=2,
                     conv_alpha=1)
    out = tmp_path / "ab.safetensors"
    v25 = [0.5 + 0.1 * i for i in range(25)]
    assert main(["merge", "--loras", a, b, "--ratios", "0.8", "-0.5", "--block_weights", ",".join(map(str, v25)),
                 "none", "--save_to", str(out), "--shuffle", "--quiet"]) == 0
    sa, sb = load_file(a)[0], load_file(b)[0]
    merged, metadata = load_file(out)
    assert module_names(merged) == module_names(sa) | module_names(sb)
    for name in module_names(merged):
        block = kohya_block_index(name)  # sd-scripts' own block numbering of the name, -1 outside the blocks
        want = torch.zeros(())
        if name in module_names(sa):
            want = want + 0.8 * (v25[block] if block >= 0 else 1.0) * dense(sa, name)
        if name in module_names(sb):
            want = want - 0.5 * dense(sb, name)
        got = dense(merged, name)
        assert torch.allclose(got, want, rtol=0, atol=1e-6 * max(1.0, want.abs().max().item())), name
    assert metadata["ss_network_module"] == "networks.lora" and metadata["ss_network_dim"] == "Dynamic"
    assert "modelspec.merged_from" in metadata and "sshs_model_hash" in metadata
    load_network(model.unet, str(out), model.text_encoders)  # loads as a plain LoRA


def small_scale_lora(path, seed, dtype=torch.float16, rank=128, alpha=1.0, up_std=3e-4):
    """A LoRA with a small alpha / rank and small lora_up values, as trained ranks 128 at alpha 1 hold."""
    from lorakit.formats import save_file

    g = torch.Generator().manual_seed(seed)
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    save_file({f"{name}.lora_down.weight": 0.03 * torch.randn(rank, 96, generator=g),
               f"{name}.lora_up.weight": up_std * torch.randn(64, rank, generator=g),
               f"{name}.alpha": torch.tensor(alpha)}, path, dtype=dtype)
    return str(path), name


def test_concat_keeps_the_shared_scale_in_alpha(tmp_path):
    """fp16 files of rank 128 at alpha 1: the scale stays in alpha (alpha / rank as every loader reads it), so
    the file with the smallest ratio x alpha / rank keeps its factors bit for bit and the others are scaled up,
    never into fp16's subnormals. Folding sqrt(0.8 / 128) into the factors gave 8e-4 of the change saved in fp16
    (2.4e-3 with smaller factors); fp16 rounding is 3e-4."""
    (a, name), (b, _) = small_scale_lora(tmp_path / "a.safetensors", 1), small_scale_lora(tmp_path / "b.safetensors", 2)
    out = tmp_path / "ab.safetensors"
    assert main(["merge", "--loras", a, b, "--ratios", "0.8", "0.5", "--save_to", str(out), "--quiet",
                 "--save_precision", "fp16"]) == 0
    sa, sb, (merged, metadata) = load_file(a)[0], load_file(b)[0], load_file(out)
    want = 0.8 * dense(sa, name) + 0.5 * dense(sb, name)
    assert float((dense(merged, name) - want).norm() / want.norm()) < 4e-4
    assert float(merged[f"{name}.alpha"]) == 0.5 / 128 * 256 and metadata["ss_network_alpha"] == "1.0"
    assert torch.equal(merged[f"{name}.lora_down.weight"][128:], sb[f"{name}.lora_down.weight"])
    assert torch.equal(merged[f"{name}.lora_up.weight"][:, 128:], sb[f"{name}.lora_up.weight"])


def test_concat_scales_the_factors_by_the_alpha_as_saved(tmp_path):
    """An alpha the save dtype cannot hold (0.3 / 3 x 7 = 0.7 in bf16) is rounded first and the factors carry
    the rest, so the saved file applies the weighted sum exactly."""
    from lorakit.tools.concat import concat_loras

    (a, name), (b, _) = (small_scale_lora(tmp_path / f"{n}.safetensors", seed, torch.float32, rank, 1.0, 0.1)
                         for n, seed, rank in (("a", 1, 3), ("b", 2, 4)))
    tensors, _, _ = concat_loras([a, b], [0.3, 1.0], progress=False, save_dtype=torch.bfloat16)
    assert tensors[f"{name}.alpha"].dtype == torch.bfloat16 and float(tensors[f"{name}.alpha"]) != 0.7
    want = 0.3 * dense(load_file(a)[0], name) + dense(load_file(b)[0], name)
    assert torch.allclose(dense(tensors, name), want, rtol=0, atol=1e-6 * want.abs().max().item())


def test_17_zeros_turn_a_locon_off_except_outside_the_blocks(models, tmp_path):
    """LoRA Block Weight's 17 values leave out IN00, IN03, IN06, IN09-IN11 and OUT00-OUT02 (resnets, samplers,
    conv_in), which its to26() sets to 0; the time embedding and conv_out are in none of its blocks (weight 1).
    Into a model and concatenated alike."""
    model, ckpt = models["sd1"]
    lora = adapter_file(model, tmp_path / "locon.safetensors", "locon", 3, preset="full", conv_dim=2)
    zeros = ",".join(["0"] * 17)
    kept = {"lora_unet_time_embedding_linear_1", "lora_unet_time_embedding_linear_2", "lora_unet_conv_out"}
    out = tmp_path / "off.safetensors"
    assert main(["merge", "--loras", lora, "--block_weights", zeros, "--save_to", str(out), "--quiet"]) == 0
    assert module_names(load_file(out)[0]) == kept
    merged = merge_into_model(clone(model), [lora], [1.0], block_weights=zeros, progress=False)
    base = clone(model)
    changed = {n for (n, p), (_, q) in zip(merged.unet.named_parameters(), base.unet.named_parameters())
               if not torch.equal(p, q)}
    assert changed == {"time_embedding.linear_1.weight", "time_embedding.linear_2.weight", "conv_out.weight"}
    for a, b in zip(merged.text_encoders[0].parameters(), base.text_encoders[0].parameters()):
        assert torch.equal(a, b)


def test_lbws_with_17_or_12_values_notes_the_modules_it_turns_off(models, tmp_path, capsys):
    """kohya's svd_merge_lora.py/sdxl_merge_lora.py keep the blocks a 17/12-value --lbws leaves out at 1; lorakit
    follows LoRA Block Weight (0 there), as at run time: spelled --lbws, a note counts the modules that get 0.
    Not with --block_weights, nor when no module lies there."""
    model, _ = models["sd1"]
    locon = adapter_file(model, tmp_path / "locon.safetensors", "locon", 3, preset="full", conv_dim=2)
    attn = adapter_file(model, tmp_path / "attn.safetensors", "lora", 4, preset="attn-mlp")
    ones = json.dumps([1] * 17)
    # IN00 (conv_in), IN03/IN06/IN09 (downsamplers), IN09-IN11 (down_blocks.3), OUT00-OUT02 (up_blocks.0)
    unlisted = re.compile(r"^lora_unet_(conv_in|down_blocks_\d_downsamplers|down_blocks_3_|up_blocks_0_)")
    in_unlisted = {n for n in module_names(load_file(locon)[0]) if unlisted.match(n)}
    assert "lora_unet_conv_in" in in_unlisted and len(in_unlisted) > 10
    out = tmp_path / "m.safetensors"
    assert main(["merge", "--loras", locon, attn, "--lbws", ones, "--new_rank", "4", "--save_to", str(out),
                 "--quiet"]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "note:" in line]
    assert len(notes) == 1 and f"{len(in_unlisted)} module(s) of locon.safetensors lie there" in notes[0]
    assert "attn.safetensors" not in notes[0] and "IN00" in notes[0] and "svd_merge_lora.py keeps them at 1" in notes[0]
    assert module_names(load_file(out)[0]).isdisjoint(in_unlisted)  # the documented rule still applies
    for option in ("--block_weights", "--lbws"):
        files = [locon] if option == "--block_weights" else [attn]
        assert main(["merge", "--loras", *files, option, ones, "--save_to", str(tmp_path / f"{option}.safetensors"),
                     "--quiet"]) == 0
        assert "note:" not in capsys.readouterr().err
    xl, _ = models["sdxl"]
    xl_locon = adapter_file(xl, tmp_path / "xl.safetensors", "locon", 5, preset="full", conv_dim=2)
    assert main(["merge", "--loras", xl_locon, "--lbws", json.dumps([1] * 12), "--save_to",
                 str(tmp_path / "xl_m.safetensors"), "--quiet"]) == 0
    note = capsys.readouterr().err
    assert "--lbws with 12 values" in note and "module(s) of xl.safetensors" in note and "20-value vector" in note


def test_sdxl_20_values_keep_the_embeddings_at_1_and_note_kohyas_in00(models, tmp_path, capsys):
    """kohya's svd_merge_lora.py/sdxl_merge_lora.py (get_lbw_block_index(name, is_sdxl=True)) give time_embed_ and
    label_emb_ modules IN00's value; the LoRA Block Weight extension's blocks (input/middle/output blocks, text
    encoders) hold neither, and lorakit keeps them at 1, at run time as in a merge: --lbws notes them."""
    from lorakit.tools.concat import kohya_embedding_modules

    xl, _ = models["sdxl"]
    locon = adapter_file(xl, tmp_path / "xl.safetensors", "locon", 5, preset="full", conv_dim=2)
    source = load_file(locon)[0]
    embeddings = {n for n in module_names(source) if n.startswith(("lora_unet_time_embed_", "lora_unet_label_emb_"))}
    assert embeddings == {"lora_unet_time_embed_0", "lora_unet_time_embed_2"}  # full adapts the time embedding
    v20 = [0.5] + [0.13] + [0.7] * 18  # IN00 = 0.13
    assert kohya_embedding_modules(module_names(source), v20, "sdxl") == dict.fromkeys(embeddings, 0.13)
    assert kohya_embedding_modules(module_names(source), [1.0] + [1.0] + [0.7] * 18, "sdxl") == {}  # IN00 = 1
    # kohya matches SGM names only: diffusers' time_embedding gets its -1 (weight 1); conv_in is IN00 for both
    assert kohya_embedding_modules({"lora_unet_label_emb_0_0", "lora_unet_time_embedding_linear_1",
                                    "lora_unet_input_blocks_0_0"}, v20, "sdxl") == {"lora_unet_label_emb_0_0": 0.13}
    out = tmp_path / "m.safetensors"
    assert main(["merge", "--loras", locon, "--lbws", json.dumps(v20), "--save_to", str(out), "--quiet"]) == 0
    note = [line for line in capsys.readouterr().err.splitlines() if "time_embed" in line]
    assert len(note) == 1 and "2 module(s) of xl.safetensors" in note[0] and "IN00's value" in note[0]
    merged = load_file(out)[0]
    for name in embeddings:
        assert torch.allclose(dense(merged, name), dense(source, name), rtol=0, atol=1e-6), name  # weight 1
    assert torch.allclose(dense(merged, "lora_unet_input_blocks_0_0"), 0.13 * dense(source, "lora_unet_input_blocks_0_0"),
                          rtol=0, atol=1e-6)  # conv_in is IN00 itself


@pytest.mark.parametrize("svd", [False, True], ids=["concat", "new_rank"])
def test_linear_and_conv_shaped_loras_of_one_1x1_conv_merge(models, tmp_path, svd):
    """SD1's proj_in is a 1x1 conv; an SD2-style file changes it with Linear-shaped (2-D) factors, which the loaders
    reshape (ComfyUI's reshape). Merged with a 4-D file of the same layer, both parts sum into one module written
    4-D, which lorakit and kohya's merge_lora.py (it squeezes 4-D factors on a Linear) both apply."""
    from lorakit.formats import save_file

    model, _ = models["sd1"]
    name, path = "lora_unet_down_blocks_0_attentions_0_proj_in", "down_blocks.0.attentions.0.proj_in"
    out_dim, in_dim = model.unet.get_submodule(path).weight.shape[:2]
    g = torch.Generator().manual_seed(0)
    conv = {f"{name}.lora_down.weight": torch.randn(2, in_dim, 1, 1, generator=g),
            f"{name}.lora_up.weight": torch.randn(out_dim, 2, 1, 1, generator=g), f"{name}.alpha": torch.tensor(1.0)}
    flat = {f"{name}.lora_down.weight": torch.randn(3, in_dim, generator=g),
            f"{name}.lora_up.weight": torch.randn(out_dim, 3, generator=g), f"{name}.alpha": torch.tensor(6.0)}
    files = [tmp_path / "flat.safetensors", tmp_path / "conv.safetensors"]
    save_file(flat, files[0])
    save_file(conv, files[1])
    out = tmp_path / "m.safetensors"
    extra = ["--new_rank", "8"] if svd else []
    assert main(["merge", "--loras", *map(str, files), "--ratios", "0.5", "-1", "--save_to", str(out), "--quiet",
                 *extra]) == 0
    merged = load_file(out)[0]
    assert merged[f"{name}.lora_down.weight"].dim() == 4 and merged[f"{name}.lora_up.weight"].dim() == 4
    want = 0.5 * dense(flat, name).reshape(out_dim, in_dim, 1, 1) - dense(conv, name)
    assert torch.allclose(dense(merged, name), want, rtol=0, atol=1e-5 * want.abs().max().item())
    base = clone(model)
    net = load_network(base.unet, str(out), base.text_encoders, dtype=torch.float64)
    net.merge()
    change = base.unet.get_submodule(path).weight - clone(model).unet.get_submodule(path).weight
    assert torch.allclose(change, want, rtol=0, atol=1e-5 * want.abs().max().item())


def test_concat_tucker_files_uses_a_block_diagonal_mid(models, tmp_path):
    model, _ = models["sdxl"]
    opts = dict(preset="unet-convblock-only", use_tucker=True)
    a = adapter_file(model, tmp_path / "a.safetensors", "locon", 1, conv_dim=2, conv_alpha=1, **opts)
    b = adapter_file(model, tmp_path / "b.safetensors", "locon", 2, conv_dim=3, conv_alpha=6, **opts)
    out = tmp_path / "ab.safetensors"
    assert main(["merge", "--loras", a, b, "--ratios", "1.5", "0.25", "--save_to", str(out), "--quiet"]) == 0
    sa, sb, merged = load_file(a)[0], load_file(b)[0], load_file(out)[0]
    assert any(k.endswith("lora_mid.weight") and v.shape[0] == 5 for k, v in merged.items())
    for name in module_names(merged):
        want = 1.5 * dense(sa, name) + 0.25 * dense(sb, name)
        assert torch.allclose(dense(merged, name), want, rtol=0, atol=1e-6 * want.abs().max().item()), name


def test_new_rank_calls_the_svd_merge(models, tmp_path):
    pytest.importorskip("lorakit.tools.merge_svd")
    model, _ = models["sd1"]
    a = adapter_file(model, tmp_path / "a.safetensors", "lora", 1, preset="attn-mlp")
    b = adapter_file(model, tmp_path / "b.safetensors", "locon", 2, preset="full", dim=8, conv_dim=2)
    out = tmp_path / "ab.safetensors"
    assert main(["merge", "--loras", a, b, "--ratios", "1", "0.5", "--new_rank", "4", "--save_to", str(out),
                 "--quiet"]) == 0
    merged = load_file(out)[0]
    assert all(v.shape[0] <= 4 for k, v in merged.items() if k.endswith("lora_down.weight"))
    load_network(model.unet, str(out), model.text_encoders)


def test_new_rank_takes_block_weights(models, tmp_path):
    """kohya's svd_merge_lora.py multiplies each module's part by its --lbws weight before the SVD; at a rank that
    holds the whole sum the result is the sum weighted as set_block_multipliers weighs the modules at run time."""
    model, _ = models["sd1"]
    a = adapter_file(model, tmp_path / "a.safetensors", "lora", 1, preset="attn-mlp", dim=4, alpha=2)
    b = adapter_file(model, tmp_path / "b.safetensors", "locon", 2, preset="full", dim=4, alpha=8, conv_dim=2)
    v17 = [0.25 * (i % 5) for i in range(17)]
    v26 = [0.0] + [0.5 + 0.05 * i for i in range(25)]  # BASE 0 in both vectors: no text-encoder module
    out = tmp_path / "ab.safetensors"
    assert main(["merge", "--loras", a, b, "--ratios", "0.7", "-0.4", "--lbws", json.dumps(v17), json.dumps(v26),
                 "--new_rank", "8", "--save_to", str(out), "--quiet"]) == 0
    merged = load_file(out)[0]
    want = {}
    for file, ratio, vector in ((a, 0.7, v17), (b, -0.4, v26)):
        net = load_network(model.unet, file, model.text_encoders)
        net.set_block_multipliers(vector)
        tensors = load_file(file)[0]
        for name, adapter in net.adapters():
            if adapter.multiplier != 0:
                want[name] = want.get(name, 0) + ratio * adapter.multiplier * dense(tensors, name)
    assert module_names(merged) == set(want)  # a module weighted 0 in every file is left out
    assert not any(n.startswith("lora_te") for n in want) and any(n.startswith("lora_unet") for n in want)
    for name, change in want.items():
        got = dense(merged, name).reshape(change.shape)
        assert torch.allclose(got, change, rtol=0, atol=1e-5 * max(1.0, change.abs().max().item())), name
    assert json.loads(load_file(out)[1]["lorakit_merge_svd"])["block_weights"] == [v17, v26]


# ------------------------------------------------------------------------------------------------ bad input
def run_error(capsys, *argv) -> str:
    assert main(["merge", *argv, "--quiet"]) == 1
    return capsys.readouterr().err


@pytest.mark.parametrize("algo,options", [("loha", dict(preset="attn-mlp")), ("lokr", dict(preset="attn-mlp")),
                                          ("full", dict(preset="attn-only"))])
def test_a_refused_concatenation_suggests_only_merges_that_take_the_file(models, tmp_path, capsys, algo, options):
    """Each merge the message names runs on the same files: --model takes every algorithm, --new_rank (the SVD
    merge) LoRA/LoCon and full modules only."""
    model, ckpt = models["sd1"]
    files = [adapter_file(model, tmp_path / "lora.safetensors", "lora", 1, preset="attn-mlp"),
             adapter_file(model, tmp_path / f"{algo}.safetensors", algo, 2, **options)]
    err = run_error(capsys, "--loras", *files, "--save_to", str(tmp_path / "out.safetensors"))
    merges = {"--model": ["--model", ckpt], "--new_rank": ["--new_rank", "4"]}
    named = [option for option in merges if option in err]
    assert named == (["--model", "--new_rank"] if algo == "full" else ["--model"]), err
    for option in named:
        assert main(["merge", "--loras", *files, *merges[option], "--save_to",
                     str(tmp_path / f"{option[2:]}.safetensors"), "--quiet"]) == 0


def test_bad_input_is_refused_by_name_and_writes_nothing(models, tmp_path, capsys):
    sd_model, sd_ckpt = models["sd1"]
    xl_model, _ = models["sdxl"]
    lora = adapter_file(sd_model, tmp_path / "lora.safetensors", "lora", 1, preset="attn-mlp")
    tucker = adapter_file(sd_model, tmp_path / "tucker.safetensors", "locon", 1, preset="unet-convblock-only",
                          use_tucker=True)
    loha = adapter_file(sd_model, tmp_path / "loha.safetensors", "loha", 1, preset="attn-mlp")
    xl = adapter_file(xl_model, tmp_path / "xl.safetensors", "lora", 1, preset="attn-mlp")
    out = str(tmp_path / "out.safetensors")
    before = set(os.listdir(tmp_path))

    err = run_error(capsys, "--model", sd_ckpt, "--loras", lora, loha, "--ratios", "0.5", "--save_to", out)
    assert "2 adapter file(s)" in err and "1 ratio(s)" in err
    err = run_error(capsys, "--model", sd_ckpt, "--loras", lora, "--block_weights", "1,1,1", "--save_to", out)
    assert "3 values" in err and "25 (kohya_sd25)" in err and "12 (lbw12)" in err
    with pytest.raises(ValueError, match=r"20 values match no block layout of a sd1 model; a sd1 model takes "
                                         r"17 \(lbw17\), 25 \(kohya_sd25\), 26 \(lbw26\)"):
        merge_into_model(clone(sd_model), [lora], [1.0], block_weights=[[1.0] * 20], progress=False)
    err = run_error(capsys, "--model", sd_ckpt, "--loras", lora, sd_ckpt, "--save_to", out)
    assert f"{sd_ckpt}: is a model checkpoint" in err
    err = run_error(capsys, "--model", lora, "--loras", lora, "--save_to", out)
    assert f"{lora}:" in err and "adapter" in err and "not a model" in err
    err = run_error(capsys, "--model", sd_ckpt, "--loras", lora, xl, "--save_to", out)
    assert f"{xl}: is an adapter for SDXL models, but the model is sd1" in err
    err = run_error(capsys, "--loras", lora, loha, "--save_to", out)
    assert f"{loha}: module" in err and "is loha" in err and "--model" in err and "lorakit extract BASE MERGED" in err
    conv = adapter_file(sd_model, tmp_path / "conv.safetensors", "locon", 2, preset="unet-convblock-only")
    err = run_error(capsys, "--loras", tucker, conv, "--save_to", out)
    assert "Tucker (lora_mid) in" in err and "cannot be concatenated" in err
    err = run_error(capsys, "--loras", lora, xl, "--save_to", out)
    assert "different model architectures" in err
    err = run_error(capsys, "--loras", lora, "--save_to", str(tmp_path / "folder"))
    assert "(.ckpt/.pt/.pth/.bin); expected such a file name" in err
    assert set(os.listdir(tmp_path)) == before | {"conv.safetensors"}  # no output, no temporary left behind


def test_concat_reads_a_missing_alpha_as_the_rank_and_precision_is_the_default_save_dtype(tmp_path):
    """A LoRA without alpha tensors has scale 1 (alpha = rank, as every loader reads it); without
    --save_precision the merged file is written in --precision."""
    from lorakit.formats import save_file
    from lorakit.tools.merge import merge_loras

    (a, name), (b, _) = (small_scale_lora(tmp_path / f"{n}.safetensors", seed, torch.float32, rank, alpha, 0.1)
                         for n, seed, rank, alpha in (("a", 1, 3, 1.0), ("b", 2, 4, 2.0)))
    no_alpha = {k: v for k, v in load_file(a)[0].items() if not k.endswith(".alpha")}
    save_file(no_alpha, tmp_path / "n.safetensors")
    out = tmp_path / "m.safetensors"
    merge_loras([tmp_path / "n.safetensors", b], [0.5, 1.0], out, precision="fp16", progress=False)
    merged = load_file(out)[0]
    want = 0.5 * dense(no_alpha, name) + dense(load_file(b)[0], name)
    assert torch.allclose(dense(merged, name), want, rtol=0, atol=2e-3 * want.abs().max().item())
    assert {t.dtype for t in merged.values()} == {torch.float16}


def test_an_adapter_holding_nan_is_refused_before_any_weight_changes(models, tmp_path, capsys):
    """A NaN in one adapter tensor would spread into the model's weights (and every output): refused naming the file
    and tensor, the model untouched and no checkpoint written."""
    sd_model, sd_ckpt = models["sd1"]
    good = adapter_file(sd_model, tmp_path / "good.safetensors", "lora", 1, preset="attn-only")
    bad = adapter_file(sd_model, tmp_path / "nan.safetensors", "loha", 2, preset="attn-only")
    tensors, meta = load_file(bad)
    key = sorted(k for k in tensors if k.endswith("hada_w1_a"))[0]
    tensors[key][0, 0] = float("inf")
    from lorakit.formats.safetensors_io import save_file

    save_file(tensors, bad, metadata=meta)
    model = copy.deepcopy(sd_model)
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    with pytest.raises(ValueError, match=rf"nan.safetensors: 1 tensor\(s\) hold NaN or Inf, e.g. {re.escape(key)}; "
                                         r"merging would write them into the model's weights"):
        merge_into_model(model, [good, bad], [1.0, 0.5], progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.unet.state_dict().items())
    out = tmp_path / "merged.safetensors"
    with pytest.warns(UserWarning, match="hold NaN or Inf"):  # load_network's own report, then the refusal
        err = run_error(capsys, "--model", str(sd_ckpt), "--loras", str(good), str(bad), "--save_to", str(out))
    assert "nan.safetensors: 1 tensor(s) hold NaN or Inf" in err and not out.exists()
