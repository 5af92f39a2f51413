"""A config= folder is taken as the user wrote it: SD2's native size per prediction type (96 for 768-v, 64 for
512-base) applies to the bundled sd21 config only, never over a folder's own unet sample_size."""

from __future__ import annotations

import json
import shutil

import pytest

from lorakit.models.configs import config_dir
from lorakit.models.load import _configs


@pytest.mark.parametrize("v_pred", [True, False])
def test_a_config_folder_keeps_its_sample_size(tmp_path, v_pred):
    folder = tmp_path / "cfg"
    shutil.copytree(config_dir("tiny-sd"), folder)
    unet = folder / "unet" / "config.json"
    cfg = json.loads(unet.read_text())
    cfg["sample_size"] = 40
    unet.write_text(json.dumps(cfg))
    configs = _configs(folder, "sd2", v_pred=v_pred)
    assert configs["unet"]["sample_size"] == 40
    assert configs["scheduler"]["prediction_type"] == ("v_prediction" if v_pred else "epsilon")
