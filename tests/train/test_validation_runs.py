"""Runs with validation_split, on the tiny SD model: what the saved adapter says about the held-out images."""

from __future__ import annotations

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from lorakit.formats.safetensors_io import read_metadata  # noqa: E402
from lorakit.train.run import train  # noqa: E402

from .test_run import _config, base  # noqa: E402,F401  (the shared model/data fixture)


def test_saved_adapter_counts_the_held_out_images(base, tmp_path):
    """sd-scripts writes ss_num_validation_images = the validation dataset's num_train_images (repeats as 1)."""
    final = train(_config(base, tmp_path, validation_split=0.34, max_train_steps=1, cache_latents=False))
    meta = read_metadata(final)
    # 6 images: round(6 * 0.34) = 2 held out, 4 train
    assert (meta["ss_num_validation_images"], meta["ss_num_train_images"]) == ("2", "4")


def test_a_split_that_holds_out_no_image_trains_without_validation(base, tmp_path, caplog, monkeypatch):
    """sd-scripts trains on without validation when validation_split is too small for the images; lorakit used to
    stop with an error."""
    from lorakit.train.logger import TrainLogger

    validations = []
    monkeypatch.setattr(TrainLogger, "validation", lambda self, *args: validations.append(args))
    final = train(_config(base, tmp_path, validation_split=0.01, max_train_steps=1, cache_latents=False))
    assert read_metadata(final)["ss_num_validation_images"] == "0" and validations == []
    assert "validation_split holds out no image (too few images for the split): training goes on without " \
           "validation" in caplog.text
