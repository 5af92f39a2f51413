"""Loading and saving whole models: single files (.safetensors/.ckpt) and diffusers folders round-trip
bit for bit, extras survive, overrides are checked, a separate VAE and its dtype are honoured."""

from __future__ import annotations

import functools
import json

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from lorakit.formats.safetensors_io import load_file, save_file  # noqa: E402
from lorakit.models.demo import random_model  # noqa: E402
from lorakit.models.detect import ModelKindError  # noqa: E402
from lorakit.models.load import load_model  # noqa: E402
from lorakit.models.save import checkpoint_tensors, save_checkpoint, save_diffusers  # noqa: E402


@functools.lru_cache(maxsize=None)
def _model(name: str):
    model = random_model(name, seed=3)
    with torch.no_grad():  # the default init leaves zeros and ones; make every tensor distinct
        g = torch.Generator().manual_seed(7)
        for _, module in model.components():
            for p in module.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=g))
    return model


def _states(model):
    return {c: {k: v.clone() for k, v in m.state_dict().items()} for c, m in model.components()}


def _assert_same_states(a, b):
    assert a.keys() == b.keys()
    for component in a:
        assert a[component].keys() == b[component].keys(), component
        for key, value in a[component].items():
            other = b[component][key]
            assert other.dtype == value.dtype and torch.equal(other, value), (component, key)


@pytest.fixture(scope="module")
def sd_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("sd") / "tiny.safetensors"
    save_checkpoint(_model("tiny-sd"), path, dtype=None)
    return path


@pytest.fixture(scope="module")
def sdxl_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("sdxl") / "tiny-xl.safetensors"
    save_checkpoint(_model("tiny-sdxl"), path, dtype=None)
    return path


@pytest.mark.parametrize("name,fixture", [("tiny-sd", "sd_file"), ("tiny-sdxl", "sdxl_file")])
def test_single_file_round_trip_is_exact(name, fixture, request, tmp_path):
    path = request.getfixturevalue(fixture)
    loaded = load_model(path)
    assert loaded.kind == _model(name).kind and not loaded.v_parameterization
    _assert_same_states(_states(loaded), _states(_model(name)))
    again = tmp_path / "again.safetensors"
    save_checkpoint(loaded, again, dtype=None)
    first, second = load_file(path)[0], load_file(again)[0]
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("name,fixture", [("tiny-sd", "sd_file"), ("tiny-sdxl", "sdxl_file")])
def test_a_repeated_load_builds_only_its_own_components(name, fixture, request, monkeypatch):
    """The full-size candidate config a tiny file is first tried against is rejected from its remembered shapes:
    a second load builds each of its components on meta once, and loads the same tensors."""
    import lorakit.models.load as load_module

    path = request.getfixturevalue(fixture)
    first = load_model(path)
    built = []
    real = load_module.component_on_meta
    monkeypatch.setattr(load_module, "component_on_meta", lambda c, cfg: built.append(c) or real(c, cfg))
    monkeypatch.setattr("lorakit.models.assemble.component_on_meta", load_module.component_on_meta)
    second = load_model(path)
    assert sorted(built) == sorted(["unet", "vae", *(c for c in _states(first) if c.startswith("text_encoder"))])
    _assert_same_states(_states(second), _states(first))


def test_single_file_keys_are_the_ldm_layout(sd_file, sdxl_file):
    sd_keys, xl_keys = load_file(sd_file)[0].keys(), load_file(sdxl_file)[0].keys()
    assert "model.diffusion_model.input_blocks.0.0.weight" in sd_keys
    assert "first_stage_model.encoder.down.0.block.0.conv1.weight" in sd_keys
    assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in sd_keys
    assert "model.diffusion_model.label_emb.0.0.weight" in xl_keys
    assert "conditioner.embedders.1.model.ln_final.weight" in xl_keys
    assert any(k.startswith("conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight")
               for k in xl_keys)


