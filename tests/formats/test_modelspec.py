"""ModelSpec keys and values against what kohya sd-scripts (library/sai_model_spec.py, spec 1.0.1) writes."""

from __future__ import annotations

import base64
import datetime as dt
import re

import pytest
import torch

from lorakit import __version__
from lorakit.formats.modelspec import ModelSpecError, build_modelspec
from lorakit.formats.safetensors_io import read_metadata, save_file

WHEN = dt.datetime(2024, 5, 1, 12, 34, 56, 789000)
SGM = "https://github.com/Stability-AI/generative-models"
VERSION = f"lorakit/{__version__}"  # sd-scripts writes sd-scripts/<its commit>

# What sd-scripts' train_network.py writes for `--output_name my_lora` and no other metadata options:
# build_metadata(v2, v_parameterization, sdxl, lora=True, ...) with the date from the save time.
SD15_LORA = {
    "modelspec.architecture": "stable-diffusion-v1/lora",
    "modelspec.implementation": "diffusers",
    "modelspec.title": "my_lora",
    "modelspec.resolution": "512x512",
    "modelspec.date": "2024-05-01T12:34:56",
    "modelspec.sai_model_spec": "1.0.1",
    "modelspec.prediction_type": "epsilon",
    "modelspec.implementation_version": VERSION,
}
SDXL_LORA = {
    "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
    "modelspec.implementation": SGM,
    "modelspec.title": "my_lora",
    "modelspec.resolution": "1024x1024",
    "modelspec.date": "2024-05-01T12:34:56",
    "modelspec.sai_model_spec": "1.0.1",
    "modelspec.prediction_type": "epsilon",
    "modelspec.implementation_version": VERSION,
}


def test_sd15_lora_matches_sd_scripts():
    spec = build_modelspec("sd1", title="my_lora", date=WHEN)
    assert spec == SD15_LORA
    assert list(spec) == list(SD15_LORA)  # sd-scripts' key order


def test_sdxl_lora_matches_sd_scripts():
    assert build_modelspec("sdxl", title="my_lora", date=WHEN) == SDXL_LORA


