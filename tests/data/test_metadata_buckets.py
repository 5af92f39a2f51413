"""Fine-tuning metadata with train_resolution (sd-scripts' prepare_buckets_latents.py writes it): when every entry
of a dataset has one, sd-scripts' FineTuningDataset makes those sizes the buckets and trains each image at its own,
whatever resolution says; without a resolution, a dataset whose entries do not all have one is refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from lorakit.data.dataset import SampleKey, TrainDataset
from lorakit.data.errors import DatasetError
from lorakit.data.from_config import specs_from_config, specs_from_folders
from lorakit.data.transforms import resize
from lorakit.train.dataset_config import parse_dataset_config


def _metadata(tmp_path, entries: dict) -> str:
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps(entries), encoding="utf-8")
    return str(meta)


def _dataset(tmp_path, image_factory, resos, resolution=None, **options):
    image_factory("ft/wide.png", 256, 128, caption="unused")  # 2:1
    image_factory("ft/tall.png", 96, 192, seed=1)  # 1:2
    entries = {"wide": {"caption": "wide"}, "tall": {"caption": "tall"}}
    for key, reso in zip(entries, resos):
        if reso is not None:
            entries[key]["train_resolution"] = reso
    specs = specs_from_folders({"train_data_dir": str(tmp_path / "ft"), "in_json": _metadata(tmp_path, entries),
                                "resolution": resolution, **options})
    return TrainDataset(specs, reso_multiple=64)


@pytest.mark.parametrize("resolution", [None, (64, 64)])
def test_each_image_trains_at_its_train_resolution(tmp_path, image_factory, resolution):
    # resolution 64 would put both images in a 64x64 bucket (buckets off) or near-64x64 buckets; the metadata wins
    ds = _dataset(tmp_path, image_factory, [[128, 64], [64, 128]], resolution)
    assert {e.path.rsplit("/", 1)[1]: e.choice.bucket for e in ds.entries} == {"wide.png": (128, 64),
                                                                             "tall.png": (64, 128)}
    samples = {ds[SampleKey(i, 1, 0, 0)]["path"].rsplit("/", 1)[1]: ds[SampleKey(i, 1, 0, 0)] for i in range(2)}
    wide, tall = samples["wide.png"], samples["tall.png"]
    assert tuple(wide["image"].shape) == (3, 64, 128) and tuple(tall["image"].shape) == (3, 128, 64)
    # the whole image scaled to the bucket (no crop), its own size as SDXL's original size
    expected = resize(np.asarray(Image.open(tmp_path / "ft" / "wide.png")), (128, 64)).astype(np.float32)
    assert np.abs(wide["image"].permute(1, 2, 0).numpy() - (expected / 127.5 - 1)).max() < 1e-6
    assert wide["conditioning"].original_size_hw == (128, 256) and wide["conditioning"].crop_top_left == (0, 0)
    meta = ds.datasets_metadata()[0]
    assert meta["enable_bucket"] is True and meta["resolution"] == (None if resolution is None else resolution)
    assert sorted(b["resolution"] for b in ds.bucket_info["buckets"].values()) == [(64, 128), (128, 64)]


def test_a_train_resolution_not_an_existing_bucket_size_is_still_used_exactly(tmp_path, image_factory):
    ds = _dataset(tmp_path, image_factory, [[192, 64], [64, 128]], (64, 64), enable_bucket=True,
                  min_bucket_reso=64)
    assert sorted(e.choice.bucket for e in ds.entries) == [(64, 128), (192, 64)]


def test_entries_without_train_resolution_use_the_resolution_buckets(tmp_path, image_factory):
    ds = _dataset(tmp_path, image_factory, [[128, 64], None], (64, 64))
    assert {e.choice.bucket for e in ds.entries} == {(64, 64)}
    assert ds.datasets_metadata()[0]["enable_bucket"] is False


def test_without_resolution_every_entry_needs_a_train_resolution(tmp_path, image_factory):
    with pytest.raises(DatasetError, match="dataset 0: resolution is required, as not every metadata entry has a "
                                           "train_resolution"):
        _dataset(tmp_path, image_factory, [[128, 64], None])


@pytest.mark.parametrize("resos, options, message", [
    ([[128, 64], [64, 128]], {"bucket_no_upscale": True}, "bucket_no_upscale cannot be used when every metadata "
                                                          "entry has a train_resolution"),
    ([[128, 64], [64, 96]], {}, "train_resolution 64x96 in the metadata is not a multiple of 64"),
    ([[128, 64], [64]], {}, r"meta.json: entry 'tall': train_resolution must be \[width, height\] \(two positive "
                            r"whole numbers\), not \[64\]"),
    ([[128, 64], "64,128"], {}, "entry 'tall': train_resolution must be"),
])
def test_bad_train_resolutions_are_refused_by_name(tmp_path, image_factory, resos, options, message):
    with pytest.raises(DatasetError, match=message):
        _dataset(tmp_path, image_factory, resos, **options)


def test_a_dataset_config_without_resolution_trains_at_the_metadata_buckets(tmp_path, image_factory):
    image_factory("ft/wide.png", 256, 128)
    meta = _metadata(tmp_path, {"wide": {"caption": "wide", "train_resolution": [128, 64]}})
    group = parse_dataset_config({"datasets": [{"subsets": [{"metadata_file": meta,
                                                              "image_dir": str(tmp_path / "ft")}]}]})
    ds = TrainDataset(specs_from_config(group), reso_multiple=64)
    assert [e.choice.bucket for e in ds.entries] == [(128, 64)]
