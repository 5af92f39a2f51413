"""Edges of `resume`: a state at the run's last step, wrong paths, a refusal's order of messages, the state an
interrupted run names, and schedule-free states, on a tiny random SD1 model."""

from __future__ import annotations

import json
import logging
import os
import shutil

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from lorakit.formats.safetensors_io import load_file, read_metadata  # noqa: E402
from lorakit.train.config import load_train_config  # noqa: E402
from lorakit.train.run import train  # noqa: E402
from lorakit.train.state import StateError, check_state_folder  # noqa: E402

from .tiny_run import make_base, run_options  # noqa: E402


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("resume_edges"), images=6)  # 3 batches of 2 per epoch


def _config(base, out, **overrides):
    return load_train_config(overrides=run_options(base, out, dict(
        network_dim=4, network_alpha=2, learning_rate=1e-2, max_train_steps=4, cache_latents=True,
        optimizer_type="AdamW", lr_scheduler="constant"), overrides))


def _same_tensors(a, b) -> bool:
    ta, tb = load_file(a)[0], load_file(b)[0]
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_a_resume_from_a_state_at_the_last_step_part_way_through_an_epoch_trains_nothing(base, tmp_path, caplog):
    """max_train_steps 4 ends after the first batch of epoch 2; resumed from its state with the same length, the run
    trains no fifth step (sd-scripts refuses such a resume): the final adapter is the state's, ss_steps stays 4."""
    first = train(_config(base, tmp_path, save_state=True))
    kept = tmp_path / "first.safetensors"
    kept.write_bytes(first.read_bytes())
    with caplog.at_level(logging.INFO, logger="lorakit.train.run"):
        again = train(_config(base, tmp_path, resume=str(tmp_path / "t-state")))
    assert _same_tensors(kept, again)
    assert read_metadata(again)["ss_steps"] == "4" and read_metadata(again)["ss_epoch"] == "2"
    assert json.loads((tmp_path / "t-state" / "train_state.json").read_text())["global_step"] == 4
    assert any("nothing is left to train" in r.getMessage() for r in caplog.records)


def _dead_pid() -> int:
    import subprocess
    import sys

    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)


def test_a_state_a_kill_left_only_as_temporaries_is_put_back_and_resumed(base, tmp_path, caplog):
    """A kill between the renames of a re-save of t-state leaves the previous state (.old) and the new one (.tmp),
    and no t-state: the next run puts the newest complete one back, resumes from it, and removes the other."""
    out = tmp_path / "out"
    train(_config(base, out, max_train_steps=2, save_state=True))
    previous = out / "previous-state"
    (out / "t-state").rename(previous)
    longer = train(_config(base, out, save_state=True, resume=str(previous)))  # t-state at step 4
    kept = tmp_path / "longer.safetensors"
    kept.write_bytes(longer.read_bytes())
    pid = _dead_pid()
    previous.rename(out / f".t-state.{pid}.0123abcd.old")
    (out / "t-state").rename(out / f".t-state.{pid}.4567abcd.tmp")
    with pytest.raises(StateError, match=r"no such folder .*left only temporary copies \(.*complete"):
        check_state_folder(out / "t-state")
    with caplog.at_level(logging.WARNING, logger="lorakit.train.run"):
        again = train(_config(base, out, resume=str(out / "t-state")))
    assert any("put back from" in r.getMessage() and ".tmp" in r.getMessage() for r in caplog.records)
    assert json.loads((out / "t-state" / "train_state.json").read_text())["global_step"] == 4
    assert _same_tensors(kept, again)  # the step-4 state: nothing left to train
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


class _ModelLoaded(Exception):
    pass


@pytest.fixture
def no_model_load(monkeypatch):
    from lorakit.train import run

    def refuse(self):
        raise _ModelLoaded
    monkeypatch.setattr(run._Run, "_load_model", refuse)


def test_a_resume_path_that_is_a_file_or_missing_is_refused_before_the_model_loads(base, tmp_path, no_model_load):
    adapter = tmp_path / "t.safetensors"
    adapter.write_bytes(b"")
    with pytest.raises(StateError, match=r"t.safetensors: is a file, not a state folder"):
        train(_config(base, tmp_path, resume=str(adapter)))
    with pytest.raises(StateError, match=r"nowhere-state: no such folder"):
        train(_config(base, tmp_path, resume=str(tmp_path / "nowhere-state")))


def test_a_refused_resume_does_not_first_announce_a_longer_run(base, tmp_path, caplog):
    train(_config(base, tmp_path, max_train_steps=2, save_state=True))
    with caplog.at_level(logging.WARNING), pytest.raises(StateError, match=r"network_dim: 4 -> 8"):
        train(_config(base, tmp_path, max_train_steps=3, network_dim=8, resume=str(tmp_path / "t-state")))
    assert not [r for r in caplog.records if "trains on to step" in r.getMessage()]


