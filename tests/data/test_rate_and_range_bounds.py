"""The edge values sd-scripts accepts: a dropout rate of 1 (every caption, or every tag, dropped) and a
face_crop_aug_range with low == high (one fixed face scale, without the jitter sd-scripts' crop_target adds only
when the two differ)."""

from __future__ import annotations

import random

from lorakit.data.captions import process_caption
from lorakit.data.dataset import SampleKey, TrainDataset
from lorakit.data.spec import DatasetSpec, SubsetSpec


def test_a_caption_dropout_rate_of_1_drops_every_caption(tmp_path):
    subset = SubsetSpec(image_dir=str(tmp_path), caption_dropout_rate=1.0)
    assert {process_caption("a, b", subset, random.Random(seed), 1) for seed in range(20)} == {""}


def test_a_tag_dropout_rate_of_1_drops_every_tag_but_the_kept_ones(tmp_path):
    subset = SubsetSpec(image_dir=str(tmp_path), caption_tag_dropout_rate=1.0, keep_tokens=1)
    assert {process_caption("a, b, c", subset, random.Random(seed), 1) for seed in range(20)} == {"a"}


def test_an_equal_face_range_crops_at_one_scale_without_jitter(tmp_path, image_factory):
    # a 48x48 face centred at (64, 48) of a 128x96 image, 64x64 training size, range (1.5, 1.5):
    # scale = 64 / (48 * 1.5) = 0.889 -> 114x85; face centre (57, 43) -> the crop's top-left (43 - 32, 57 - 32)
    image_factory("1_f/f_64_48_48_48.png", 128, 96)
    subset = SubsetSpec(image_dir=str(tmp_path / "1_f"), class_tokens="f", face_crop_aug_range=(1.5, 1.5))
    ds = TrainDataset([DatasetSpec([subset], resolution=64)], seed=0)
    for epoch in range(1, 6):
        cond = ds[SampleKey(0, epoch, 0, 0)]["conditioning"]
        assert (cond.original_size_hw, cond.crop_top_left, cond.target_size_hw) == ((96, 128), (11, 25), (64, 64))
