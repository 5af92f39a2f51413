"""How cache_latents batches the VAE: images of different buckets never share a batch (their pixels cannot be
stacked), and in a batch mixing subsets only flip_aug subsets get flipped latents (latent_cache doc: a file holds
the flipped latents with flip_aug)."""

from __future__ import annotations

import numpy as np

from lorakit.data.dataset import TrainDataset
from lorakit.data.latent_cache import cache_latents
from lorakit.data.spec import DatasetSpec, SubsetSpec

from .conftest import write_image
from .test_latent_cache import FakeVAE


def test_images_of_two_buckets_are_encoded_in_two_batches(tmp_path):
    for name in ("small", "large"):
        write_image(str(tmp_path / name / "a.png"), 128, 128)
    specs = [DatasetSpec([SubsetSpec(image_dir=str(tmp_path / "small"))], resolution=64),
             DatasetSpec([SubsetSpec(image_dir=str(tmp_path / "large"))], resolution=128)]
    ds, vae = TrainDataset(specs, seed=1), FakeVAE()
    assert cache_latents(ds, vae, vae_batch_size=4) == {"encoded": 2, "reused": 0}
    assert vae.calls == 2
    assert sorted(tuple(e.latents.shape) for e in ds.entries) == [(4, 8, 8), (4, 16, 16)]


def test_only_flip_aug_subsets_get_flipped_latents(tmp_path):
    for name in ("flip", "plain"):
        write_image(str(tmp_path / name / "a.png"), 64, 64)
    subsets = [SubsetSpec(image_dir=str(tmp_path / "flip"), flip_aug=True),
               SubsetSpec(image_dir=str(tmp_path / "plain"))]
    vae = FakeVAE()
    disk, memory = (TrainDataset([DatasetSpec(subsets, resolution=64)], seed=1) for _ in range(2))
    cache_latents(disk, vae, vae_batch_size=2, to_disk=True, cache_dir=str(tmp_path / "cache"))
    cache_latents(memory, vae, vae_batch_size=2)
    assert vae.calls == 4  # per run: one batch of both images, and the flipped one
    for entry in disk.entries:
        with np.load(entry.cache_file) as npz:
            assert ("latents_flipped" in npz.files) == ("flip" in entry.path.split("/")[-2]), entry.path
    assert {e.path.split("/")[-2]: e.latents_flipped is not None for e in memory.entries} == {
        "flip": True, "plain": False}
