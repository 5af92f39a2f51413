"""Loss masks in a batch that mixes a subset with alpha_mask and one without: the samples without a mask get all
ones (nothing masked), as sd-scripts gives an image without an alpha mask a mask of ones (dataset.Batch doc); the
masked sample's mask is its alpha channel / 255."""

from __future__ import annotations

import numpy as np
import torch

from lorakit.data.dataset import SampleKey, TrainDataset
from lorakit.data.spec import DatasetSpec, SubsetSpec


def test_a_sample_without_a_mask_gets_ones_beside_a_masked_one(tmp_path, image_factory):
    _, rgba = image_factory("1_a/a.png", 16, 16, seed=1, mode="RGBA")
    image_factory("1_b/b.png", 16, 16, seed=2)
    subsets = [SubsetSpec(image_dir=str(tmp_path / "1_a"), class_tokens="a", alpha_mask=True),
               SubsetSpec(image_dir=str(tmp_path / "1_b"), class_tokens="b")]
    ds = TrainDataset([DatasetSpec(subsets, resolution=16, batch_size=2)], reso_multiple=16)
    index = {e.path.rsplit("/", 1)[1]: i for i, e in enumerate(ds.entries)}
    alpha = torch.from_numpy(rgba[..., 3].astype(np.float32) / 255)
    for order in (["a.png", "b.png"], ["b.png", "a.png"]):
        batch = ds.collate([ds[SampleKey(index[name], 1, 0, slot)] for slot, name in enumerate(order)])
        masks = dict(zip(order, batch.masks))
        assert batch.masks.shape == (2, 16, 16)
        assert torch.equal(masks["b.png"], torch.ones(16, 16))
        assert torch.allclose(masks["a.png"], alpha)


def test_no_masks_when_no_sample_has_one(tmp_path, image_factory):
    image_factory("1_b/b.png", 16, 16, seed=2)
    ds = TrainDataset([DatasetSpec([SubsetSpec(image_dir=str(tmp_path / "1_b"))], resolution=16)], reso_multiple=16)
    assert ds.collate([ds[SampleKey(0, 1, 0, 0)]]).masks is None