def test_sd2_kinds():
    sd2 = build_modelspec("sd2", title="t", date=WHEN)
    assert sd2["modelspec.architecture"] == "stable-diffusion-v2-512/lora"
    assert (sd2["modelspec.resolution"], sd2["modelspec.prediction_type"]) == ("512x512", "epsilon")
    v = build_modelspec("sd2-v", title="t", date=WHEN)
    assert v["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert v["modelspec.implementation"] == "diffusers"
    assert (v["modelspec.resolution"], v["modelspec.prediction_type"]) == ("768x768", "v")


def test_all_options_as_sd_scripts_formats_them():
    # --metadata_author/--metadata_description/--metadata_license/--metadata_tags, --resolution 768,512,
    # --min_timestep 100 (max defaults to 1000), --clip_skip 2, --v_parameterization on SDXL.
    spec = build_modelspec(
        "sdxl",
        title="t",
        date=WHEN,
        resolution=(768, 512),
        author="me",
        description="a *style*",
        license="CreativeML Open RAIL++-M",
        tags="style, anime",
        timestep_range=(100, 1000),
        clip_skip=2,
        prediction_type="v",
    )
    assert spec == {
        "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
        "modelspec.implementation": SGM,
        "modelspec.title": "t",
        "modelspec.resolution": "768x512",
        "modelspec.description": "a *style*",
        "modelspec.author": "me",
        "modelspec.date": "2024-05-01T12:34:56",
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.license": "CreativeML Open RAIL++-M",
        "modelspec.tags": "style, anime",
        "modelspec.prediction_type": "v",
        "modelspec.timestep_range": "100,1000",
        "modelspec.encoder_layer": "2",
        "modelspec.implementation_version": VERSION,
    }


def test_checkpoint_is_sgm_without_suffix():
    spec = build_modelspec("sd1", is_lora=False, title="ckpt", date=WHEN)
    assert spec["modelspec.architecture"] == "stable-diffusion-v1"
    assert spec["modelspec.implementation"] == SGM


def test_value_forms():
    spec = build_modelspec(
        "sd1", title="t", date=dt.date(2024, 1, 2), resolution="640,640", tags=["a", "b"],
        merged_from=["x", "y"], timestep_range=500, usage_hint="use 'sks'", trigger_phrase="sks",
    )
    assert spec["modelspec.date"] == "2024-01-02"
    assert spec["modelspec.resolution"] == "640x640"
    assert spec["modelspec.tags"] == "a, b" and spec["modelspec.merged_from"] == "x, y"
    assert spec["modelspec.timestep_range"] == "500,500"
    assert spec["modelspec.usage_hint"] == "use 'sks'" and spec["modelspec.trigger_phrase"] == "sks"
    assert build_modelspec("sd1", title="t", date="2023-07-16T18:13:38Z")["modelspec.date"] == "2023-07-16T18:13:38Z"


@pytest.mark.parametrize("value", ["768x512", "768,512", (768, 512), [768, 512]])
def test_resolution_forms_give_width_x_height(value):
    """modelspec.resolution is "WxH" (sai_model_spec: f"{reso[0]}x{reso[1]}" of (width, height)); the value may
    be given in that very form, as "W,H" (sd-scripts' --resolution) or as a pair."""
    assert build_modelspec("sd1", title="t", date=WHEN, resolution=value)["modelspec.resolution"] == "768x512"


def test_default_date_is_now_without_microseconds():
    date = build_modelspec("sd1", title="t")["modelspec.date"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", date)
    assert abs(dt.datetime.fromisoformat(date) - dt.datetime.now()) < dt.timedelta(minutes=1)


def test_other_kind_needs_architecture_and_implementation():
    with pytest.raises(ModelSpecError, match="architecture"):
        build_modelspec("other", title="t", resolution=256)
    spec = build_modelspec("other", title="t", resolution=256, architecture="tiny-unet/lora", implementation="lorakit")
    assert spec["modelspec.architecture"] == "tiny-unet/lora" and spec["modelspec.resolution"] == "256x256"
    assert "modelspec.prediction_type" not in spec


def test_thumbnail_file_becomes_data_url(tmp_path):
    png = tmp_path / "t.png"
    png.write_bytes(b"\x89PNG fake")
    spec = build_modelspec("sd1", title="t", date=WHEN, thumbnail=png)
    assert spec["modelspec.thumbnail"] == "data:image/png;base64," + base64.b64encode(b"\x89PNG fake").decode()
    url = "data:image/jpeg;base64,AAAA"
    assert build_modelspec("sd1", title="t", date=WHEN, thumbnail=url)["modelspec.thumbnail"] == url


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"kind": "sd3"}, "kind"),
        ({"title": ""}, "title"),
        ({"title": 5}, "title"),
        ({"resolution": (0, 512)}, "resolution"),
        ({"resolution": "big"}, "resolution"),
        ({"resolution": (1, 2, 3)}, "resolution"),
        ({"date": "yesterday"}, "date"),
        ({"date": 1714567890}, "date"),
        ({"prediction_type": "eps"}, "prediction_type"),
        ({"timestep_range": (900, 100)}, "timestep_range"),
        ({"timestep_range": (0, 1001)}, "timestep_range"),
        ({"clip_skip": 0}, "encoder_layer"),
        ({"clip_skip": True}, "encoder_layer"),
        ({"tags": ["a,b"]}, "tags"),
        ({"tags": []}, "tags"),
        ({"author": "   "}, "author"),
        ({"thumbnail": "data:text/plain,hi"}, "thumbnail"),
        ({"thumbnail": "data:image/svg+xml,<svg/>"}, "thumbnail"),  # an image, but not base64
        ({"thumbnail": "/no/such/file.png"}, "thumbnail"),
    ],
)
def test_bad_values_name_the_key(kwargs, key):
    args = {"kind": "sd1", "title": "t", **kwargs}
    with pytest.raises(ModelSpecError, match=key):
        build_modelspec(args.pop("kind"), **args)


def test_written_and_read_back(tmp_path):
    path = tmp_path / "l.safetensors"
    spec = build_modelspec("sdxl", title="my_lora", date=WHEN)
    save_file({"a.alpha": torch.tensor(1.0)}, path, {"ss_network_dim": "4", **spec})
    assert read_metadata(path) == {"ss_network_dim": "4", **SDXL_LORA}


@pytest.mark.parametrize("kind,expected", [
    ("sd1", {"ss_v2": "False", "ss_base_model_version": "sd_v1"}),
    ("sd2", {"ss_v2": "True", "ss_base_model_version": "sd_v2"}),
    ("sdxl", {"ss_v2": "False", "ss_base_model_version": "sdxl_base_v1-0"}),
    (None, {}),
])
def test_base_model_keys_are_sd_scripts_values(kind, expected):
    """train_network.py writes ss_v2 = str(args.v2) and ss_base_model_version (model_util's "sd_v1"/"sd_v2",
    SDXL's "sdxl_base_v1-0"); keys the caller gives are kept as they are."""
    from lorakit.formats.modelspec import with_base_model_keys

    assert with_base_model_keys({"ss_output_name": "x"}, kind) == {"ss_output_name": "x", **expected}
    given = {"ss_v2": "True"}
    assert with_base_model_keys(given, kind) == given
