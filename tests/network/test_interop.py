"""Whole-network interop: lorakit files in lycoris-lora, lycoris-lora files in lorakit, kohya `networks/lora.py`
files built by hand, and the files lorakit must refuse (PEFT/diffusers layout, checkpoints, ...) with clear errors.

The per-layer math of every algorithm against LyCORIS is in tests/algos/test_lycoris_interop.py; here the question
is whether whole files line up: names, prefixes, which modules each side finds, and the outputs of whole models.

What lycoris-lora 4.1.3 does with Stable Diffusion files (pinned below, described in docs/networks.md):

* Its kohya loader (`lycoris.kohya.create_network_from_weights`) looks modules up by the names the given model
  has: `lora_unet_` + the diffusers U-Net path, `lora_te_`/`lora_te1_`/`lora_te2_` + the text encoder's own path.
  Names it does not find are skipped without a word. So:
  - SDXL files with SGM U-Net names (`lora_unet_input_blocks_4_1_...`, what kohya sd-scripts and lorakit write)
    load with no U-Net module at all on a diffusers U-Net; re-keyed to diffusers names they load and agree.
  - transformers 5's CLIPTextModel has no `.text_model`, so LyCORIS looks for `lora_te_encoder_layers_...` and
    skips the community names (`lora_te_text_model_encoder_layers_...`) that lorakit writes; given the encoder
    wrapped in a module with a `text_model` attribute, it finds them and agrees.
* Its presets "full", "full-lin" and "unet-only" (and its default class state) target the `TimestepEmbedding`
  class and the names `time_embedding.linear_1/2`, and crash on every diffusers SD U-Net ("duplicated lora
  name"); its loader builds such a network first, so the tests hand LyCORIS a preset without the duplicate.
* LyCORIS keeps presets in class attributes (global state): a fixture restores them after every test.

Everything runs in float32, LyCORIS in its default (weight-rebuild) mode.
"""

from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch
import torch.nn as nn

os.environ["LYCORIS_KERNEL_BACKEND"] = "torch"  # LyCORIS' eager reference bodies, no compile or tuner
os.environ.setdefault("LYCORIS_KERNEL_TUNE", "off")
lycoris = pytest.importorskip("lycoris")

from lycoris.kohya import LycorisNetworkKohya  # noqa: E402
from lycoris.kohya import create_network as lycoris_create_sd  # noqa: E402
from lycoris.kohya import create_network_from_weights as lycoris_load_sd  # noqa: E402
from lycoris.wrapper import LycorisNetwork  # noqa: E402
from safetensors.torch import load_file as st_load  # noqa: E402
from safetensors.torch import save_file as st_save  # noqa: E402

from lorakit import create_network, load_network  # noqa: E402
from lorakit.network.names import adapter_name  # noqa: E402

from .tiny import randomize, run_unet, tiny_model  # noqa: E402

# lorakit algo, its options; LyCORIS takes the same names (lorakit's options are kohya/LyCORIS spellings)
ALGOS = [
    pytest.param("lora", {}, id="lora"),
    pytest.param("loha", {}, id="loha"),
    pytest.param("lokr", {"factor": 4}, id="lokr"),
    pytest.param("glora", {}, id="glora"),
    pytest.param("diag-oft", {"dim": 2}, id="diag-oft"),
]
KINDS = ["sd1", "sdxl"]

# lorakit's "full" preset in LyCORIS' keys: LyCORIS' own "full" also lists the TimestepEmbedding class and crashes.
LORAKIT_FULL = {
    "enable_conv": True,
    "unet_target_module": ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"],
    "unet_target_name": ["conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"],
    "text_encoder_target_module": ["CLIPAttention", "CLIPMLP"],
    "text_encoder_target_name": [],
}


# ----- helpers ------------------------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def lycoris_class_state():
    """LyCORIS' apply_preset writes class attributes; give every test the pristine ones back."""
    saved = {cls: {k: copy.copy(v) for k, v in vars(cls).items() if k.isupper()}
             for cls in (LycorisNetwork, LycorisNetworkKohya)}
    yield
    for cls, attrs in saved.items():
        for k in [k for k in vars(cls) if k.isupper() and k not in attrs]:
            delattr(cls, k)
        for k, v in attrs.items():
            setattr(cls, k, v)


