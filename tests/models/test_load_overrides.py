"""load_model's overrides on every kind of source: v_parameterization= decides the prediction type of a diffusers
folder too (sd-scripts takes --v_parameterization as the truth whatever the model format) and its scheduler config
says so; no_half_vae/vae_dtype apply to a folder's VAE; a wrong v2=/sdxl= is an error for folders and for
sdxl=False; SD1 files are never judged v-prediction by SD2's weight probe; config= applies to demo names."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from lorakit.formats.safetensors_io import load_file, save_file  # noqa: E402
from lorakit.models.demo import demo_file  # noqa: E402
from lorakit.models.detect import ModelKindError  # noqa: E402
from lorakit.models.load import load_model  # noqa: E402
from lorakit.models.save import save_diffusers  # noqa: E402

# ComfyUI's SD2 v-prediction probe (model_detection.py): a spread-out bias here means "768-v" -- for SD2 only
PROBE = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("folders") / "tiny-sd"
    save_diffusers(load_model("demo:tiny-sd"), folder)
    return folder


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("folders") / "tiny-sdxl"
    save_diffusers(load_model("demo:tiny-sdxl"), folder)
    return folder


def _saved_prediction_type(folder) -> str:
    return json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["prediction_type"]


def test_v_parameterization_overrides_an_epsilon_folder(sd_folder, tmp_path):
    assert _saved_prediction_type(sd_folder) == "epsilon"
    model = load_model(sd_folder, v_parameterization=True)
    assert model.v_parameterization
    assert model.scheduler_config["prediction_type"] == "v_prediction"
    assert model.noise_scheduler().config.prediction_type == "v_prediction"
    out = tmp_path / "v-folder"
    save_diffusers(model, out)
    assert _saved_prediction_type(out) == "v_prediction"
    assert load_model(out).v_parameterization
    # and back: v_parameterization=False on a v folder
    back = load_model(out, v_parameterization=False)
    assert not back.v_parameterization and back.scheduler_config["prediction_type"] == "epsilon"
    assert load_model(out, v_parameterization=None).v_parameterization  # None: the folder's own scheduler says


def test_folder_vae_dtype_options(sd_folder):
    model = load_model(sd_folder, dtype="fp16", no_half_vae=True)
    assert model.unet.conv_in.weight.dtype == torch.float16
    assert model.text_encoders[0].get_input_embeddings().weight.dtype == torch.float16
    assert model.vae.encoder.conv_in.weight.dtype == torch.float32
    model = load_model(sd_folder, dtype="fp16", vae_dtype="bf16")
    assert model.unet.conv_in.weight.dtype == torch.float16
    assert model.vae.encoder.conv_in.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("source,kind,wrong,right", [
    ("sd_folder", "SD1.x", {"sdxl": True}, {"sdxl": False, "v2": False}),
    ("sd_folder", "SD1.x", {"v2": True}, {"sdxl": False, "v2": False}),
    ("sdxl_folder", "SDXL", {"sdxl": False}, {"sdxl": True, "v2": False}),
    ("sdxl_folder", "SDXL", {"v2": True}, {"sdxl": True, "v2": False}),
    ("demo:tiny-sdxl", "SDXL", {"sdxl": False}, {"sdxl": True, "v2": False}),
], ids=["sd1-folder-sdxl", "sd1-folder-v2", "sdxl-folder-not-sdxl", "sdxl-folder-v2", "sdxl-file-not-sdxl"])
def test_a_wrong_kind_override_is_an_error(request, source, kind, wrong, right):
    source = request.getfixturevalue(source) if not source.startswith("demo:") else source
    (flag, value), = wrong.items()
    with pytest.raises(ModelKindError, match=rf"{flag}={value} was given but the file is an {kind} checkpoint"):
        load_model(source, **wrong)
    assert load_model(source, **right).kind == ("sdxl" if kind == "SDXL" else "sd1")


def test_sd1_file_with_a_spread_probe_bias_stays_epsilon(tmp_path):
    # sd-scripts never infers v for SD1 (only --v_parameterization says so); the std probe is ComfyUI's SD2 rule
    tensors = load_file(demo_file("demo:tiny-sd")[0])[0]
    assert PROBE in tensors
    tensors[PROBE] = torch.linspace(-0.3, 0.3, tensors[PROBE].numel())  # std 0.17 > the probe's 0.09
    path = tmp_path / "sd1-spread.safetensors"
    save_file(tensors, path)
    model = load_model(path)
    assert model.kind == "sd1" and not model.v_parameterization
    assert model.scheduler_config["prediction_type"] == "epsilon"


def test_config_applies_to_a_demo_name(sd_folder, tmp_path):
    # a config folder: tiny-sd's own configs with another noise schedule
    config = tmp_path / "config"
    config.mkdir()
    for component in ("unet", "vae", "text_encoder", "scheduler"):
        (config / component).mkdir()
        for file in (sd_folder / component).glob("*.json"):
            (config / component / file.name).write_text(file.read_text())
    scheduler_file = config / "scheduler" / "scheduler_config.json"
    scheduler = json.loads(scheduler_file.read_text())
    assert scheduler["beta_end"] != 0.02
    scheduler["beta_end"] = 0.02
    scheduler_file.write_text(json.dumps(scheduler))
    assert load_model("demo:tiny-sd", config=config).scheduler_config["beta_end"] == 0.02
    # the full-size sd15 config does not fit the tiny weights
    with pytest.raises(ModelKindError, match="match no bundled config"):
        load_model("demo:tiny-sd", config="sd15")