def test_extras_and_v_pred_marker_survive(sd_file, tmp_path):
    tensors = load_file(sd_file)[0]
    tensors["alphas_cumprod"] = torch.linspace(1, 0.01, 1000)
    tensors["v_pred"] = torch.tensor([])
    tensors["model_ema.decay"] = torch.tensor(0.999)  # EMA entries are dropped on load
    src = tmp_path / "v.safetensors"
    save_file(tensors, src)
    model = load_model(src)
    assert model.v_parameterization and model.scheduler_config["prediction_type"] == "v_prediction"
    assert set(model.extras) == {"alphas_cumprod", "v_pred"}
    out = tmp_path / "out.safetensors"
    save_checkpoint(model, out, dtype=None)
    saved = load_file(out)[0]
    assert torch.equal(saved["alphas_cumprod"], tensors["alphas_cumprod"]) and "v_pred" in saved
    assert "model_ema.decay" not in saved
    with pytest.raises(ModelKindError, match="v_pred"):
        load_model(src, v_parameterization=False)


def test_ckpt_round_trip_and_dtype(sd_file, tmp_path):
    model = load_model(sd_file)
    ckpt = tmp_path / "m.ckpt"
    save_checkpoint(model, ckpt, dtype="fp16")
    half = load_model(ckpt, dtype="fp16")
    assert half.unet.conv_in.weight.dtype == torch.float16
    assert torch.equal(half.unet.conv_in.weight, model.unet.conv_in.weight.half())
    full = load_model(ckpt, dtype=torch.float32, no_half_vae=True)
    assert full.vae.encoder.conv_in.weight.dtype == torch.float32
    mixed = load_model(ckpt, dtype="bf16", no_half_vae=True)
    assert mixed.unet.conv_in.weight.dtype == torch.bfloat16
    assert mixed.vae.encoder.conv_in.weight.dtype == torch.float32


def test_diffusers_folder_round_trip(sdxl_file, tmp_path):
    model = load_model(sdxl_file)
    folder = tmp_path / "pipe"
    save_diffusers(model, folder)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and (folder / "tokenizer_2").is_dir()
    back = load_model(folder)
    assert back.kind == "sdxl"
    _assert_same_states(_states(back), _states(model))
    assert checkpoint_tensors(back).keys() == checkpoint_tensors(model).keys()
    save_diffusers(back, folder, dtype="fp16")  # replacing an existing folder
    unet_file = folder / "unet" / "diffusion_pytorch_model.safetensors"
    assert load_file(unet_file)[0]["conv_in.weight"].dtype == torch.float16
    assert load_model(folder, dtype=None).unet.conv_in.weight.dtype == torch.float16


def test_text_encoder_class_from_model_index_when_config_lacks_architectures(sdxl_file, tmp_path):
    # diffusers' from_pretrained builds the class model_index.json names; so does lorakit
    model = load_model(sdxl_file)
    folder = tmp_path / "pipe"
    save_diffusers(model, folder)
    for component in ("text_encoder", "text_encoder_2"):
        config_file = folder / component / "config.json"
        config = json.loads(config_file.read_text())
        config.pop("architectures")
        config_file.write_text(json.dumps(config))
    back = load_model(folder)
    assert [type(te).__name__ for te in back.text_encoders] == ["CLIPTextModel", "CLIPTextModelWithProjection"]
    _assert_same_states(_states(back), _states(model))
    index_file = folder / "model_index.json"
    index = json.loads(index_file.read_text())
    index["text_encoder_2"] = ["transformers", "T5EncoderModel"]
    index_file.write_text(json.dumps(index))
    with pytest.raises(ModelKindError, match=r"model_index.json: text_encoder_2 is transformers.T5EncoderModel"):
        load_model(folder)


def test_diffusers_folder_loads_with_diffusers_and_transformers(sd_file, tmp_path):
    import diffusers
    import transformers

    model = load_model(sd_file)
    folder = tmp_path / "pipe"
    save_diffusers(model, folder)
    unet = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet", local_files_only=True)
    te = transformers.CLIPTextModel.from_pretrained(folder / "text_encoder", local_files_only=True)
    for ours, theirs in ((model.unet, unet), (model.text_encoders[0], te)):
        theirs_sd = theirs.state_dict()
        assert all(torch.equal(v, theirs_sd[k]) for k, v in ours.state_dict().items())


