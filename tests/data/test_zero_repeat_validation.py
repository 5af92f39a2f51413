"""sd-scripts' datasets (train_util.py DreamBoothDataset / FineTuningDataset): `num_repeats = subset.num_repeats if
self.is_training_dataset else 1`, so a subset with num_repeats 0 does not train but the validation dataset
(validation_split > 0) still takes its held-out images, once each."""

from __future__ import annotations

import logging

import pytest

from lorakit.data.dataset import TrainDataset
from lorakit.data.errors import DatasetError
from lorakit.data.from_config import specs_from_config
from lorakit.train.dataset_config import load_dataset_config

CONFIG = """
[general]
resolution = 64
caption_extension = ".txt"
[[datasets]]
validation_split = 0.5
validation_seed = 3
[[datasets.subsets]]
image_dir = '{root}/trained'
num_repeats = 2
[[datasets.subsets]]
image_dir = '{root}/held'
num_repeats = 0
"""


def folders(tmp_path, image_factory):
    for name in ("trained", "held"):
        for i in range(4):
            image_factory(f"{name}/{i}.png", 64, 64, seed=i, caption=f"{name} {i}")
    config = tmp_path / "dataset.toml"
    config.write_text(CONFIG.format(root=tmp_path), encoding="utf-8")
    return specs_from_config(load_dataset_config(config))


def folder_of(path):
    return path.replace("\\", "/").split("/")[-2]


def test_zero_repeat_subset_does_not_train_nor_count(tmp_path, image_factory, caplog):
    specs = folders(tmp_path, image_factory)
    with caplog.at_level(logging.WARNING):
        train = TrainDataset(specs, seed=1, reso_multiple=64)
    assert {folder_of(e.path) for e in train.entries} == {"trained"}
    assert train.num_train_images == 2 * 2  # 2 of 4 images left after the split, 2 repeats each
    assert [s.image_dir for s in train.subsets] == [f"{tmp_path}/trained"]
    (meta,) = train.datasets_metadata()
    assert meta["num_train_images"] == 4 and [s["image_dir"] for s in meta["subsets"]] == ["trained"]
    assert f"ignore subset with image_dir='{tmp_path}/held': num_repeats is less than 1" in caplog.text


def test_validation_takes_the_zero_repeat_subsets_held_out_images(tmp_path, image_factory):
    specs = folders(tmp_path, image_factory)
    val = TrainDataset(specs, seed=1, reso_multiple=64, validation=True)
    held = [e for e in val.entries if folder_of(e.path) == "held"]
    assert len(held) == 2 and all(e.repeats == 1 for e in held)
    assert val.num_train_images == 4  # 2 held out of each folder, once each


def test_a_dataset_of_only_zero_repeat_subsets_still_trains_nothing(tmp_path, image_factory):
    specs = folders(tmp_path, image_factory)
    only_held = [type(specs[0])([s for s in specs[0].subsets if s.num_repeats == 0], resolution=(64, 64))]
    with pytest.raises(DatasetError, match="the dataset is empty"):
        TrainDataset(only_held, seed=1, reso_multiple=64)
