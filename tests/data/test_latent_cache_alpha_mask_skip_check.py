"""skip_cache_check reuses any cache file with the arrays the run needs: an alpha_mask subset's file must hold the
mask, so a file written without alpha_mask is rebuilt rather than reused and failing when a batch reads its
mask."""

from __future__ import annotations

import numpy as np

from lorakit.data.dataset import SampleKey, TrainDataset
from lorakit.data.latent_cache import cache_latents
from lorakit.data.spec import DatasetSpec, SubsetSpec

from .conftest import write_image
from .test_latent_cache import FakeVAE


def dataset(folder, alpha_mask):
    return TrainDataset([DatasetSpec([SubsetSpec(image_dir=str(folder), alpha_mask=alpha_mask)], resolution=64)],
                        seed=1)


def test_a_file_without_the_mask_is_rebuilt_under_skip_check(tmp_path):
    pixels = write_image(str(tmp_path / "imgs/a.png"), 64, 64, mode="RGBA")
    vae = FakeVAE()
    cache_latents(dataset(tmp_path / "imgs", alpha_mask=False), vae, to_disk=True)
    masked = dataset(tmp_path / "imgs", alpha_mask=True)
    assert cache_latents(masked, vae, to_disk=True, skip_check=True) == {"encoded": 1, "reused": 0}
    mask = masked[SampleKey(0, 1, 0, 0)]["mask"]
    np.testing.assert_allclose(mask.numpy(), pixels[..., 3] / 255.0, atol=1e-6)
    assert cache_latents(masked, vae, to_disk=True, skip_check=True) == {"encoded": 0, "reused": 1}
