"""The dataset's order and samples: every image `repeats` times per epoch, one bucket per batch, the same batches
after a resume at (epoch, step), pixels and SDXL conditioning equal to direct crops of the files."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from lorakit.data.dataset import BatchOrder, TrainDataset, make_loader
from lorakit.data.errors import DatasetError
from lorakit.data.spec import DatasetSpec, SubsetSpec

SIZES = [(64, 64), (128, 64), (64, 128), (100, 64), (64, 64), (128, 128), (70, 140)]


def build(tmp_path, image_factory, **subset_options):
    for i, (w, h) in enumerate(SIZES):
        image_factory(f"train/a/{i}.png", w, h, seed=i, caption=f"tag{i}, red, blue, green")
    image_factory("reg/r.png", 64, 64, seed=99)
    subsets = [SubsetSpec(image_dir=str(tmp_path / "train/a"), num_repeats=3, caption_extension=".txt",
                          **subset_options),
               SubsetSpec(image_dir=str(tmp_path / "reg"), is_reg=True, class_tokens="dog")]
    spec = DatasetSpec(subsets, batch_size=2, resolution=(64, 64), enable_bucket=True, min_bucket_reso=64,
                       max_bucket_reso=128, bucket_reso_steps=64, prior_loss_weight=0.25)
    return TrainDataset(spec, seed=7, reso_multiple=64)


def run(dataset, epoch, step=0, workers=0):
    order = BatchOrder(dataset)
    order.set_position(epoch, step)
    return list(make_loader(dataset, order, max_workers=workers))


AUGMENTED = dict(shuffle_caption=True, keep_tokens=1, flip_aug=True, random_crop=True, color_aug=True,
                 caption_dropout_rate=0.2, caption_tag_dropout_rate=0.2)


def same(a, b):
    return (a.keys == b.keys and a.captions == b.captions and a.flipped == b.flipped and torch.equal(a.images, b.images)
            and torch.equal(a.crop_top_lefts, b.crop_top_lefts) and torch.equal(a.loss_weights, b.loss_weights))


def test_epoch_contents(tmp_path, image_factory):
    ds = build(tmp_path, image_factory)
    for epoch in (1, 2):
        batches = ds.batches(epoch)
        assert len(batches) == ds.steps_per_epoch
        counts = Counter(k.index for batch in batches for k in batch)
        assert counts == {i: e.repeats for i, e in enumerate(ds.entries)}
        for batch in batches:
            assert 1 <= len(batch) <= 2
            assert len({ds.entries[k.index].choice.bucket for k in batch}) == 1
    # Train 7 x 3 = 21 samples; the one reg image is repeated to 21 too.
    assert [e.repeats for e in ds.entries] == [3] * 7 + [21]
    assert [k.index for b in ds.batches(1) for k in b] != [k.index for b in ds.batches(2) for k in b]
    assert ds.batches(3) == ds.batches(3)


def test_resume_at_epoch_and_step(tmp_path, image_factory):
    ds = build(tmp_path, image_factory, **AUGMENTED)
    full = run(ds, 2)
    resumed = run(build(tmp_path, image_factory, **AUGMENTED), 2, step=5)  # a fresh dataset, as after a restart
    assert len(resumed) == len(full) - 5
    assert all(same(a, b) for a, b in zip(full[5:], resumed))
    other_epoch = run(ds, 3)
    assert not all(same(a, b) for a, b in zip(full, other_epoch))


def test_worker_processes_give_the_same_batches(tmp_path, image_factory):
    ds = build(tmp_path, image_factory, **AUGMENTED)
    in_process = run(ds, 1, step=ds.steps_per_epoch - 3)
    in_worker = run(ds, 1, step=ds.steps_per_epoch - 3, workers=1)
    assert len(in_worker) == 3 and all(same(a, b) for a, b in zip(in_process, in_worker))


def test_pixels_and_conditioning_are_the_crop_of_the_file(tmp_path, image_factory):
    _, original = image_factory("crop/a.png", 100, 64, seed=1, caption="x")
    spec = DatasetSpec([SubsetSpec(image_dir=str(tmp_path / "crop"), num_repeats=40, flip_aug=True,
                                   random_crop=True)], resolution=64)
    ds = TrainDataset(spec, seed=3)
    seen = set()
    for batch in run(ds, 1):
        image = ((batch.images[0].permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8).numpy()
        top, left = batch.crop_top_lefts[0].tolist()
        assert top == 0 and batch.original_sizes_hw[0].tolist() == [64, 100]
        assert batch.target_sizes_hw[0].tolist() == [64, 64]
        if batch.flipped[0]:
            # The crop cut `left` pixels from the left of the flipped image: 100 - 64 - left from the original's.
            expected = original[:, 100 - 64 - left: 100 - left][:, ::-1]
        else:
            expected = original[:, left: left + 64]
        assert np.array_equal(image, expected)
        seen.add((batch.flipped[0], left))
    assert len(seen) > 10  # random crops and flips both happened


def test_random_crop_without_buckets_cuts_a_window_of_the_unscaled_image(tmp_path, image_factory):
    """sd-scripts without buckets does not scale: random_crop takes a resolution-sized window anywhere in the
    image, so a large image trains as many different crops (scaled to cover first, there would be nothing to
    move along one side)."""
    _, original = image_factory("big/a.png", 160, 120, seed=2, caption="x")
    spec = DatasetSpec([SubsetSpec(image_dir=str(tmp_path / "big"), num_repeats=30, random_crop=True)],
                       resolution=64)
    seen = set()
    for batch in run(TrainDataset(spec, seed=5), 1):
        image = ((batch.images[0].permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8).numpy()
        top, left = batch.crop_top_lefts[0].tolist()
        assert batch.original_sizes_hw[0].tolist() == [120, 160]
        assert np.array_equal(image, original[top: top + 64, left: left + 64])
        seen.add((top, left))
    assert len({t for t, _ in seen}) > 5 and len({l for _, l in seen}) > 5


def test_centre_crop_and_loss_weights(tmp_path, image_factory):
    ds = build(tmp_path, image_factory)
    for batch in run(ds, 1):
        for path, weight, crop, target in zip(batch.paths, batch.loss_weights.tolist(), batch.crop_top_lefts.tolist(),
                                              batch.target_sizes_hw.tolist()):
            assert weight == (0.25 if path.endswith("reg/r.png") else 1.0)
            # Area 64x64 allows only the 64x64 bucket (128 wide would need 32 rows). 100x64 keeps its size
            # (heights already match) and loses 18 columns on each side; 70x140 is shrunk to 64x128, 32 rows a side.
            if path.endswith("/3.png"):
                assert target == [64, 64] and crop == [0, 18]
            if path.endswith("/6.png"):
                assert target == [64, 64] and crop == [32, 0]


def test_weighted_captions_in_batches(tmp_path, image_factory):
    from lorakit.models.tokenizer import tokenizers_for

    image_factory("w/a.png", caption="(red:1.5) cat")
    spec = DatasetSpec([SubsetSpec(image_dir=str(tmp_path / "w"), caption_extension=".txt")], resolution=64)
    ds = TrainDataset(spec, tokenizers=tokenizers_for("sdxl"), weighted_captions=True)
    (batch,) = run(ds, 1)
    assert len(batch.input_ids) == 2 and len(batch.token_weights) == 2
    assert batch.token_weights[0][0, 0, :4].tolist() == [1.0, 1.5, 1.0, 1.0]
    assert batch.captions == ["(red:1.5) cat"]


def test_resolution_and_bucket_errors(tmp_path, image_factory):
    image_factory("s/a.png", 100, 60)
    subsets = [SubsetSpec(image_dir=str(tmp_path / "s"))]
    with pytest.raises(DatasetError, match="resolution 96x96 must be a multiple of 64"):
        TrainDataset(DatasetSpec(subsets, resolution=96))
    with pytest.raises(DatasetError, match="bucket_reso_steps 32 must be a multiple of 64"):
        TrainDataset(DatasetSpec(subsets, resolution=128, enable_bucket=True, min_bucket_reso=64,
                                 bucket_reso_steps=32))
    with pytest.raises(DatasetError, match=r"s/a\.png: image of 100x60 pixels is too small.*\(64x0\)"):
        TrainDataset(DatasetSpec(subsets, resolution=128, enable_bucket=True, min_bucket_reso=64,
                                 bucket_no_upscale=True))
    with pytest.raises(DatasetError, match="min_bucket_reso 256 is larger than the smaller side of resolution"):
        DatasetSpec(subsets, resolution=128, enable_bucket=True)


def test_bucket_limits_follow_sd_scripts(tmp_path, image_factory, caplog):
    """bucket_no_upscale trains an image under min_bucket_reso at its own size floored to the steps (sd-scripts
    ignores min/max there); min/max_bucket_reso off the steps are rounded down/up with a warning, as sd-scripts'
    adjust_min_max_bucket_reso_by_steps does."""
    image_factory("s/small.png", 200, 200)
    image_factory("s/wide.png", 1000, 250)
    subsets = [SubsetSpec(image_dir=str(tmp_path / "s"))]
    ds = TrainDataset(DatasetSpec(subsets, resolution=512, enable_bucket=True, bucket_no_upscale=True))
    assert {e.path.rsplit("/", 1)[1]: e.choice.bucket for e in ds.entries} == {"small.png": (192, 192),
                                                                               "wide.png": (960, 192)}
    ds = TrainDataset(DatasetSpec(subsets, resolution=512, enable_bucket=True, min_bucket_reso=200,
                                  max_bucket_reso=1000))
    assert "max_bucket_reso 1000 is not a multiple of bucket_reso_steps 64; 1024 is used" in caplog.text
    assert "min_bucket_reso 200 is not a multiple of bucket_reso_steps 64; 192 is used" in caplog.text
    assert {e.path.rsplit("/", 1)[1]: e.choice.bucket for e in ds.entries}["wide.png"] == (1024, 256)
    # below one step, min_bucket_reso is one step (rounded down to 0 it divided by zero, in sd-scripts too)
    ds = TrainDataset(DatasetSpec(subsets, resolution=128, enable_bucket=True, min_bucket_reso=32,
                                  max_bucket_reso=256))
    assert "min_bucket_reso 32 is not a multiple of bucket_reso_steps 64; 64 is used" in caplog.text
    assert {e.path.rsplit("/", 1)[1]: e.choice.bucket for e in ds.entries}["wide.png"] == (256, 64)