def test_transformers4_text_encoder_keys_load(sd_file, tmp_path):
    model = load_model(sd_file)
    folder = tmp_path / "pipe"
    save_diffusers(model, folder)
    te_file = folder / "text_encoder" / "model.safetensors"
    tensors = load_file(te_file)[0]
    save_file({"text_model." + k: v for k, v in tensors.items()}, te_file)
    back = load_model(folder)
    _assert_same_states(_states(back), _states(model))


def test_separate_vae(sd_file, tmp_path):
    tensors = load_file(sd_file)[0]
    vae_only = {k.removeprefix("first_stage_model."): v * 2 for k, v in tensors.items()
                if k.startswith("first_stage_model.")}
    vae_file = tmp_path / "vae.safetensors"
    save_file(vae_only, vae_file)
    model = load_model(sd_file, vae=vae_file, dtype="fp16", no_half_vae=True)
    assert model.vae.encoder.conv_in.weight.dtype == torch.float32
    expected = vae_only["encoder.conv_in.weight"]
    assert torch.equal(model.vae.encoder.conv_in.weight, expected)
    assert model.unet.conv_in.weight.dtype == torch.float16
    # the VAE alone passed as the model is named as such
    with pytest.raises(ModelKindError, match="VAE alone"):
        load_model(vae_file)


def test_separate_vae_from_diffusers_folder(sd_file, tmp_path):
    model = load_model(sd_file)
    folder = tmp_path / "pipe"
    save_diffusers(model, folder)
    again = load_model(sd_file, vae=folder)
    _assert_same_states({"vae": again.vae.state_dict()}, {"vae": model.vae.state_dict()})


def test_demo_name_resolves(monkeypatch, sd_file):
    import lorakit.models.demo as demo

    monkeypatch.setattr(demo, "DEMO_DIR", sd_file.parent)
    sd_file.rename(sd_file.parent / "tiny-sd.safetensors")
    try:
        model = load_model("demo:tiny-sd")
        assert model.kind == "sd1" and model.unet.config.block_out_channels[0] == 32
    finally:
        (sd_file.parent / "tiny-sd.safetensors").rename(sd_file)


def _tiny_sd2_config_folder(root):
    """tiny-sd's configs turned into an SD2-shaped model: OpenCLIP-style text encoder (gelu), linear
    attention projections, v-prediction scheduler."""
    import shutil

    from lorakit.models.configs import config_dir

    folder = root / "tiny-sd2"
    shutil.copytree(config_dir("tiny-sd"), folder)
    for component, changes in (("unet", {"use_linear_projection": True}), ("text_encoder", {"hidden_act": "gelu"})):
        file = folder / component / "config.json"
        cfg = json.loads(file.read_text())
        cfg.update(changes)
        file.write_text(json.dumps(cfg))
    return folder


