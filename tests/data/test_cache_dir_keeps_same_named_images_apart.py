"""With cache_dir, two images of the same file name in different folders get their own cache files (the name holds
a hash of the image's path), so neither trains on the other's latents."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from lorakit.data.dataset import TrainDataset
from lorakit.data.latent_cache import cache_latents, read_cached
from lorakit.data.spec import DatasetSpec, SubsetSpec

from .conftest import write_image
from .test_latent_cache import FakeVAE, reference_latents


def dataset(tmp_path):
    subsets = [SubsetSpec(image_dir=str(tmp_path / name)) for name in ("one", "two")]
    return TrainDataset([DatasetSpec(subsets, resolution=64)], seed=1)


def test_same_named_images_of_two_folders_keep_their_own_latents(tmp_path):
    write_image(str(tmp_path / "one/a.png"), 64, 64, seed=1)
    write_image(str(tmp_path / "two/a.png"), 64, 64, seed=2)
    vae, cache = FakeVAE(), str(tmp_path / "cache")
    ds = dataset(tmp_path)
    assert cache_latents(ds, vae, to_disk=True, cache_dir=cache) == {"encoded": 2, "reused": 0}
    assert len({e.cache_file for e in ds.entries}) == 2
    for entry in ds.entries:
        pixels = np.array(Image.open(entry.path).convert("RGB"))
        with np.load(entry.cache_file) as npz:
            seed = int(str(npz["cache_key"])[:15], 16)
        torch.testing.assert_close(read_cached(entry)[0], reference_latents(vae, pixels, seed), rtol=1e-5, atol=1e-6)
    assert cache_latents(dataset(tmp_path), vae, to_disk=True, cache_dir=cache) == {"encoded": 0, "reused": 2}
