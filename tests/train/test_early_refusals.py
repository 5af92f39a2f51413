"""What the config alone shows cannot train is refused before any model loads, naming the option or folder."""

from __future__ import annotations

import sys

import pytest

from lorakit.data.errors import DatasetError
from lorakit.data.folders import subsets_from_folders
from lorakit.train.checks import check_runnable
from lorakit.train.config import OptionError, load_train_config


def _config(**overrides):
    base = {"pretrained_model_name_or_path": "demo:tiny-sd", "output_dir": "out", "train_data_dir": "data",
            "resolution": "64"}
    return load_train_config(overrides={**base, **overrides})


def test_a_missing_optimizer_package_is_refused_from_the_config(monkeypatch):
    monkeypatch.setitem(sys.modules, "prodigyopt", None)  # import prodigyopt raises ImportError
    with pytest.raises(OptionError, match="optimizer_type 'Prodigy' needs the package 'prodigyopt', which is not "
                                          "installed: pip install prodigyopt"):
        check_runnable(_config(optimizer_type="Prodigy", learning_rate=1.0))


@pytest.mark.parametrize("overrides", [
    {"learning_rate": 0.0},
    {"learning_rate": 1e-4, "unet_lr": 0.0, "text_encoder_lr": 0.0},
    {"learning_rate": 0.0, "network_train_unet_only": True},
    {"learning_rate": 1e-4, "unet_lr": 0.0, "network_train_unet_only": True},
    {"learning_rate": 1e-4, "text_encoder_lr": 0.0, "network_train_text_encoder_only": True},
])
def test_every_learning_rate_zero_is_refused_by_name(overrides):
    with pytest.raises(OptionError, match="every learning rate is 0 .*nothing would train"):
        check_runnable(_config(**overrides))


@pytest.mark.parametrize("overrides", [
    {"learning_rate": 1e-4, "text_encoder_lr": 0.0},  # the U-Net still trains
    {"learning_rate": 0.0, "unet_lr": 1e-4},
    {"learning_rate": 0.0, "text_encoder_lr": 1e-4, "network_train_text_encoder_only": True},
])
def test_a_part_at_lr_0_is_fine_while_another_trains(overrides):
    check_runnable(_config(**overrides))


def test_train_data_dir_whose_concept_folders_all_have_0_repeats_names_it(tmp_path):
    (tmp_path / "0_t").mkdir()
    (tmp_path / "0_u").mkdir()
    with pytest.raises(DatasetError, match=r"train_data_dir: every concept folder has 0 repeats \(0_t, 0_u\), so "
                                           "nothing trains"):
        subsets_from_folders(tmp_path)
    (tmp_path / "reg" / "0_r").mkdir(parents=True)
    (tmp_path / "1_t").mkdir()
    assert [s.num_repeats for s in subsets_from_folders(tmp_path, tmp_path / "reg")] == [1]


def test_a_missing_sample_prompts_file_is_refused_before_the_model_loads(tmp_path):
    """It was found only when sampling began, after the model load and the caches (and left a config behind)."""
    with pytest.raises(OptionError, match=r"sample_prompts=.*typo.txt: no such file"):
        check_runnable(_config(sample_prompts=str(tmp_path / "typo.txt")))
    with pytest.raises(OptionError, match=r"sample_prompts=.*: is a folder"):
        check_runnable(_config(sample_prompts=str(tmp_path)))
    (tmp_path / "prompts.txt").write_text("a cat\n")
    check_runnable(_config(sample_prompts=str(tmp_path / "prompts.txt")))