def test_sd2_single_file_with_openclip_extras(tmp_path):
    from lorakit.models.assemble import materialize_buffers
    from lorakit.models.configs import load_config
    from lorakit.models.load import _configs
    from lorakit.models.meta import component_on_meta
    from lorakit.models.model import StableDiffusionModel
    from lorakit.models.tokenizer import tokenizers_for

    folder = _tiny_sd2_config_folder(tmp_path)
    configs = _configs(folder, "sd2", v_pred=True)
    torch.manual_seed(5)
    modules = {}
    for component in ("unet", "vae", "text_encoder"):
        meta = component_on_meta(component, configs[component])
        modules[component] = meta.to_empty(device="cpu")
        with torch.no_grad():
            for p in modules[component].parameters():
                p.normal_(0, 0.02)
        materialize_buffers(modules[component], "test")
    model = StableDiffusionModel("sd2", True, modules["unet"], modules["vae"], [modules["text_encoder"]],
                                 tokenizers_for("sd2"), configs["scheduler"])
    path = tmp_path / "sd2.safetensors"
    save_checkpoint(model, path, dtype=None)
    tensors = load_file(path)[0]
    assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in tensors
    # a v model whose weights ComfyUI's probe would call epsilon gets the marker, so that it reloads as v
    assert "v_pred" in tensors and load_model(path, config=folder).v_parameterization
    del tensors["v_pred"]  # below: a file as most SD2 ones are, without it
    # what SD2 files carry beyond diffusers' 23-layer encoder: one more layer, the projection, logit_scale
    width = load_config("tiny-sd", "text_encoder")["hidden_size"]
    extra_layer = {k.replace("resblocks.0.", "resblocks.3."): v + 1 for k, v in tensors.items()
                   if "resblocks.0." in k}
    tensors.update(extra_layer)
    tensors["cond_stage_model.model.text_projection"] = torch.randn(width, width)
    tensors["cond_stage_model.model.logit_scale"] = torch.tensor(4.6)
    save_file(tensors, path)
    with pytest.raises(ModelKindError, match="v2=False was given but the file is an SD2.x checkpoint"):
        load_model(path, v2=False)
    loaded = load_model(path, config=folder, v_parameterization=True)
    assert loaded.kind == "sd2" and loaded.v_parameterization
    _assert_same_states(_states(loaded), _states(model))
    assert set(loaded.extras) == set(extra_layer) | {"cond_stage_model.model.text_projection",
                                                       "cond_stage_model.model.logit_scale"}
    again = tmp_path / "again.safetensors"
    save_checkpoint(loaded, again, dtype=None)
    saved = load_file(again)[0]
    # every tensor back as it was; v_parameterization=True, which the weights do not show, is kept as the marker
    assert saved.keys() == tensors.keys() | {"v_pred"} and all(torch.equal(saved[k], tensors[k]) for k in tensors)
    assert load_model(again, config=folder).v_parameterization
    # the std probe (ComfyUI's rule) calls these small random norms epsilon when no flag is given
    assert not load_model(path, config=folder).v_parameterization
    # a 768-v-like file (the probe's bias spread above 0.09) needs no marker: its round trip stays exact
    probe = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"
    tensors[probe] = torch.linspace(-0.3, 0.3, tensors[probe].numel())
    save_file(tensors, path)
    loaded = load_model(path, config=folder)
    assert loaded.v_parameterization and "v_pred" not in loaded.extras
    save_checkpoint(loaded, again, dtype=None)
    saved = load_file(again)[0]
    assert saved.keys() == tensors.keys() and all(torch.equal(saved[k], tensors[k]) for k in tensors)
    # a v-prediction SD2 diffusers folder whose weights the probe calls epsilon: its single file says v too
    tensors[probe] = torch.zeros_like(tensors[probe])
    save_file(tensors, path)
    pipe = tmp_path / "pipe"
    save_diffusers(load_model(path, config=folder, v_parameterization=True), pipe)
    from_folder = load_model(pipe)
    assert from_folder.kind == "sd2" and from_folder.v_parameterization
    save_checkpoint(from_folder, again, dtype=None)
    assert "v_pred" in load_file(again)[0] and load_model(again, config=folder).v_parameterization


def test_single_file_vae_with_a_folder_model_uses_the_folders_vae_config(sd_file, tmp_path):
    # tiny-sd's VAE (1 resnet per level) is not the bundled sd15 one (2): the folder's vae/config.json decides
    model = load_model(sd_file)
    folder = tmp_path / "pipe"
    save_diffusers(model, folder)
    tensors = load_file(sd_file)[0]
    vae_file = tmp_path / "vae_bare.safetensors"
    save_file({k.removeprefix("first_stage_model."): v for k, v in tensors.items()
               if k.startswith("first_stage_model.")}, vae_file)
    again = load_model(folder, vae=vae_file)
    _assert_same_states({"vae": again.vae.state_dict()}, {"vae": model.vae.state_dict()})
