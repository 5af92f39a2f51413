"""alpha_mask and conditioning_data_dir loss masks (with and without cached latents), skip_image_resolution and
validation_split, against the files written here."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from lorakit.data.dataset import SampleKey, TrainDataset
from lorakit.data.errors import DatasetError
from lorakit.data.latent_cache import cache_latents
from lorakit.data.spec import DatasetSpec, SubsetSpec

from .conftest import write_image
from .test_latent_cache import FakeVAE


def _rgba(path, alpha):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    h, w = alpha.shape
    rgb = np.random.default_rng(3).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(path)
    return rgb


def _alpha(h=64, w=96):
    a = np.zeros((h, w), dtype=np.uint8)
    a[:, : w // 3] = 255
    a[: h // 2, w // 3:] = 128
    return a


def _sample(ds, flipped):
    """The first sample whose flip is ``flipped`` (flip_aug subsets flip half the keys)."""
    for slot in range(64):
        s = ds[SampleKey(0, 1, 0, slot)]
        if s["flipped"] == flipped:
            return s
    raise AssertionError("no such sample")


def test_alpha_mask_follows_resize_crop_and_flip(tmp_path):
    alpha = _alpha()
    rgb = _rgba(str(tmp_path / "a" / "x.png"), alpha)
    spec = DatasetSpec([SubsetSpec(image_dir=str(tmp_path / "a"), alpha_mask=True, flip_aug=True)], resolution=32)
    ds = TrainDataset(spec, seed=0, reso_multiple=8)
    # 96x64 -> 48x32 (box), centre crop 32x32: x from 8
    small_a = np.asarray(Image.fromarray(alpha, "L").resize((48, 32), Image.Resampling.BOX))[:, 8:40]
    small_rgb = np.array(Image.fromarray(rgb).resize((48, 32), Image.Resampling.BOX))[:, 8:40]
    s = _sample(ds, False)
    torch.testing.assert_close(s["mask"], torch.from_numpy(small_a / 255.0).float())
    torch.testing.assert_close(s["image"], torch.from_numpy(small_rgb).permute(2, 0, 1).float() / 127.5 - 1)
    f = _sample(ds, True)
    torch.testing.assert_close(f["mask"], torch.from_numpy(small_a[:, ::-1] / 255.0).float())
    batch = ds.collate([s, f])
    assert batch.masks.shape == (2, 32, 32)
    # an image without transparency masks nothing; a subset without alpha_mask gives no mask
    write_image(str(tmp_path / "b" / "y.png"), 32, 32)
    ds2 = TrainDataset(DatasetSpec([SubsetSpec(image_dir=str(tmp_path / "b"), alpha_mask=True)], resolution=32),
                       reso_multiple=8)
    assert torch.equal(ds2[SampleKey(0, 1, 0, 0)]["mask"], torch.ones(32, 32))
    ds3 = TrainDataset(DatasetSpec([SubsetSpec(image_dir=str(tmp_path / "b"))], resolution=32), reso_multiple=8)
    assert ds3.collate([ds3[SampleKey(0, 1, 0, 0)]]).masks is None


@pytest.mark.parametrize("to_disk", [False, True])
def test_alpha_mask_is_cached_with_the_latents(tmp_path, to_disk):
    _rgba(str(tmp_path / "a" / "x.png"), _alpha())
    spec = DatasetSpec([SubsetSpec(image_dir=str(tmp_path / "a"), alpha_mask=True, flip_aug=True)], resolution=32)
    plain = TrainDataset(spec, seed=0, reso_multiple=8)
    cached = TrainDataset(spec, seed=0, reso_multiple=8)
    cache_latents(cached, FakeVAE(), to_disk=to_disk)
    for flipped in (False, True):
        a, b = _sample(plain, flipped), _sample(cached, flipped)
        assert b["image"] is None and b["latents"] is not None
        torch.testing.assert_close(b["mask"], a["mask"])
    if to_disk:
        with np.load(cached.entries[0].cache_file) as npz:
            assert npz["alpha_mask"].shape == (32, 32)
        # skip_cache_check reuses the file without hashing; a file without the mask is rebuilt by the key check
        again = TrainDataset(spec, seed=0, reso_multiple=8)
        assert cache_latents(again, FakeVAE(), to_disk=True, skip_check=True) == {"encoded": 0, "reused": 1}
        no_mask = DatasetSpec([SubsetSpec(image_dir=str(tmp_path / "a"), flip_aug=True)], resolution=32)
        assert cache_latents(TrainDataset(no_mask, reso_multiple=8), FakeVAE(), to_disk=True)["encoded"] == 1


def test_conditioning_images_give_the_red_channel(tmp_path):
    write_image(str(tmp_path / "img" / "x.png"), 96, 64, seed=1)
    cond = np.zeros((64, 96, 3), dtype=np.uint8)
    cond[:, :48, 0] = 255
    cond[:, :, 1] = 255  # green is ignored
    os.makedirs(tmp_path / "cond")
    Image.fromarray(cond).save(tmp_path / "cond" / "x.png")
    subset = SubsetSpec(image_dir=str(tmp_path / "img"), conditioning_data_dir=str(tmp_path / "cond"), flip_aug=True)
    ds = TrainDataset(DatasetSpec([subset], resolution=32), seed=0, reso_multiple=8)
    want = np.asarray(Image.fromarray(cond).resize((48, 32), Image.Resampling.BOX))[:, 8:40, 0] / 255.0
    torch.testing.assert_close(_sample(ds, False)["mask"], torch.from_numpy(want).float())
    torch.testing.assert_close(_sample(ds, True)["mask"], torch.from_numpy(want[:, ::-1].copy()).float())
    cached = TrainDataset(DatasetSpec([subset], resolution=32), seed=0, reso_multiple=8)
    cache_latents(cached, FakeVAE())
    torch.testing.assert_close(_sample(cached, True)["mask"], torch.from_numpy(want[:, ::-1].copy()).float())
    # a training image without its mask image, and a mask of another size, are errors naming the files
    write_image(str(tmp_path / "img" / "z.png"), 96, 64)
    with pytest.raises(DatasetError, match="z.png: no mask image named z"):
        TrainDataset(DatasetSpec([subset], resolution=32), reso_multiple=8)
    Image.fromarray(cond[:32]).save(tmp_path / "cond" / "z.png")
    ds = TrainDataset(DatasetSpec([subset], resolution=32), reso_multiple=8)
    index = [i for i, e in enumerate(ds.entries) if e.path.endswith("z.png")][0]
    with pytest.raises(DatasetError, match="must be the same size"):
        ds[SampleKey(index, 1, 0, 0)]
    with pytest.raises(DatasetError, match="random_crop"):
        SubsetSpec(image_dir="i", conditioning_data_dir="c", random_crop=True)


def test_skip_image_resolution_compares_areas(tmp_path):
    for name, (w, h) in {"a": (64, 64), "b": (32, 128), "c": (65, 64), "d": (48, 48)}.items():
        write_image(str(tmp_path / "i" / f"{name}.png"), w, h)
    spec = DatasetSpec([SubsetSpec(image_dir=str(tmp_path / "i"))], resolution=64, enable_bucket=True,
                       min_bucket_reso=64, max_bucket_reso=256, skip_image_resolution="64")
    ds = TrainDataset(spec)
    assert sorted(os.path.basename(e.path) for e in ds.entries) == ["c.png"]  # 64*64 and below are left out
    assert ds.image_counts == [1]
    with pytest.raises(DatasetError, match="skip_image_resolution"):
        DatasetSpec([], skip_image_resolution="0")


def test_validation_split_holds_out_disjoint_images(tmp_path):
    for i in range(7):
        write_image(str(tmp_path / "t" / f"{i}.png"), 64, 64, seed=i)
    for i in range(3):
        write_image(str(tmp_path / "r" / f"{i}.png"), 64, 64, seed=10 + i)
    subsets = [SubsetSpec(image_dir=str(tmp_path / "t"), num_repeats=3),
               SubsetSpec(image_dir=str(tmp_path / "r"), is_reg=True)]
    spec = DatasetSpec(subsets, resolution=64, validation_split=0.3, validation_seed=5)
    train = TrainDataset(spec, seed=1)
    val = TrainDataset(spec, seed=1, validation=True)
    names = lambda ds, reg: sorted(e.path for e in ds.entries if e.is_reg is reg)  # noqa: E731
    assert len(names(val, False)) == round(7 * 0.3) == 2 and names(val, True) == []  # no reg images held out
    assert set(names(val, False)).isdisjoint(names(train, False))
    assert len(names(train, False)) == 5 and all(e.repeats == 1 for e in val.entries)
    assert all(e.repeats == 3 for e in train.entries if not e.is_reg)
    # the split is sd-scripts' shuffle: random.seed(validation_seed); random.shuffle(paths); the last part held out
    import random

    paths = sorted(str(tmp_path / "t" / f"{i}.png") for i in range(7))
    random.Random(5).shuffle(paths)
    assert names(val, False) == sorted(paths[5:])
    # without validation_seed the training seed decides, the same for both parts
    spec.validation_seed = None
    a, b = TrainDataset(spec, seed=2), TrainDataset(spec, seed=2, validation=True)
    assert set(names(a, False)).isdisjoint(names(b, False)) and len(names(b, False)) == 2
    with pytest.raises(DatasetError, match="validation_split must be in"):
        DatasetSpec(subsets, validation_split=1.0)
