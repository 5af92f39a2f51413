"""SDXL crop conditioning of flipped samples with cached latents: the cache keeps the unflipped crop, so a flipped
sample's crop_top_left must be turned as the uncached path turns it (transforms.py doc: after a flip the crop counts
from the left of the flipped image); cached and uncached training see the same conditioning."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lorakit.data.dataset import SampleKey, TrainDataset
from lorakit.data.latent_cache import cache_latents
from lorakit.data.spec import DatasetSpec, SubsetSpec


class TinyVAE(torch.nn.Module):
    """The AutoencoderKL interface cache_latents uses, 8x downsampling."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 8, stride=8)

    def encode(self, x):
        mean, logvar = self.conv(x).chunk(2, dim=1)
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=mean, std=torch.exp(0.5 * logvar)))


# A 97x64 image at resolution 64: scaled by 1 and centre-cropped, 16 columns cut on the left and 17 on the right.
WIDTH, BUCKET = 97, 64
LEFT = (WIDTH - BUCKET) // 2
RIGHT = WIDTH - BUCKET - LEFT


def dataset(tmp_path, image_factory):
    image_factory("1_x/a.png", WIDTH, 64)
    spec = DatasetSpec([SubsetSpec(image_dir=str(tmp_path / "1_x"), class_tokens="x", flip_aug=True)], resolution=64)
    return TrainDataset([spec], seed=0)


KEYS = [SampleKey(0, epoch, 0, 0) for epoch in range(1, 13)]


@pytest.mark.parametrize("to_disk", [False, True])
def test_cached_flipped_samples_have_the_uncached_conditioning(tmp_path, image_factory, to_disk):
    uncached = dataset(tmp_path, image_factory)
    cached = dataset(tmp_path, image_factory)
    torch.manual_seed(0)
    cache_latents(cached, TinyVAE(), to_disk=to_disk)
    assert cached.entries[0].latents is not None or cached.entries[0].cache_file is not None
    flips = set()
    for key in KEYS:
        plain, from_cache = uncached[key], cached[key]
        assert plain["flipped"] == from_cache["flipped"]
        expected = (0, RIGHT) if plain["flipped"] else (0, LEFT)
        assert plain["conditioning"].crop_top_left == from_cache["conditioning"].crop_top_left == expected, key
        assert from_cache["conditioning"] == plain["conditioning"]
        flips.add(plain["flipped"])
    assert flips == {False, True}  # both kinds of sample were compared
