"""Specs from a dataset TOML parsed by lorakit.train.dataset_config, and from train_data_dir options."""

from __future__ import annotations

import pytest

from lorakit.data.dataset import TrainDataset
from lorakit.data.errors import DatasetError
from lorakit.data.from_config import specs_from_config, specs_from_folders

dataset_config = pytest.importorskip("lorakit.train.dataset_config")

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib


def test_dataset_toml(tmp_path, image_factory):
    image_factory("a/0.png", 64, 64)
    image_factory("a/1.png", 128, 64, caption="red, cat", extension=".txt")
    image_factory("r/0.png", 64, 64)
    toml = f"""
    [general]
    shuffle_caption = true
    keep_tokens = 1
    caption_extension = ".txt"
    enable_bucket = true
    [[datasets]]
    resolution = 64
    batch_size = 2
    min_bucket_reso = 64
    max_bucket_reso = 128
      [[datasets.subsets]]
      image_dir = "{tmp_path / 'a'}"
      num_repeats = 4
      class_tokens = "sks cat"
      keep_tokens = 2
      flip_aug = true
      [[datasets.subsets]]
      image_dir = "{tmp_path / 'r'}"
      is_reg = true
      class_tokens = "cat"
    """
    group = dataset_config.parse_dataset_config(tomllib.loads(toml), train={"prior_loss_weight": 0.5})
    (spec,) = specs_from_config(group)
    assert (spec.resolution, spec.batch_size, spec.enable_bucket, spec.min_bucket_reso, spec.prior_loss_weight) == \
        ((64, 64), 2, True, 64, 0.5)
    train, reg = spec.subsets
    assert (train.num_repeats, train.class_tokens, train.keep_tokens, train.shuffle_caption, train.flip_aug,
            train.caption_extension) == (4, "sks cat", 2, True, True, ".txt")
    assert (reg.is_reg, reg.keep_tokens, reg.num_repeats) == (True, 1, 1)
    ds = TrainDataset(spec)
    assert [(e.caption, e.repeats) for e in ds.entries] == [("sks cat", 4), ("red, cat", 4), ("cat", 8)]


def test_train_data_dir_options(tmp_path, image_factory):
    image_factory("train/5_sks dog/0.png")
    image_factory("reg/2_dog/0.png")
    options = {"train_data_dir": str(tmp_path / "train"), "reg_data_dir": str(tmp_path / "reg"), "resolution": "64",
               "train_batch_size": 3, "flip_aug": True, "caption_extension": ".txt", "prior_loss_weight": 0.7}
    (spec,) = specs_from_folders(options)
    assert (spec.batch_size, spec.resolution, spec.prior_loss_weight) == (3, (64, 64), 0.7)
    assert [(s.num_repeats, s.class_tokens, s.is_reg, s.flip_aug) for s in spec.subsets] == \
        [(5, "sks dog", False, True), (2, "dog", True, True)]
    with pytest.raises(DatasetError, match="resolution is required"):
        specs_from_folders({"train_data_dir": str(tmp_path / "train")})
    with pytest.raises(DatasetError, match="set train_data_dir"):
        specs_from_folders({})
