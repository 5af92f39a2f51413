"""NaN latents (a VAE in fp16 overflowing) stop the caching with an error naming the image and no_half_vae, as
sd-scripts' cache_batch_latents raises on NaN, instead of training on them."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from lorakit.data.dataset import TrainDataset
from lorakit.data.errors import DatasetError
from lorakit.data.latent_cache import cache_latents
from lorakit.data.spec import DatasetSpec, SubsetSpec

from .conftest import write_image
from .test_latent_cache import FakeVAE


class OverflowingVAE(FakeVAE):
    def encode(self, x):
        dist = super().encode(x).latent_dist
        mean = dist.mean.clone()
        mean[0, 0, 0, 0] = float("nan")
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=mean, std=dist.std))


def test_nan_latents_are_an_error_naming_the_image(tmp_path):
    write_image(str(tmp_path / "imgs/a.png"), 64, 64)
    ds = TrainDataset([DatasetSpec([SubsetSpec(image_dir=str(tmp_path / "imgs"))], resolution=64)], seed=1)
    with pytest.raises(DatasetError, match=r"NaN in the latents of .*a\.png.*no_half_vae"):
        cache_latents(ds, OverflowingVAE(), to_disk=True)
    assert not list((tmp_path / "imgs").glob("*.npz"))
    assert all(e.latents is None and e.cache_file is None for e in ds.entries)
