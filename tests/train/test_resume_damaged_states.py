"""A state folder that was damaged, or written by another lorakit version, is refused with the folder and the file
named (never a raw Python error, never a counter read as 0); a data path spelled another way is the same setting."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from lorakit.formats.safetensors_io import load_file, save_file  # noqa: E402
from lorakit.models.demo_data import write_concept_folder  # noqa: E402
from lorakit.train.config import load_train_config  # noqa: E402
from lorakit.train.run import train  # noqa: E402
from lorakit.train.state import StateError  # noqa: E402


@pytest.fixture(scope="module")
def state(tmp_path_factory):
    """A 2-step run's state folder, and the data folder it trained on."""
    root = tmp_path_factory.mktemp("damaged_states")
    write_concept_folder(root / "data", n=2, repeats=1, size=64)
    train(_config(root / "data", root / "out", max_train_steps=2, save_state=True))
    return root / "out" / "t-state", root / "data"


def _config(data, out, **overrides):
    values = dict(pretrained_model_name_or_path="demo:tiny-sd", train_data_dir=str(data), resolution="64",
                  output_dir=str(out), output_name="t", network_dim=2, learning_rate=1e-3, max_train_steps=3,
                  train_batch_size=1, seed=3, max_data_loader_n_workers=0, optimizer_type="AdamW",
                  lr_scheduler="constant", network_train_unet_only=True)
    values.update(overrides)
    return load_train_config(overrides=values)


def _damaged(state, tmp_path, change):
    folder = tmp_path / "t-state"
    shutil.copytree(state, folder)
    change(folder)
    return folder


def _edit_json(edit):
    def change(folder):
        path = folder / "train_state.json"
        info = json.loads(path.read_text())
        path.write_text(json.dumps(edit(info)))
    return change


def _without(key):
    def edit(info):
        del info[key]
        return info
    return edit


def _optimizer_file(value):
    return lambda folder: torch.save(value, folder / "optimizer.pt")


def _network_of_other_shapes(folder):
    tensors = {k: torch.zeros(*v.shape[:-1], v.shape[-1] + 1) if v.dim() else v
               for k, v in load_file(folder / "network.safetensors")[0].items()}
    save_file(tensors, folder / "network.safetensors")


@pytest.mark.parametrize("change, message", [
    (_edit_json(lambda info: {**info, "format": 2}), "state format 2 is not 1"),
    (_edit_json(lambda info: {**info, "new_counter": 1}), "train_state.json has fields this lorakit does not know "
                                                          r"\(new_counter; saved by a newer version\?\)"),
    (_edit_json(lambda info: [info]), "train_state.json holds a list"),
    (_edit_json(lambda info: {**info, "global_step": "2"}), r"train_state.json: global_step = '2' \(expected whole"),
    (_edit_json(_without("global_step")), r"global_step = None \(expected whole numbers >= 0\)"),
    (_optimizer_file({"something": {}}), r"optimizer.pt is not a lorakit optimizer state \(expected optimizer and "
                                          "scheduler states\\)"),
    (_network_of_other_shapes, "network.safetensors does not fit this run's network"),
    (_edit_json(lambda info: {**info, "epoch": 0}), r"train_state.json: epoch = 0 \(epochs count from 1\)"),
    (_edit_json(lambda info: {**info, "step_in_epoch": 99}), "train_state.json: step_in_epoch = 99 is past the 2 "
                                                             "batches of an epoch"),
    (_edit_json(lambda info: {**info, "epoch": 9}), r"train_state.json: epoch = 9, step_in_epoch = 0 do not fit "
                                                    r"global_step = 2 \(that position is step 16"),
    (_edit_json(lambda info: {**info, "seed": "abc"}), r"train_state.json: seed = 'abc' \(expected a whole number"),
], ids=["format", "unknown_field", "not_an_object", "string_counter", "missing_counter", "foreign_optimizer",
        "other_shapes", "epoch_0", "step_past_the_epoch", "epoch_past_the_steps", "string_seed"])
def test_a_damaged_or_foreign_state_is_refused_naming_the_folder_and_file(state, tmp_path, change, message):
    folder = _damaged(state[0], tmp_path, change)
    with pytest.raises(StateError, match=f"resume={folder}: .*{message}"):
        train(_config(state[1], tmp_path / "out", resume=str(folder)))


def test_a_damaged_seed_is_refused_before_a_seedless_run_takes_it(state, tmp_path):
    """A config without seed takes the state's (read before the model loads): one that is not a whole number is
    refused naming the state and the key, not passed on as the run's seed."""
    folder = _damaged(state[0], tmp_path, _edit_json(lambda info: {**info, "seed": "abc"}))
    with pytest.raises(StateError, match=rf"resume={folder}: train_state.json: seed = 'abc'"):
        train(_config(state[1], tmp_path / "out", resume=str(folder), seed=None))


def test_the_data_folder_spelled_another_way_is_the_same_setting(state, tmp_path, monkeypatch):
    folder, data = state
    monkeypatch.chdir(data.parent)
    final = train(_config("./data/", tmp_path / "out", resume=str(folder)))  # saved as the absolute path
    assert final.exists()
    with pytest.raises(StateError, match="different training settings"):  # another folder still counts
        other = tmp_path / "other"
        shutil.copytree(data, other)
        train(_config(other, tmp_path / "out2", resume=str(folder)))
