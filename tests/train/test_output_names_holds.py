"""OutputNames.holds: the files a run may save (sd-scripts' names: <name>.ext, <name>-%06d.ext for epochs,
<name>-step%08d.ext for steps; unnamed: last, epoch, at). lorakit explore refuses network_weights that it holds, or
the rates file would overwrite the user's adapter."""

from __future__ import annotations

import pytest

from lorakit.algos.options import OptionError
from lorakit.train.config import load_train_config
from lorakit.train.outputs import OutputNames
from lorakit.train.run import _check_explore


@pytest.mark.parametrize("name,held", [
    ("t.safetensors", True), ("t-000002.safetensors", True), ("t-step00000010.safetensors", True),
    ("t-step10.safetensors", False), ("t-02.safetensors", False), ("t-000002.ckpt", False), ("u.safetensors", False),
    ("t-step00000010-state", False),
])
def test_a_named_run_holds_its_final_epoch_and_step_saves(tmp_path, name, held):
    assert OutputNames(tmp_path, "t").holds(tmp_path / name) is held


def test_an_unnamed_run_holds_sd_scripts_default_names(tmp_path):
    names = OutputNames(tmp_path, None)
    assert [names.holds(tmp_path / n) for n in ("last.safetensors", "epoch-000003.safetensors",
                                               "at-step00000004.safetensors", "t.safetensors")] == [
        True, True, True, False]
    assert not OutputNames(tmp_path / "other", None).holds(tmp_path / "last.safetensors")  # another folder


def test_explore_refuses_to_overwrite_a_step_save(tmp_path):
    config = load_train_config(overrides=dict(output_dir=str(tmp_path), output_name="t",
                                              network_weights=[str(tmp_path / "t-step00000010.safetensors")]))
    with pytest.raises(OptionError, match="the adapter would be overwritten"):
        _check_explore(config)
