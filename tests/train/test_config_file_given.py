"""Options set in a config file are given, as options on the command line are: sd-scripts' read_config_from_file
merges the file into the same argparse namespace as the command line, so a file's ``v_parameterization = true`` binds
as ``--v_parameterization`` does (lorakit then uses it over what it detects in the checkpoint), and a file's
network_dim meets a repeated ``network_args dim=...`` as a command-line one does."""

from __future__ import annotations

import pytest

from lorakit.algos.options import OptionError
from lorakit.train.config import load_train_config


def test_options_set_in_the_file_are_given(tmp_path):
    (tmp_path / "c.toml").write_text("v_parameterization = true\nnetwork_dim = 4\n")
    config = load_train_config(tmp_path / "c.toml", overrides={"seed": 5})
    assert {"v_parameterization", "network_dim", "seed"} <= config.given
    assert "v2" not in config.given and "sdxl" not in config.given  # defaults: left to the checkpoint


def test_a_network_dim_in_the_file_is_repeated_by_network_args_dim(tmp_path):
    (tmp_path / "c.toml").write_text('network_dim = 4\nnetwork_args = ["dim=8"]\n')
    with pytest.raises(OptionError, match="repeats option network_dim"):
        load_train_config(tmp_path / "c.toml")
