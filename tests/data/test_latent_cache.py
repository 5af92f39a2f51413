"""Latent caching: latents equal to a direct encoding of the cropped pixels; disk files reused when nothing
changed and rebuilt when the image, a setting or the VAE changes."""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from lorakit.data.dataset import BatchOrder, TrainDataset, make_loader
from lorakit.data.errors import DatasetError
from lorakit.data.latent_cache import cache_latents
from lorakit.data.spec import DatasetSpec, SubsetSpec

from .conftest import write_image


class FakeVAE(torch.nn.Module):
    """An 8x-downsampling Gaussian encoder with the AutoencoderKL interface the cache uses; counts images."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = torch.nn.Conv2d(3, 8, 8, stride=8)
        self.config = {"latent_channels": 4, "scaling_factor": 0.18215}
        self.encoded = 0
        self.calls = 0

    def encode(self, x):
        self.encoded += x.shape[0]
        self.calls += 1
        mean, logvar = self.conv(x).chunk(2, dim=1)
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=mean, std=torch.exp(0.5 * logvar)))


def reference_latents(vae, pixels, seed):
    """mean + std * noise, the noise drawn from ``seed``."""
    x = torch.from_numpy(pixels).permute(2, 0, 1).double().div(127.5).sub(1)[None].float()
    with torch.no_grad():
        out = vae.encode(x).latent_dist
    noise = torch.randn(out.mean.shape[1:], generator=torch.Generator().manual_seed(seed))
    return out.mean[0] + out.std[0] * noise


def make(tmp_path, flip_aug=False, resolution=64, color_aug=False, n=3):
    folder = tmp_path / "imgs"
    if not folder.exists():
        for i in range(n):
            write_image(str(folder / f"{i}.png"), 64, 64, seed=i)
    spec = DatasetSpec([SubsetSpec(image_dir=str(folder), flip_aug=flip_aug, color_aug=color_aug)],
                       resolution=resolution)
    return TrainDataset(spec, seed=1)


def npz(path):
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def test_latents_equal_direct_encoding(tmp_path):
    vae = FakeVAE()
    ds = make(tmp_path, flip_aug=True)
    assert cache_latents(ds, vae, vae_batch_size=2, to_disk=True) == {"encoded": 3, "reused": 0}
    for i, entry in enumerate(ds.entries):
        assert entry.cache_file == str(tmp_path / "imgs" / f"{i}_lorakit.npz")
        stored = npz(entry.cache_file)
        pixels = np.array(Image.open(entry.path).convert("RGB"))
        seed = int(str(stored["cache_key"])[:15], 16)  # documented: the first 15 hex digits of the cache key
        torch.testing.assert_close(torch.from_numpy(stored["latents"]), reference_latents(vae, pixels, seed),
                                   rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(torch.from_numpy(stored["latents_flipped"]),  # flipped: seed + 1
                                   reference_latents(vae, np.ascontiguousarray(pixels[:, ::-1]), seed + 1),
                                   rtol=1e-5, atol=1e-6)
        assert stored["original_size_hw"].tolist() == [64, 64] and stored["crop_top_left"].tolist() == [0, 0]


def test_disk_cache_reused_and_invalidated(tmp_path):
    vae = FakeVAE()
    ds = make(tmp_path)
    cache_latents(ds, vae, to_disk=True)
    first = {e.path: npz(e.cache_file)["latents"] for e in ds.entries}

    vae.encoded = 0
    assert cache_latents(make(tmp_path), vae, to_disk=True) == {"encoded": 0, "reused": 3}
    assert vae.encoded == 0

    # An edited image (same size, so kohya's shape check would keep its latents) is re-encoded, alone.
    write_image(str(tmp_path / "imgs/1.png"), 64, 64, seed=42)
    ds = make(tmp_path)
    assert cache_latents(ds, vae, to_disk=True) == {"encoded": 1, "reused": 2}
    assert not np.array_equal(npz(ds.entries[1].cache_file)["latents"], first[ds.entries[1].path])
    assert np.array_equal(npz(ds.entries[0].cache_file)["latents"], first[ds.entries[0].path])

    # Settings: flip_aug, another resolution (bucket), another VAE, a damaged file.
    assert cache_latents(make(tmp_path, flip_aug=True), vae, to_disk=True)["encoded"] == 3
    assert cache_latents(make(tmp_path, flip_aug=True), vae, to_disk=True)["encoded"] == 0
    assert cache_latents(make(tmp_path, resolution=128), vae, to_disk=True)["encoded"] == 3
    assert cache_latents(make(tmp_path, resolution=128), FakeVAE(seed=1), to_disk=True)["encoded"] == 3
    (tmp_path / "imgs/2_lorakit.npz").write_bytes(b"garbage")
    assert cache_latents(make(tmp_path, resolution=128), FakeVAE(seed=1), to_disk=True) == {"encoded": 1, "reused": 2}


def test_truncated_or_corrupted_cache_files_are_rebuilt(tmp_path):
    """A cache file cut short (an interrupted copy) or with a flipped byte in its data is rebuilt when caching,
    not reused to fail mid-run with a zip error."""
    vae = FakeVAE()
    cache_latents(make(tmp_path), vae, to_disk=True)
    cut, flipped = tmp_path / "imgs/0_lorakit.npz", tmp_path / "imgs/1_lorakit.npz"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    data = bytearray(flipped.read_bytes())
    start = data.index(b"latents.npy") + 200  # inside the stored latents array
    data[start] ^= 0xFF
    flipped.write_bytes(bytes(data))
    ds = make(tmp_path)
    assert cache_latents(ds, vae, to_disk=True) == {"encoded": 2, "reused": 1}
    for entry in ds.entries:
        assert npz(entry.cache_file)["latents"].shape == (4, 8, 8)


def test_images_sharing_a_stem_get_their_own_cache_files(tmp_path):
    """a.png and a.jpg in one folder: each its own file (named with its extension), reused on the next run."""
    folder = tmp_path / "imgs"
    red, blue = np.zeros((64, 64, 3), np.uint8), np.zeros((64, 64, 3), np.uint8)
    red[..., 0], blue[..., 2] = 255, 255
    folder.mkdir()
    Image.fromarray(red).save(folder / "a.png")
    Image.fromarray(blue).save(folder / "a.jpg", quality=100)
    write_image(str(folder / "b.png"), 64, 64, seed=0)

    def dataset():
        return TrainDataset(DatasetSpec([SubsetSpec(image_dir=str(folder))], resolution=64), seed=1)

    vae = FakeVAE()
    ds = dataset()
    assert cache_latents(ds, vae, to_disk=True) == {"encoded": 3, "reused": 0}
    files = {os.path.basename(e.path): os.path.basename(e.cache_file) for e in ds.entries}
    assert files == {"a.png": "a.png_lorakit.npz", "a.jpg": "a.jpg_lorakit.npz", "b.png": "b_lorakit.npz"}
    by_name = {os.path.basename(e.path): npz(e.cache_file)["latents"] for e in ds.entries}
    assert not np.array_equal(by_name["a.png"], by_name["a.jpg"])
    assert cache_latents(dataset(), vae, to_disk=True) == {"encoded": 0, "reused": 3}


def test_cache_dir_and_vae_batches(tmp_path):
    vae = FakeVAE()
    ds = make(tmp_path, n=5)
    cache_latents(ds, vae, vae_batch_size=2, to_disk=True, cache_dir=str(tmp_path / "cache"))
    assert vae.calls == 3  # 5 images of one bucket in batches of at most 2
    assert sorted(os.path.dirname(e.cache_file) for e in ds.entries) == [str(tmp_path / "cache")] * 5
    assert not list((tmp_path / "imgs").glob("*.npz"))


def test_batches_serve_cached_latents(tmp_path):
    vae = FakeVAE()
    disk, memory = make(tmp_path, flip_aug=True), make(tmp_path, flip_aug=True)
    cache_latents(disk, vae, to_disk=True)
    cache_latents(memory, vae, vae_batch_size=3)
    assert all(e.cache_file is None and e.latents is not None for e in memory.entries)
    for ds in (disk, memory):
        order = BatchOrder(ds)
        order.set_position(1)
        for batch in make_loader(ds, order, max_workers=0):
            assert batch.images is None and batch.latents.shape == (1, 4, 8, 8)
            stored = npz(disk.entries[batch.keys[0].index].cache_file)
            expected = stored["latents_flipped"] if batch.flipped[0] else stored["latents"]
            torch.testing.assert_close(batch.latents[0], torch.from_numpy(expected))


def test_cache_refused_with_pixel_augmentation(tmp_path):
    with pytest.raises(DatasetError, match=r"cache_latents cannot be used with color_aug or random_crop.*imgs"):
        cache_latents(make(tmp_path, color_aug=True), FakeVAE())