class Generic(nn.Module):
    """Linear and conv layers (3x3, 1x1, nested), a norm, no Stable Diffusion anything."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(8, 8, 1), nn.GroupNorm(2, 8))
        self.head = nn.Linear(8 * 16, 24)
        self.out = nn.ModuleDict({"proj": nn.Linear(24, 12)})

    def forward(self, x):
        x = self.block(self.conv(x))
        return self.out["proj"](torch.relu(self.head(x.flatten(1))))


GENERIC_NAMES = {"lycoris_conv", "lycoris_block_0", "lycoris_head", "lycoris_out_proj"}


def generic_model():
    torch.manual_seed(0)
    return Generic().eval().requires_grad_(False), torch.randn(2, 4, 4, 4)


class WithTextModel(nn.Module):
    """A transformers-5 CLIPTextModel seen through a `text_model` attribute, as transformers 4 had it: LyCORIS
    names the encoder's modules by their paths, and through this wrapper the paths are the community names."""

    def __init__(self, te):
        super().__init__()
        self.text_model = te


def lycoris_text_encoders(kind, tes, wrap=True):
    """What sd-scripts hands LyCORIS: one text encoder for SD1/SD2 (prefix lora_te), a list for SDXL
    (lora_te1/lora_te2; a list of one would give lora_te1 on SD1 too)."""
    first = WithTextModel(tes[0]) if wrap else tes[0]
    return first if kind == "sd1" else [first, tes[1]]


IDS = torch.tensor([[0, 5, 7, 9, 11, 1]])


def outputs(unet, tes, kind):
    with torch.no_grad():
        return [run_unet(unet, kind)] + [te(IDS).last_hidden_state for te in tes]


def assert_same(actual, expected, what=""):
    for i, (a, e) in enumerate(zip(actual, expected)):
        scale = float(e.abs().max())
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5 * scale, msg=lambda m: f"{what} output {i}\n{m}")


def assert_changed(actual, base):
    for a, b in zip(actual, base):
        assert float((a - b).abs().max()) > 1e-3 * float(b.abs().max()), "the randomized network must change it"


def no_grad(model, x):
    def run():
        with torch.no_grad():
            return model(x)
    return run


def lorakit_outputs(net, fn):
    net.apply()
    try:
        return fn()
    finally:
        net.restore()


def lycoris_generic_outputs(lnet, fn):
    """fn() with a LyCORIS network of a generic model applied."""
    lnet.apply_to()
    try:
        return fn()
    finally:
        lnet.restore()


def lycoris_sd_outputs(lnet, te_arg, unet, fn):
    lnet.apply_to(te_arg, unet, apply_text_encoder=True, apply_unet=True)
    try:
        return fn()
    finally:
        lnet.restore()


def load_in_lycoris(tensors, te_arg, unet):
    """lycoris.kohya.create_network_from_weights: it first builds a throwaway network with the class preset,
    which must not be LyCORIS' crashing default on a diffusers U-Net."""
    LycorisNetworkKohya.apply_preset(LORAKIT_FULL)
    lnet, _ = lycoris_load_sd(1.0, None, None, te_arg, unet, weights_sd=dict(tensors))
    return lnet


def to_diffusers_unet_names(tensors, net):
    """Re-key the U-Net adapters of a lorakit SDXL file from SGM to diffusers names (what LyCORIS' loader finds)."""
    rename = {name: adapter_name("lora_unet_", e.path) for name, e in net.entries.items() if e.component == "unet"}
    out = {}
    for key, value in tensors.items():
        name, _, suffix = key.partition(".")
        out[f"{rename.get(name, name)}.{suffix}"] = value
    return out


# ----- generic models -----------------------------------------------------------------------------------------------
def test_generic_prefix_is_lycoris():
    model, _ = generic_model()
    assert LycorisNetwork.LORA_PREFIX == "lycoris"  # LyCORIS names f"{LORA_PREFIX}_{path}" with . -> _
    lnet = lycoris.create_lycoris(model, 1.0, linear_dim=4, linear_alpha=2, algo="lora")
    assert {m.lora_name for m in lnet.loras} == GENERIC_NAMES
    assert set(create_network(model, algo="lora", dim=4).entries) == GENERIC_NAMES


@pytest.mark.parametrize("algo,opts", ALGOS)
def test_lorakit_generic_file_in_lycoris(tmp_path, algo, opts):
    model, x = generic_model()
    with torch.no_grad():
        base = model(x)
    net = randomize(create_network(model, algo=algo, **{"dim": 4, "alpha": 2, **opts}), scale=0.1)
    expected = lorakit_outputs(net, no_grad(model, x))
    path = tmp_path / "lorakit.safetensors"
    net.save(path)

    lnet, _ = lycoris.create_lycoris_from_weights(1.0, str(path), model)
    assert {m.lora_name for m in lnet.loras} == set(net.entries) == GENERIC_NAMES
    got = lycoris_generic_outputs(lnet, no_grad(model, x))
    assert_changed([expected], [base])
    assert_same([got], [expected], algo)


