"""Fine-tuning metadata as sd-scripts' FineTuningDataset reads it: train_resolution is [width, height] (as
prepare_buckets_latents.py writes it); when every entry has one, those sizes are the buckets (bucketing on, also
for random_crop and without a resolution) and each image is resized to exactly its own train_resolution, whatever
its file's size; an image key finds its file with upper-case extensions too (sd-scripts' IMAGE_EXTENSIONS)."""

from __future__ import annotations

import json
import os

import pytest

from lorakit.data.dataset import SampleKey, TrainDataset
from lorakit.data.folders import subset_images
from lorakit.data.spec import DatasetSpec, SubsetSpec

# file size (w, h) and train_resolution [w, h]: "a" is 100x150 (2:3) trained at 64x128 (1:2), another aspect
IMAGES = {"a": ((100, 150), [64, 128]), "b": ((64, 64), [64, 64]), "c": ((200, 90), [128, 64])}


def metadata_dataset(tmp_path, image_factory, resolution=None, **subset_options):
    for key, ((w, h), _) in IMAGES.items():
        image_factory(f"ft/{key}.png", w, h)
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({k: {"caption": k, "train_resolution": r} for k, (_, r) in IMAGES.items()}))
    subset = SubsetSpec(image_dir=str(tmp_path / "ft"), metadata_file=str(meta), **subset_options)
    return TrainDataset([DatasetSpec([subset], resolution=resolution)], reso_multiple=64)


def by_key(ds):
    return {os.path.splitext(os.path.basename(e.path))[0]: (i, e) for i, e in enumerate(ds.entries)}


@pytest.mark.parametrize("resolution", [None, 64])
@pytest.mark.parametrize("random_crop", [False, True])
def test_each_image_is_resized_to_its_train_resolution(tmp_path, image_factory, resolution, random_crop):
    ds = metadata_dataset(tmp_path, image_factory, resolution, random_crop=random_crop)
    for key, (index, entry) in by_key(ds).items():
        width, height = IMAGES[key][1]
        assert entry.choice.bucket == entry.choice.resized == (width, height), key
        sample = ds[SampleKey(index, 1, 0, 0)]
        assert tuple(sample["image"].shape) == (3, height, width), key
        assert sample["conditioning"].crop_top_left == (0, 0)  # resized to the bucket: nothing to crop
        assert sample["conditioning"].original_size_hw == IMAGES[key][0][::-1]
    meta = ds.datasets_metadata()[0]
    assert meta["enable_bucket"] is True
    assert sorted(b["resolution"] for b in meta["bucket_info"]["buckets"].values()) == [(64, 64), (64, 128), (128, 64)]


@pytest.mark.parametrize("file_name, key", [("UP.PNG", "UP"), ("low.JPG", "low"), ("Mixed.Webp", "Mixed.Webp")])
def test_metadata_keys_find_upper_case_extensions(tmp_path, image_factory, file_name, key):
    image_factory(f"imgs/{file_name}", 8, 8)
    (tmp_path / "m.json").write_text(json.dumps({key: {"caption": "x"}}))
    images = subset_images(SubsetSpec(image_dir=str(tmp_path / "imgs"), metadata_file=str(tmp_path / "m.json")))
    assert [os.path.basename(im.path) for im in images] == [file_name]
