"""A latent cache file is rebuilt when the pixels it was encoded from would differ: the same bucket reached through
another resize (bucket_no_upscale crops the image at its own size, buckets scale it first), or another
resize_interpolation (latent_cache doc: the key holds the bucket, the resized size and the filter)."""

from __future__ import annotations

from lorakit.data.dataset import TrainDataset
from lorakit.data.latent_cache import cache_latents
from lorakit.data.spec import DatasetSpec, SubsetSpec

from .conftest import write_image
from .test_latent_cache import FakeVAE


def dataset(folder, **options):
    interpolation = options.pop("resize_interpolation", None)
    subset = SubsetSpec(image_dir=str(folder), resize_interpolation=interpolation)
    return TrainDataset([DatasetSpec([subset], min_bucket_reso=64, max_bucket_reso=128, **options)], seed=1)


def test_the_same_bucket_reached_by_another_resize_is_encoded_again(tmp_path):
    write_image(str(tmp_path / "imgs/a.png"), 100, 70)
    no_upscale = dataset(tmp_path / "imgs", resolution=128, enable_bucket=True, bucket_no_upscale=True)
    scaled = dataset(tmp_path / "imgs", resolution=64, enable_bucket=True)
    # both in bucket 64x64: cut from the image as it is, or from it scaled by 64/70 to 91x64
    assert [(ds.entries[0].choice.bucket, ds.entries[0].choice.resized) for ds in (no_upscale, scaled)] == [
        ((64, 64), (100, 70)), ((64, 64), (91, 64))]
    vae = FakeVAE()
    assert cache_latents(no_upscale, vae, to_disk=True) == {"encoded": 1, "reused": 0}
    assert cache_latents(scaled, vae, to_disk=True) == {"encoded": 1, "reused": 0}


def test_another_resize_filter_is_encoded_again(tmp_path):
    write_image(str(tmp_path / "imgs/a.png"), 96, 96)
    vae = FakeVAE()
    assert cache_latents(dataset(tmp_path / "imgs", resolution=64), vae, to_disk=True)["encoded"] == 1
    nearest = dataset(tmp_path / "imgs", resolution=64, resize_interpolation="nearest")
    assert cache_latents(nearest, vae, to_disk=True) == {"encoded": 1, "reused": 0}
    assert cache_latents(nearest, vae, to_disk=True) == {"encoded": 0, "reused": 1}
