"""Caption tag warmup (token_warmup_min/step), face crops (face_crop_aug_range), the cache_info file and the
in_json fine-tuning dataset, checked on real files against what sd-scripts computes."""

from __future__ import annotations

import json
import math
import os
import random

import numpy as np
import pytest
from PIL import Image

from lorakit.data import TrainDataset
from lorakit.data import info_cache
from lorakit.data.captions import process_caption
from lorakit.data.dataset import SampleKey
from lorakit.data.errors import DatasetError
from lorakit.data.face_crop import face_box
from lorakit.data.folders import subset_images
from lorakit.data.from_config import specs_from_folders
from lorakit.data.spec import CaptionOptions, DatasetSpec, SubsetSpec

TAGS = ["t0", "t1", "t2", "t3", "t4", "t5"]


def _expected_count(step, n, low, warmup):
    # sd-scripts' formula, written out independently
    return n if step >= warmup else math.floor(step * (n - low) / warmup) + low


@pytest.mark.parametrize("warmup_option, max_steps, warmup", [(4, 0, 4), (0.5, 8, 4), (0.25, 10, 2)])
def test_token_warmup_keeps_the_first_tags(warmup_option, max_steps, warmup):
    options = CaptionOptions(token_warmup_min=1, token_warmup_step=warmup_option)
    for step in range(warmup + 2):
        text = process_caption(", ".join(TAGS), options, random.Random(0), 1, step, max_steps)
        assert text.split(", ") == TAGS[: _expected_count(step, 6, 1, warmup)]


def test_token_warmup_with_keep_tokens_and_shuffle():
    options = CaptionOptions(token_warmup_min=2, token_warmup_step=3, keep_tokens=1, shuffle_caption=True)
    text = process_caption(", ".join(TAGS), options, random.Random(5), 1, 0, 0)
    tags = text.split(", ")
    assert tags[0] == "t0" and sorted(tags[1:]) == ["t1", "t2"]  # kept tag, then 2 of the first flexible tags
    assert len(process_caption(", ".join(TAGS), options, random.Random(5), 1, 3, 0).split(", ")) == 6


def test_dataset_warmup_follows_optimizer_steps(image_factory, tmp_path):
    image_factory("set/a.png", caption=", ".join(TAGS))
    subset = SubsetSpec(image_dir=str(tmp_path / "set"), caption_extension=".txt", num_repeats=4,
                        token_warmup_min=1, token_warmup_step=3)
    ds = TrainDataset([DatasetSpec([subset], resolution=64)], reso_multiple=64)
    ds.set_schedule(max_train_steps=8, gradient_accumulation_steps=2)  # 4 batches = 2 optimizer steps per epoch
    for epoch, batch, step in [(1, 0, 0), (1, 1, 0), (1, 2, 1), (1, 3, 1), (2, 0, 2), (2, 3, 3), (3, 0, 4)]:
        caption = ds[SampleKey(0, epoch, batch, 0)]["caption"]
        assert caption.split(", ") == TAGS[: _expected_count(step, 6, 1, 3)], (epoch, batch)
    val = TrainDataset([DatasetSpec([subset], resolution=64)], reso_multiple=64)
    val.validation = True  # validation batches always see the whole caption
    assert val[SampleKey(0, 1, 0, 0)]["caption"].split(", ") == TAGS


def test_token_warmup_checks():
    with pytest.raises(DatasetError, match="token_warmup_min"):
        SubsetSpec(image_dir="x", token_warmup_min=-1)
    with pytest.raises(DatasetError, match="token_warmup_step"):
        SubsetSpec(image_dir="x", token_warmup_step=-0.5)


# ----- face crops -----

