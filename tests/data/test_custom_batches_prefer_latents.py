"""A dataset_class batch that brings both 'latents' and 'images' trains on the latents, as sd-scripts' training
step uses batch["latents"] whenever it is set and encodes the images only otherwise; the SDXL sizes then come
from the latents (times the VAE's scale factor)."""

from __future__ import annotations

import torch

from lorakit.data.custom_batches import CustomBatches
from lorakit.data.dataset import SampleKey


class BothDataset:
    def __len__(self):
        return 1

    def __getitem__(self, index):
        return {"latents": torch.full((2, 4, 8, 16), 0.5), "images": torch.zeros(2, 3, 128, 128),
                "captions": ["a", "b"]}


def test_latents_are_used_when_images_come_too():
    batch = CustomBatches(BothDataset(), "both", tokenizers=[])[SampleKey(0, 1, 0, 0)]
    assert batch.images is None and torch.equal(batch.latents, torch.full((2, 4, 8, 16), 0.5))
    assert batch.original_sizes_hw.tolist() == batch.target_sizes_hw.tolist() == [[64, 128]] * 2
