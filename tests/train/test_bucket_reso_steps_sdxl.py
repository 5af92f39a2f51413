"""bucket_reso_steps 32 is accepted before the model is known: sd-scripts requires a multiple of 64 for SD1/SD2
(train_util.verify_bucket_reso_steps) but of 32 for SDXL (sdxl_train_util's check), so the option check only
refuses what no model takes; the dataset refuses 32 for SD1/SD2 once the model is loaded."""

from __future__ import annotations

import pytest

from lorakit.algos.options import OptionError
from lorakit.train.config import load_train_config


def test_bucket_reso_steps_32_is_accepted_for_sdxl():
    assert load_train_config(overrides={"bucket_reso_steps": 32}).bucket_reso_steps == 32
    with pytest.raises(OptionError, match=r"bucket_reso_steps \(16\) must be divisible by 32"):
        load_train_config(overrides={"bucket_reso_steps": 16})


def test_a_dataset_config_may_set_bucket_reso_steps_32(tmp_path):
    path = tmp_path / "data.toml"
    path.write_text("[[datasets]]\nresolution = 64\nbucket_reso_steps = 32\n[[datasets.subsets]]\nimage_dir = 'a'\n")
    config = load_train_config(dataset_config=path)
    assert config.dataset_group.datasets[0].bucket_reso_steps == 32
    path.write_text("[[datasets]]\nresolution = 64\nbucket_reso_steps = 48\n[[datasets.subsets]]\nimage_dir = 'a'\n")
    with pytest.raises(OptionError, match=r"bucket_reso_steps \(48\) must be divisible by 32"):
        load_train_config(dataset_config=path)