def _face_image(path, size=(400, 300), box=(200, 150, 60, 60)):
    w, h = size
    cx, cy, fw, fh = box
    pixels = np.zeros((h, w, 3), np.uint8)
    pixels[..., 1] = 255
    pixels[cy - fh // 2: cy + fh // 2, cx - fw // 2: cx + fw // 2] = (255, 0, 0)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(pixels).save(path)


def test_face_box_from_file_name():
    assert face_box("/d/photo_200_150_60_40.png") == (200, 150, 60, 40)
    assert face_box("/d/my_photo_1_2_3_4.jpg") == (1, 2, 3, 4)
    assert face_box("/d/photo_1_2_3.png") is None and face_box("/d/a_b_c_d_e.png") is None


def test_face_crop_holds_the_face_at_the_asked_scale(tmp_path):
    _face_image(str(tmp_path / "s" / "face_200_150_60_60.png"))
    (tmp_path / "s" / "face.txt").write_text("person", encoding="utf-8")  # sd-scripts' caption of a face name
    subset = SubsetSpec(image_dir=str(tmp_path / "s"), caption_extension=".txt", face_crop_aug_range=(2.0, 4.0))
    ds = TrainDataset([DatasetSpec([subset], resolution=(128, 96))], reso_multiple=32)
    assert ds.entries[0].face == (200, 150, 60, 60) and ds.entries[0].caption == "person"
    assert not ds.latent_cacheable
    sides = set()
    for epoch in range(1, 13):
        sample = ds[SampleKey(0, epoch, 0, 0)]
        pixels = ((sample["image"].permute(1, 2, 0).numpy() + 1) * 127.5).round()
        assert pixels.shape == (96, 128, 3)
        red = (pixels[..., 0] > 128) & (pixels[..., 1] < 128)
        rows, cols = np.nonzero(red.any(axis=1))[0], np.nonzero(red.any(axis=0))[0]
        assert rows.size and cols.size
        assert rows[0] > 0 and cols[0] > 0 and rows[-1] < 95 and cols[-1] < 127  # the whole face is inside
        side = cols[-1] - cols[0] + 1
        # the face is 1/4 .. 1/2 of the crop's shorter side (96), never enlarged past its own size (scale <= 1)
        assert 96 / 4 - 2 <= side <= min(96 / 2, 60) + 2
        # centred, up to sd-scripts' jitter of face_size // 20 pixels
        assert abs((cols[0] + cols[-1]) / 2 - 63.5) <= 3 + 1 and abs((rows[0] + rows[-1]) / 2 - 47.5) <= 3 + 1
        sides.add(int(side))
        cond = sample["conditioning"]
        assert cond.original_size_hw == (300, 400) and cond.target_size_hw == (96, 128)
    assert len(sides) > 2  # a random scale per step


def test_face_crop_without_a_face_name_is_the_centre_crop(tmp_path):
    _face_image(str(tmp_path / "s" / "plain.png"))
    subset = SubsetSpec(image_dir=str(tmp_path / "s"), face_crop_aug_range=(2.0, 4.0))
    ds = TrainDataset([DatasetSpec([subset], resolution=(128, 96))], reso_multiple=32)
    assert ds.entries[0].face is None and ds.latent_cacheable
    with pytest.raises(DatasetError, match="face_crop_aug_range"):
        SubsetSpec(image_dir="x", face_crop_aug_range=(3.0, 2.0))
    with pytest.raises(DatasetError, match="face_crop_aug_range"):
        SubsetSpec(image_dir="x", face_crop_aug_range=(0.0, 2.0))


# ----- cache_info -----

def test_cache_info_writes_reuses_and_rebuilds(image_factory, tmp_path, monkeypatch):
    for i, (w, h) in enumerate([(64, 64), (96, 64), (64, 128)]):
        image_factory(f"c/{i}.png", w, h, seed=i, caption=f"caption {i}")
    subset = SubsetSpec(image_dir=str(tmp_path / "c"), caption_extension=".txt", cache_info=True)
    first = subset_images(subset)
    cache = tmp_path / "c" / "metadata_cache.json"
    data = json.loads(cache.read_text(encoding="utf-8"))
    assert data == {str(tmp_path / "c" / f"{i}.png"): {"caption": f"caption {i}", "resolution": list(size),
                                                       "upright_resolution": list(size)}
                    for i, size in enumerate([(64, 64), (96, 64), (64, 128)])}
    assert [im.size for im in first] == [(64, 64), (96, 64), (64, 128)]

    (tmp_path / "c" / "0.txt").write_text("edited", encoding="utf-8")
    monkeypatch.setattr(info_cache, "stored_and_upright_size", lambda path: pytest.fail("the cache was not used"))
    again = subset_images(subset)  # reused: no image opened, the cached caption kept
    assert [(im.caption, im.size) for im in again] == [(im.caption, im.size) for im in first]
    ds = TrainDataset([DatasetSpec([subset], resolution=64, enable_bucket=True, min_bucket_reso=64,
                                   max_bucket_reso=128)], reso_multiple=64)
    assert [e.size for e in ds.entries] == [(64, 64), (96, 64), (64, 128)]

    monkeypatch.undo()
    image_factory("c/3.png", 64, 64, seed=3, caption="caption 3")  # the folder changed: rebuilt
    rebuilt = subset_images(subset)
    assert [im.caption for im in rebuilt] == ["edited", "caption 1", "caption 2", "caption 3"]
    assert len(json.loads(cache.read_text(encoding="utf-8"))) == 4


def test_cache_info_of_sd_scripts_is_rebuilt_with_upright_sizes(tmp_path):
    """sd-scripts records the stored size (no EXIF orientation); lorakit trains the photo upright, so such a
    file is rebuilt, keeping sd-scripts' "resolution" and adding the upright size."""
    folder = tmp_path / "c"
    folder.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees to view: stored 96 wide x 64 high, upright 64 x 96
    Image.fromarray(np.zeros((64, 96, 3), np.uint8)).save(folder / "rot.jpg", exif=exif)
    cache = folder / "metadata_cache.json"
    cache.write_text(json.dumps({str(folder / "rot.jpg"): {"caption": "", "resolution": [96, 64]}}))
    subset = SubsetSpec(image_dir=str(folder), cache_info=True)
    assert [im.size for im in subset_images(subset)] == [(64, 96)]
    assert json.loads(cache.read_text())[str(folder / "rot.jpg")] == {"caption": "", "resolution": [96, 64],
                                                                      "upright_resolution": [64, 96]}
    assert [im.size for im in subset_images(subset)] == [(64, 96)]


# ----- in_json -----

def test_in_json_dataset_uses_the_metadata_captions(image_factory, tmp_path):
    image_factory("ft/one.png", caption="ignored")
    image_factory("ft/two.png", seed=1)
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"one": {"caption": "a photo", "tags": "red, blue", "train_resolution": [64, 64]},
                                "two": {"tags": "green"}}), encoding="utf-8")
    specs = specs_from_folders({"train_data_dir": str(tmp_path / "ft"), "in_json": str(meta), "dataset_repeats": 3,
                                "resolution": (64, 64), "caption_extension": ".txt", "cache_info": True})
    ds = TrainDataset(specs, reso_multiple=64)
    assert [(os.path.basename(e.path), e.caption, e.repeats) for e in ds.entries] == [
        ("one.png", "a photo,red, blue", 3), ("two.png", "green", 3)]
    assert ds.num_train_images == 6 and ds.steps_per_epoch == 6
    assert not (tmp_path / "ft" / "metadata_cache.json").exists()
