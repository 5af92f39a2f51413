"""color_aug reaches the training samples: sd-scripts' colour augmentation changes the pixels of about one sample
in three (a hue shift or a gamma; transforms.color_aug doc), and leaves the others as loaded."""

from __future__ import annotations

import numpy as np
import torch

from lorakit.data.dataset import SampleKey, TrainDataset
from lorakit.data.spec import DatasetSpec, SubsetSpec

SAMPLES = 90


def changed_samples(tmp_path, image_factory, color_aug):
    _, pixels = image_factory("1_c/c.png", 16, 16, seed=3)
    as_loaded = torch.from_numpy(pixels.astype(np.float32)).permute(2, 0, 1) / 127.5 - 1
    subset = SubsetSpec(image_dir=str(tmp_path / "1_c"), class_tokens="c", color_aug=color_aug)
    ds = TrainDataset([DatasetSpec([subset], resolution=16)], reso_multiple=16)
    images = [ds[SampleKey(0, epoch, 0, 0)]["image"] for epoch in range(1, SAMPLES + 1)]
    return [img for img in images if not torch.allclose(img, as_loaded, atol=1e-6)]


def test_about_one_sample_in_three_is_colour_augmented(tmp_path, image_factory):
    changed = changed_samples(tmp_path, image_factory, color_aug=True)
    assert 15 <= len(changed) <= 45  # binomial(90, 1/3): mean 30, sd 4.5
    # a shift or gamma drawn per sample (hue shifts are whole steps of 1.4 degrees, so some repeat)
    assert len({img.numpy().tobytes() for img in changed}) > 10


def test_without_color_aug_every_sample_is_the_image_as_loaded(tmp_path, image_factory):
    assert changed_samples(tmp_path, image_factory, color_aug=False) == []
