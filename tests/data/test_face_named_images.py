"""Images named like sd-scripts' detect_face_rotate.py output, ``<name>_<cx>_<cy>_<w>_<h>.<ext>``: their caption
falls back to ``<name><caption_extension>`` (sd-scripts' DreamBoothDataset read_caption, for names of 5 or more
"_" parts), and face_crop_aug_range crops around the face only without buckets (sd-scripts' __getitem__ runs
crop_target only when enable_bucket is off)."""

from __future__ import annotations

import pytest

from lorakit.data.dataset import SampleKey, TrainDataset
from lorakit.data.folders import subset_images
from lorakit.data.spec import DatasetSpec, SubsetSpec

FACE = "face_64_48_16_16.png"  # a 16x16 face centred at (64, 48)


def face_dataset(tmp_path, image_factory, enable_bucket):
    image_factory(f"1_x/{FACE}", 128, 96)
    subset = SubsetSpec(image_dir=str(tmp_path / "1_x"), class_tokens="x", face_crop_aug_range=(2.0, 4.0))
    spec = DatasetSpec([subset], resolution=64, enable_bucket=enable_bucket, min_bucket_reso=64, max_bucket_reso=128)
    return TrainDataset([spec], seed=0)


def test_with_buckets_the_face_range_does_nothing(tmp_path, image_factory):
    ds = face_dataset(tmp_path, image_factory, enable_bucket=True)
    assert ds.entries[0].face is None and ds.latent_cacheable
    # 128x96 into the 64x64 bucket: heights matched, 85.3 -> 85 columns, the centre 64 kept (10 cut on the left)
    assert (ds.entries[0].choice.bucket, ds.entries[0].choice.resized) == ((64, 64), (85, 64))
    for epoch in (1, 2, 3):
        assert ds[SampleKey(0, epoch, 0, 0)]["conditioning"].crop_top_left == (0, 10)


def test_without_buckets_the_face_is_read_from_the_name(tmp_path, image_factory):
    ds = face_dataset(tmp_path, image_factory, enable_bucket=False)
    assert ds.entries[0].face == (64, 48, 16, 16) and not ds.latent_cacheable


@pytest.mark.parametrize("own_caption, expected", [(False, "a girl, red hair"), (True, "her own caption")])
def test_a_face_named_image_reads_the_base_names_caption(tmp_path, image_factory, monkeypatch, own_caption, expected):
    # sd-scripts splits the whole path on "_": a relative folder without "_" leaves only the file name's 5 parts
    monkeypatch.chdir(tmp_path)
    image_factory("imgs/girl_40_40_20_20.png", 8, 8)
    (tmp_path / "imgs" / "girl.txt").write_text("a girl, red hair", encoding="utf-8")
    if own_caption:
        (tmp_path / "imgs" / "girl_40_40_20_20.txt").write_text("her own caption", encoding="utf-8")
    images = subset_images(SubsetSpec(image_dir="imgs", caption_extension=".txt", class_tokens="cls"))
    assert [im.caption for im in images] == [expected]