def _write_state(folder, when: float | None = None):
    folder.mkdir()
    (folder / "train_state.json").write_text("{}")
    if when is not None:
        os.utime(folder / "train_state.json", (when, when))


def test_ctrl_c_before_the_first_save_of_a_run_with_save_state_says_none_was_saved_yet(base, tmp_path, monkeypatch,
                                                                                        capsys):
    from lorakit.cli import main
    from lorakit.train import run

    def interrupted(config, explore=False):
        raise KeyboardInterrupt

    monkeypatch.setattr(run, "train", interrupted)
    args = ["train", "--pretrained_model_name_or_path", str(base / "sd.safetensors"), "--train_data_dir",
            str(base / "data"), "--output_dir", str(tmp_path), "--resolution", "64", "--save_state",
            "--save_every_n_steps", "4"]
    assert main(args) == 130
    assert capsys.readouterr().err.strip().endswith("no state was saved yet: the run stopped before its first save "
                                                    "(save_every_n_steps = 4)")


def test_ctrl_c_names_only_a_state_of_this_run(base, tmp_path, monkeypatch, capsys):
    """The state named after Ctrl-C is one this run's output_name saved during the run, or the one it resumed from;
    never another output_name's, nor an older state of the same name."""
    from lorakit.cli import main
    from lorakit.train import run

    saves = []

    def interrupted(config, explore=False):
        for name in saves:
            _write_state(tmp_path / name)
        raise KeyboardInterrupt

    monkeypatch.setattr(run, "train", interrupted)
    args = ["train", "--pretrained_model_name_or_path", str(base / "sd.safetensors"), "--train_data_dir",
            str(base / "data"), "--output_dir", str(tmp_path), "--resolution", "64", "--output_name", "b"]
    _write_state(tmp_path / "b-state", when=1e9)  # an earlier run's
    saves[:] = ["a-step00000002-state"]  # another output_name's, saved meanwhile
    assert main(args) == 130
    assert capsys.readouterr().err.strip().endswith("no state was saved to resume from (save_state = true keeps one "
                                                    "at every save)")
    saves[:] = ["b-step00000002-state", "a-step00000004-state"]
    assert main(args) == 130
    assert capsys.readouterr().err.strip().endswith(f'resume = "{tmp_path / "b-step00000002-state"}"')
    for name in saves:  # from now on, saves of earlier runs
        os.utime(tmp_path / name / "train_state.json", (1e9, 1e9))
    saves[:] = []
    assert main(args + ["--resume", str(tmp_path / "b-state")]) == 130  # nothing saved since the resume
    assert capsys.readouterr().err.strip().endswith(f'resume = "{tmp_path / "b-state"}"')


@pytest.mark.parametrize("saves", [{}, {"save_every_n_steps": 2}])
def test_a_schedule_free_run_resumes_bit_for_bit(base, tmp_path, saves):
    """The state holds the weights a schedule-free optimizer trains (train mode), not its averaged ones: the resume
    does not recompute them from the average, so it equals the uninterrupted run exactly."""
    pytest.importorskip("schedulefree")
    options = dict(optimizer_type="AdamWScheduleFree", max_train_steps=5, **saves)
    full = train(_config(base, tmp_path / "full", **options))
    assert train(_config(base, tmp_path / "part", **options), stop_at_step=2) is None
    resumed = train(_config(base, tmp_path / "part", resume=str(tmp_path / "part" / "t-step00000002-state"),
                            **options))
    assert _same_tensors(full, resumed)


def test_options_that_change_no_computation_may_change_on_resume(base, tmp_path):
    """Logging (log_tracker_name), a cache of image sizes (cache_info), modelspec metadata, and options accepted with
    no effect (tokenizer_cache_dir, zero3_save_16bit_model, ...) may differ in the resume, as the other logging,
    output and cache options may; the resumed run equals the uninterrupted one (sd-scripts lets every option
    change on resume)."""
    data = tmp_path / "data"
    shutil.copytree(base / "data", data)  # cache_info writes into the image folders
    full = train(_config(base, tmp_path / "full", train_data_dir=str(data)))
    train(_config(base, tmp_path / "part", train_data_dir=str(data)), stop_at_step=2)
    free = dict(log_tracker_name="mytracker", cache_info=True, tokenizer_cache_dir=str(tmp_path / "tok"),
                zero3_save_16bit_model=True, zero3_init_flag=True, disable_mmap_load_safetensors=True,
                metadata_trigger_phrase="a shape", metadata_usage_hint="try 0.8")
    resumed = train(_config(base, tmp_path / "part", train_data_dir=str(data), **free,
                            resume=str(tmp_path / "part" / "t-step00000002-state")))
    assert _same_tensors(full, resumed)