@pytest.mark.parametrize("algo", ["lora", "loha"])
def test_lycoris_loads_dora_files_only_along_output_rows(tmp_path, algo):
    """As docs/networks.md says: LyCORIS' loader builds every DoRA module per output row, so it loads a lorakit
    DoRA file with dora_axis "out" (same forward) and fails on the default "in" axis."""
    model, x = generic_model()
    for axis in ("out", "in"):
        net = randomize(create_network(model, algo=algo, dim=4, alpha=2, dora_wd=True, dora_axis=axis), scale=0.1)
        expected = lorakit_outputs(net, no_grad(model, x))
        path = tmp_path / f"{axis}.safetensors"
        net.save(path)
        if axis == "in":
            with pytest.raises(RuntimeError, match="shape"):
                lycoris.create_lycoris_from_weights(1.0, str(path), model)
            continue
        lnet, _ = lycoris.create_lycoris_from_weights(1.0, str(path), model)
        got = lycoris_generic_outputs(lnet, no_grad(model, x))
        assert_same([got], [expected], f"{algo} dora out")


@pytest.mark.parametrize("algo,opts", ALGOS)
def test_lycoris_generic_file_in_lorakit(tmp_path, algo, opts):
    model, x = generic_model()
    kwargs = {"linear_dim": opts.get("dim", 4), "linear_alpha": 2.0, "algo": algo}
    kwargs.update({k: v for k, v in opts.items() if k != "dim"})
    lnet = lycoris.create_lycoris(model, 1.0, **kwargs)
    lnet.apply_to()
    try:
        randomize(lnet, scale=0.1)
        with torch.no_grad():
            expected = model(x)
        path = tmp_path / "lycoris.safetensors"
        lnet.save_weights(str(path), torch.float32, None)
    finally:
        lnet.restore()

    net = load_network(model, path)
    assert set(net.entries) == GENERIC_NAMES
    assert {a.name for _, a in net.adapters()} == {algo}
    got = lorakit_outputs(net, no_grad(model, x))
    assert_same([got], [expected], algo)


