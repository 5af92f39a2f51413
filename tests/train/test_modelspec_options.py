"""sd-scripts' newer model-spec options (sai_model_spec.add_model_spec_arguments: metadata_usage_hint, _thumbnail,
_merged_from, _trigger_phrase, _preprocessor, _is_negative_embedding) load from an sd-scripts config and reach the
saved adapter as the modelspec.* keys sd-scripts writes."""

from __future__ import annotations

import base64
import logging

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from lorakit.formats.safetensors_io import read_metadata  # noqa: E402
from lorakit.train.config import load_train_config  # noqa: E402
from lorakit.train.run import train  # noqa: E402

from .test_metadata_values import _training_metadata  # noqa: E402
from .tiny_run import make_base, run_options  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n tiny"


def test_each_option_is_written_as_sd_scripts_writes_it(tmp_path):
    base = make_base(tmp_path / "base", images=2)
    (tmp_path / "thumb.png").write_bytes(PNG)
    given = {"metadata_usage_hint": "use 'sks' at 0.8", "metadata_merged_from": "a, b",
             "metadata_trigger_phrase": "sks dog", "metadata_preprocessor": "canny",
             "metadata_is_negative_embedding": "false", "metadata_thumbnail": str(tmp_path / "thumb.png")}
    config = load_train_config(overrides=run_options(base, tmp_path / "out", {"max_train_steps": 1}, given))
    meta = read_metadata(train(config))
    # sd-scripts copies each string as given; the thumbnail file becomes a data URL (file_to_data_url)
    assert meta["modelspec.thumbnail"] == "data:image/png;base64," + base64.b64encode(PNG).decode()
    for option, value in given.items():
        if option != "metadata_thumbnail":
            assert meta["modelspec." + option[len("metadata_"):]] == value, option


def test_a_thumbnail_data_url_is_kept_as_given():
    url = "data:image/jpeg;base64,AAAA"
    assert _training_metadata(metadata_thumbnail=url)["modelspec.thumbnail"] == url


def test_a_missing_thumbnail_is_left_out_with_a_warning_as_in_sd_scripts(caplog):
    with caplog.at_level(logging.WARNING, logger="lorakit.train.metadata"):
        meta = _training_metadata(metadata_thumbnail="/no/such/thumb.png")
    assert "modelspec.thumbnail" not in meta and "modelspec.trigger_phrase" not in meta
    assert "metadata_thumbnail left out of the metadata" in caplog.text and "/no/such/thumb.png" in caplog.text