def test_constrained_lycoris_oft_file_warns_that_its_bound_is_read_as_comfyui_reads_it(tmp_path):
    """LyCORIS trains Diag-OFT with the bound constraint * out_dim and saves the constraint as alpha; lorakit
    (like ComfyUI) applies alpha as the bound, so a rotation trained past it is shrunk. Loading such a file says
    so, naming a module; an unconstrained file and one inside its bound load silently."""
    model, _ = generic_model()
    paths = {}
    for label, constraint, scale in (("over", 0.01, 0.5), ("inside", 0.01, 1e-5), ("free", 0.0, 0.5)):
        lnet = lycoris.create_lycoris(model, 1.0, linear_dim=4, linear_alpha=1.0, algo="diag-oft",
                                      constraint=constraint)
        lnet.apply_to()
        try:
            randomize(lnet, scale=scale)
            paths[label] = tmp_path / f"{label}.safetensors"
            lnet.save_weights(str(paths[label]), torch.float32, None)
        finally:
            lnet.restore()
    with pytest.warns(UserWarning, match=r"OFT module\(s\) hold a rotation above their saved bound, e\.g\. "
                                         r"lycoris_\w+ \(\|Q\| [\d.e+-]+ > alpha 0\.01\)"):
        load_network(model, paths["over"])
    for label in ("inside", "free"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            load_network(model, paths[label])


def test_lora_prefix_names_generic_adapters_in_both(tmp_path):
    """A preset's lora_prefix replaces "lycoris" in both; loading needs the same prefix on either side."""
    model, x = generic_model()
    net = randomize(create_network(model, preset={"lora_prefix": "mynet", "target_module": ["Linear"]}, dim=4),
                    scale=0.1)
    assert set(net.entries) == {"mynet_head", "mynet_out_proj"}
    expected = lorakit_outputs(net, no_grad(model, x))
    path = tmp_path / "prefixed.safetensors"
    net.save(path)

    with pytest.raises(ValueError, match="match no module"):
        load_network(model, path)  # the default prefix is lycoris_
    assert_same([lorakit_outputs(load_network(model, path, prefix="mynet"), no_grad(model, x))], [expected])

    LycorisNetwork.apply_preset({"lora_prefix": "mynet"})
    lnet, _ = lycoris.create_lycoris_from_weights(1.0, str(path), model)
    assert {m.lora_name for m in lnet.loras} == {"mynet_head", "mynet_out_proj"}
    assert_same([lycoris_generic_outputs(lnet, no_grad(model, x))], [expected])


# ----- Stable Diffusion: lorakit -> LyCORIS -------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("algo,opts", ALGOS)
def test_lorakit_sd_file_in_lycoris(tmp_path, kind, algo, opts):
    unet, tes = tiny_model(kind)
    run = lambda: outputs(unet, tes, kind)  # noqa: E731
    base = run()
    net = randomize(create_network(unet, tes, algo=algo, preset="full", **{"dim": 4, "alpha": 2, **opts}))
    expected = lorakit_outputs(net, run)
    assert_changed(expected, base)
    path = tmp_path / "lorakit.safetensors"
    net.save(path)
    tensors = st_load(path)
    if kind == "sdxl":
        tensors = to_diffusers_unet_names(tensors, net)

    te_arg = lycoris_text_encoders(kind, tes)
    lnet = load_in_lycoris(tensors, te_arg, unet)
    assert len(lnet.unet_loras) == len(net.names("unet"))
    assert len(lnet.text_encoder_loras) == len(net) - len(net.names("unet"))
    got = lycoris_sd_outputs(lnet, te_arg, unet, run)
    assert_same(got, expected, f"{kind} {algo}")
    torch.testing.assert_close(run(), base, rtol=0, atol=0)


def test_lycoris_skips_sgm_names_of_sdxl_files(tmp_path):
    """LyCORIS' loader only knows a diffusers U-Net's own names: an SDXL file named as kohya and lorakit write it
    (SGM) loads there with no U-Net module, and without an error."""
    unet, tes = tiny_model("sdxl")
    net = create_network(unet, tes, preset="attn-mlp", dim=4)
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in net.entries
    net.save(tmp_path / "sgm.safetensors")
    te_arg = lycoris_text_encoders("sdxl", tes)
    lnet = load_in_lycoris(st_load(tmp_path / "sgm.safetensors"), te_arg, unet)
    assert len(lnet.unet_loras) == 0
    assert len(lnet.text_encoder_loras) == len(net.names("text_encoder")) + len(net.names("text_encoder_2"))
    renamed = to_diffusers_unet_names(st_load(tmp_path / "sgm.safetensors"), net)
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in renamed
    assert len(load_in_lycoris(renamed, te_arg, unet).unet_loras) == len(net.names("unet"))


def test_lycoris_skips_text_model_names_on_transformers5_clip(tmp_path):
    """transformers 5's CLIPTextModel lost `.text_model`: LyCORIS then looks for lora_te_encoder_layers_... and
    skips the community names lorakit writes (lora_te_text_model_encoder_layers_...)."""
    unet, tes = tiny_model("sd1")
    net = create_network(unet, tes, preset="attn-mlp", dim=4)
    assert "lora_te_text_model_encoder_layers_0_mlp_fc1" in net.entries
    tensors = net.state_dict()
    raw = load_in_lycoris(tensors, lycoris_text_encoders("sd1", tes, wrap=False), unet)
    assert len(raw.text_encoder_loras) == 0 and len(raw.unet_loras) == len(net.names("unet"))
    wrapped = load_in_lycoris(tensors, lycoris_text_encoders("sd1", tes, wrap=True), unet)
    assert len(wrapped.text_encoder_loras) == len(net.names("text_encoder"))


def test_lycoris_full_presets_crash_on_diffusers_unets():
    """LyCORIS 4.1.3's full / full-lin / unet-only presets target the TimestepEmbedding class and the names
    time_embedding.linear_1/2 both, which gives every SD U-Net's time embedding twice."""
    unet, tes = tiny_model("sd1")
    for preset in ("full", "full-lin", "unet-only"):
        with pytest.raises(AssertionError, match="duplicated lora name: lora_unet_time_embedding_linear_1"):
            lycoris_create_sd(1.0, 4, 1.0, None, tes[0], unet, preset=preset)


def test_lycoris_presets_differ_from_lorakits_on_diffusers_unets():
    """LyCORIS' attn-mlp also adapts the time embedding (its TimestepEmbedding target); its attn-only names the
    old CrossAttention class, which diffusers no longer has: it selects nothing in the U-Net; its ia3 preset names
    bare "to_k", "k_proj", ... matched with re.match at the start of the path: it selects nothing at all."""
    unet, tes = tiny_model("sdxl")
    te_arg = lycoris_text_encoders("sdxl", tes)
    ours = create_network(unet, tes, preset="attn-mlp", dim=4)
    theirs = lycoris_create_sd(1.0, 4, 1.0, None, te_arg, unet, preset="attn-mlp")
    extra = {m.lora_name for m in theirs.unet_loras} - {adapter_name("lora_unet_", ours.entries[n].path)
                                                        for n in ours.names("unet")}
    assert extra == {f"lora_unet_{e}_linear_{i}" for e in ("time_embedding", "add_embedding") for i in (1, 2)}
    theirs = lycoris_create_sd(1.0, 4, 1.0, None, te_arg, unet, preset="attn-only")
    assert len(theirs.unet_loras) == 0
    assert len(create_network(unet, tes, preset="attn-only", dim=4).names("unet")) > 0
    theirs = lycoris_create_sd(1.0, 4, 1.0, None, te_arg, unet, preset="ia3", algo="ia3")
    assert len(theirs.loras) == 0
    assert len(create_network(unet, tes, preset="ia3", algo="ia3")) > 0


# ----- Stable Diffusion: LyCORIS -> lorakit -------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("algo,opts", ALGOS)
def test_lycoris_sd_file_in_lorakit(tmp_path, kind, algo, opts):
    unet, tes = tiny_model(kind)
    run = lambda: outputs(unet, tes, kind)  # noqa: E731
    base = run()
    preset = tmp_path / "full.toml"
    preset.write_text("\n".join(f"{k} = {str(v).lower() if isinstance(v, bool) else v!r}"
                                for k, v in LORAKIT_FULL.items()).replace("'", '"'))
    te_arg = lycoris_text_encoders(kind, tes, wrap=False)  # LyCORIS' own names: lora_te_encoder_layers_...
    extra = {k: str(v) for k, v in opts.items() if k != "dim"}
    dim = opts.get("dim", 4)
    lnet = lycoris_create_sd(1.0, dim, 2.0, None, te_arg, unet, algo=algo, preset=str(preset), **extra)
    names = {m.lora_name for m in lnet.loras}
    lnet.apply_to(te_arg, unet, apply_text_encoder=True, apply_unet=True)
    try:
        randomize(lnet)
        expected = run()
        path = tmp_path / "lycoris.safetensors"
        lnet.save_weights(str(path), torch.float32, {"ss_network_module": "lycoris.kohya"})
    finally:
        lnet.restore()
    assert_changed(expected, base)
    if kind == "sd1":
        assert "lora_te_encoder_layers_0_mlp_fc1" in names
        assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in names
    else:
        assert "lora_te1_encoder_layers_0_mlp_fc1" in names and "lora_te2_text_model_encoder_layers_0_mlp_fc1" in names
        assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q" in names  # diffusers names

    net = load_network(unet, path, text_encoders=tes)
    # the same modules as lorakit's "full" preset, under the names lorakit writes
    assert set(net.entries) == set(create_network(unet, tes, preset="full", dim=4).entries)
    assert {a.name for _, a in net.adapters()} == {algo}
    assert net.metadata["ss_network_module"] == "lycoris.kohya"
    assert_same(lorakit_outputs(net, run), expected, f"{kind} {algo}")
    torch.testing.assert_close(run(), base, rtol=0, atol=0)


# ----- kohya networks/lora.py files, built by hand ------------------------------------------------------------------
# (file name, module path in the tiny model) for the kohya names: SD1 diffusers names, SDXL SGM names
KOHYA_SD1 = [
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
     "unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"),
    ("lora_unet_down_blocks_1_attentions_1_proj_in", "unet", "down_blocks.1.attentions.1.proj_in"),  # 1x1 conv
    ("lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_0_proj",
     "unet", "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.0.proj"),
    ("lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k",
     "unet", "mid_block.attentions.0.transformer_blocks.0.attn2.to_k"),
    ("lora_unet_down_blocks_0_resnets_0_conv1", "unet", "down_blocks.0.resnets.0.conv1"),  # 3x3 (LoCon)
    ("lora_unet_up_blocks_1_upsamplers_0_conv", "unet", "up_blocks.1.upsamplers.0.conv"),
    ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", "te0", "encoder.layers.0.self_attn.q_proj"),
    ("lora_te_text_model_encoder_layers_1_mlp_fc2", "te0", "encoder.layers.1.mlp.fc2"),
]
KOHYA_SDXL = [
    ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
     "unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"),
    ("lora_unet_input_blocks_7_1_transformer_blocks_1_attn2_to_v",
     "unet", "down_blocks.2.attentions.0.transformer_blocks.1.attn2.to_v"),
    ("lora_unet_middle_block_1_proj_in", "unet", "mid_block.attentions.0.proj_in"),
    ("lora_unet_output_blocks_0_1_transformer_blocks_0_ff_net_2",
     "unet", "up_blocks.0.attentions.0.transformer_blocks.0.ff.net.2"),
    ("lora_unet_input_blocks_1_0_in_layers_2", "unet", "down_blocks.0.resnets.0.conv1"),  # 3x3
    ("lora_unet_output_blocks_2_2_conv", "unet", "up_blocks.0.upsamplers.0.conv"),  # 3x3
    ("lora_unet_input_blocks_4_0_emb_layers_1", "unet", "down_blocks.1.resnets.0.time_emb_proj"),
    ("lora_te1_text_model_encoder_layers_0_self_attn_k_proj", "te0", "encoder.layers.0.self_attn.k_proj"),
    ("lora_te2_text_model_encoder_layers_1_mlp_fc1", "te1", "text_model.encoder.layers.1.mlp.fc1"),
]


def _module(unet, tes, component, path):
    root = unet if component == "unet" else tes[int(component[2:])]
    return root.get_submodule(path)


def kohya_file(unet, tes, table, seed=0, alpha=True):
    """kohya's LoRA tensors: lora_down (dim, in[, k, k]), lora_up (out, dim[, 1, 1]), 0-d alpha; ranks and
    alphas differ per module."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i, (name, component, path) in enumerate(table):
        layer = _module(unet, tes, component, path)
        dim = 2 + i % 3
        if isinstance(layer, nn.Conv2d):
            down = (dim, layer.in_channels, *layer.kernel_size)
            up = (layer.out_channels, dim, 1, 1)
        else:
            down, up = (dim, layer.in_features), (layer.out_features, dim)
        tensors[f"{name}.lora_down.weight"] = 0.3 * torch.randn(down, generator=g)
        tensors[f"{name}.lora_up.weight"] = 0.3 * torch.randn(up, generator=g)
        if alpha:
            tensors[f"{name}.alpha"] = torch.tensor(float(dim) / (1 + i % 2))
    return tensors


def ui_outputs(unet, tes, kind, table, tensors, strength=1.0):
    """The outputs with W + strength * alpha/dim * up @ down added to each layer's weight (the UIs' formula;
    a file without alpha means alpha = dim), the weights put back afterwards."""
    saved = []
    try:
        with torch.no_grad():
            for name, component, path in table:
                layer = _module(unet, tes, component, path)
                down = tensors[f"{name}.lora_down.weight"].float()
                up = tensors[f"{name}.lora_up.weight"].float()
                dim = down.shape[0]
                alpha = float(tensors[f"{name}.alpha"]) if f"{name}.alpha" in tensors else dim
                delta = (up.flatten(1) @ down.flatten(1)).reshape(layer.weight.shape)
                saved.append((layer, layer.weight.detach().clone()))
                layer.weight.add_(strength * alpha / dim * delta)
            return outputs(unet, tes, kind)
    finally:
        with torch.no_grad():
            for layer, w in saved:
                layer.weight.copy_(w)


@pytest.mark.parametrize("kind,table", [("sd1", KOHYA_SD1), ("sdxl", KOHYA_SDXL)], ids=KINDS)
def test_kohya_lora_file_loads_with_the_ui_formula(tmp_path, kind, table):
    unet, tes = tiny_model(kind)
    base = outputs(unet, tes, kind)
    tensors = kohya_file(unet, tes, table)
    path = tmp_path / "kohya.safetensors"
    st_save(tensors, str(path), metadata={"ss_network_module": "networks.lora", "ss_network_dim": "4"})
    net = load_network(unet, path, text_encoders=tes)
    assert set(net.entries) == {name for name, _, _ in table}  # kohya's names are the ones lorakit writes
    assert {net.entries[n].path for n, _, _ in table} == {p for _, _, p in table}
    assert {a.name for _, a in net.adapters()} == {"lora"}
    expected = ui_outputs(unet, tes, kind, table, tensors)
    assert_changed(expected, base)
    assert_same(lorakit_outputs(net, lambda: outputs(unet, tes, kind)), expected, kind)
    net.multiplier = 0.6
    assert_same(lorakit_outputs(net, lambda: outputs(unet, tes, kind)),
                ui_outputs(unet, tes, kind, table, tensors, 0.6), f"{kind} at 0.6")
    torch.testing.assert_close(outputs(unet, tes, kind), base, rtol=0, atol=0)


def test_kohya_lora_file_in_half_precision_and_with_diffusers_names_for_sdxl(tmp_path):
    """fp16 files load (adapters in float32 by default); SDXL U-Net names in diffusers style are accepted too."""
    unet, tes = tiny_model("sdxl")
    table = [(adapter_name("lora_unet_", path) if c == "unet" else name, c, path) for name, c, path in KOHYA_SDXL]
    tensors = {k: v.half() for k, v in kohya_file(unet, tes, table, seed=3).items()}
    st_save(tensors, str(tmp_path / "half.safetensors"))
    net = load_network(unet, tmp_path / "half.safetensors", text_encoders=tes)
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in net.entries  # written back as SGM
    assert all(p.dtype == torch.float32 for p in net.parameters())
    assert_same(lorakit_outputs(net, lambda: outputs(unet, tes, "sdxl")), ui_outputs(unet, tes, "sdxl", table, tensors))


def test_kohya_lora_file_without_alpha_means_alpha_equals_dim(tmp_path):
    """Early kohya files have no alpha key; kohya's loader and the UIs then use alpha = dim (scale 1)."""
    unet, tes = tiny_model("sd1")
    tensors = kohya_file(unet, tes, KOHYA_SD1, seed=4, alpha=False)
    st_save(tensors, str(tmp_path / "no_alpha.safetensors"))
    net = load_network(unet, tmp_path / "no_alpha.safetensors", text_encoders=tes)
    assert all(a.scale == 1.0 for _, a in net.adapters())
    assert_same(lorakit_outputs(net, lambda: outputs(unet, tes, "sd1")),
                ui_outputs(unet, tes, "sd1", KOHYA_SD1, tensors))


# ----- files lorakit refuses, and what it says ----------------------------------------------------------------------
TO_Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
KOHYA_TO_Q = "lora_unet_" + TO_Q.replace(".", "_")


def _save(tmp_path, name, tensors):
    path = tmp_path / f"{name}.safetensors"
    st_save(tensors, str(path))
    return path


@pytest.mark.parametrize("name,tensors,message", [
    ("peft_unet", {f"unet.{TO_Q}.lora_A.weight": torch.zeros(4, 16), f"unet.{TO_Q}.lora_B.weight": torch.zeros(16, 4)},
     rf"peft_unet.safetensors: is a PEFT/diffusers-layout LoRA \(keys like 'unet.{TO_Q}.lora_A.weight'\); "
     r"convert it to the kohya/LyCORIS layout with `lorakit convert` first"),
    ("peft_base", {f"base_model.model.{TO_Q}.lora_B.weight": torch.zeros(16, 4)},
     rf"peft_base.safetensors: is a PEFT/diffusers-layout LoRA \(keys like 'base_model.model.{TO_Q}.lora_B.weight'\)"
     r".*`lorakit convert`"),
    ("peft_default", {f"base_model.model.{TO_Q}.lora_A.default.weight": torch.zeros(4, 16)},
     r"peft_default.safetensors: is a PEFT/diffusers-layout LoRA .*`lorakit convert`"),
    ("diffusers_compat", {f"unet.{TO_Q}.lora.down.weight": torch.zeros(4, 16)},
     r"diffusers_compat.safetensors: is a PEFT/diffusers-layout LoRA .*`lorakit convert`"),
    ("diffusers_linear_layer", {f"unet.{TO_Q}.lora_linear_layer.up.weight": torch.zeros(16, 4)},
     r"diffusers_linear_layer.safetensors: is a PEFT/diffusers-layout LoRA .*`lorakit convert`"),
    ("diffusers_processor", {f"unet.{TO_Q.rsplit('.', 1)[0]}.processor.to_q_lora.down.weight": torch.zeros(4, 16)},
     r"diffusers_processor.safetensors: is a PEFT/diffusers-layout LoRA .*`lorakit convert`"),
    ("checkpoint", {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2), "alphas_cumprod": torch.zeros(2)},
     r"checkpoint.safetensors: is a model checkpoint \(keys like 'model.diffusion_model.input_blocks.0.0.weight'\), "
     r"not an adapter"),
    ("sdxl_checkpoint", {"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.zeros(2)},
     r"sdxl_checkpoint.safetensors: is a model checkpoint"),
    ("empty", {}, r"empty.safetensors: holds no tensors"),
    ("unknown", {"lora_unet_foo_bar.lora_down.weight": torch.zeros(4, 16),
                 "lora_unet_foo_bar.lora_up.weight": torch.zeros(16, 4),
                 f"{KOHYA_TO_Q}.lora_down.weight": torch.zeros(4, 16),
                 f"{KOHYA_TO_Q}.lora_up.weight": torch.zeros(16, 4)},
     r"unknown.safetensors: 1 adapter name\(s\) match no module of this model, e.g. 'lora_unet_foo_bar'"),
    ("sdxl_te2_on_sd1", {"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 32),
                         "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(64, 4)},
     r"sdxl_te2_on_sd1.safetensors: 1 adapter name\(s\) match no module "
     r".*'lora_te2_text_model_encoder_layers_0_mlp_fc1'"),
    ("shape", {f"{KOHYA_TO_Q}.lora_down.weight": torch.zeros(4, 17), f"{KOHYA_TO_Q}.lora_up.weight": torch.zeros(16, 4),
               f"{KOHYA_TO_Q}.alpha": torch.tensor(4.0)},
     rf"(?s)shape.safetensors: module '{KOHYA_TO_Q}': .*lora_down.weight: file has shape \(4, 17\), "
     r"this adapter expects \(4, 16\)"),
    ("twice", {f"lora_te_{m}encoder_layers_0_mlp_fc1.{k}": torch.zeros(shape) for m in ("", "text_model_")
               for k, shape in (("lora_down.weight", (4, 32)), ("lora_up.weight", (64, 4)))},
     r"twice.safetensors: 'lora_te_text_model_encoder_layers_0_mlp_fc1' and 'lora_te_encoder_layers_0_mlp_fc1' "
     r"name the same module \(text_encoder (text_model\.)?encoder.layers.0.mlp.fc1\); the file holds it twice"),
    ("ti_embedding", {"emb_params": torch.zeros(2, 32)},
     r"ti_embedding.safetensors: holds no adapter tensors \(keys like 'emb_params'; an adapter module has "
     r"lora_down/lora_up, hada_w1_a, lokr_w1, oft_blocks, diff, ... tensors\): is it an embedding, a VAE or another "
     r"kind of file\?"),
    ("vae", {"encoder.conv_in.weight": torch.zeros(4, 3, 3, 3), "decoder.conv_out.bias": torch.zeros(3)},
     r"vae.safetensors: holds no adapter tensors \(keys like '(en|de)coder\."),
    ("unknown_suffix", {f"{KOHYA_TO_Q}.lora_dwn.weight": torch.zeros(4, 16)},
     rf"unknown_suffix.safetensors: module '{KOHYA_TO_Q}': no adapter algorithm has the tensors \['lora_dwn.weight'\]"),
])
def test_files_that_are_not_loadable_adapters(tmp_path, name, tensors, message):
    unet, tes = tiny_model("sd1")
    path = _save(tmp_path, name, tensors)
    with pytest.raises(ValueError, match=message):
        load_network(unet, path, text_encoders=tes)


def test_not_a_safetensors_file_is_named(tmp_path):
    unet, tes = tiny_model("sd1")
    path = tmp_path / "pickle.safetensors"
    torch.save({f"{KOHYA_TO_Q}.lora_down.weight": torch.zeros(4, 16)}, path)
    with pytest.raises(ValueError, match="pickle.safetensors"):
        load_network(unet, path, text_encoders=tes)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_network(unet, tmp_path / "missing.safetensors", text_encoders=tes)


def test_text_encoder_adapters_without_the_text_encoder(tmp_path):
    unet, tes = tiny_model("sd1")
    path = tmp_path / "with_te.safetensors"
    create_network(unet, tes, preset="attn-mlp", dim=4).save(path)
    with pytest.raises(ValueError, match=r"with_te.safetensors: 12 adapter name\(s\) match no module of this model, "
                                         r"e.g. 'lora_te_text_model_encoder_layers_0_mlp_fc1'.*"
                                         r"a text encoder that was not given"):
        load_network(unet, path)


def test_nan_in_a_tensor_is_a_warning_naming_it(tmp_path):
    unet, tes = tiny_model("sd1")
    tensors = {f"{KOHYA_TO_Q}.lora_down.weight": torch.randn(4, 16),
               f"{KOHYA_TO_Q}.lora_up.weight": torch.randn(16, 4), f"{KOHYA_TO_Q}.alpha": torch.tensor(4.0)}
    tensors[f"{KOHYA_TO_Q}.lora_up.weight"][3, 1] = float("nan")
    path = _save(tmp_path, "nan", tensors)
    with pytest.warns(UserWarning, match=rf"nan.safetensors: 1 tensor\(s\) hold NaN or Inf, e.g. "
                                         rf"{KOHYA_TO_Q}.lora_up.weight"):
        net = load_network(unet, path, text_encoders=tes)
    assert len(net) == 1
    tensors[f"{KOHYA_TO_Q}.lora_up.weight"][3, 1] = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a finite file loads without any warning
        load_network(unet, _save(tmp_path, "finite", tensors), text_encoders=tes)
