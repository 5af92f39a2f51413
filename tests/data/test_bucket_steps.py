"""bucket_reso_steps reaches the buckets of a TrainDataset: sd-scripts' BucketManager.make_buckets passes
reso_steps to make_bucket_resolutions, so steps 32 (SDXL) gives buckets on a 32-pixel grid, not 64."""

from __future__ import annotations

from lorakit.data.dataset import TrainDataset
from lorakit.data.spec import DatasetSpec, SubsetSpec


def sd_scripts_buckets(area: int, min_size: int, max_size: int, steps: int) -> set[tuple[int, int]]:
    """model_util.make_bucket_resolutions, by brute force over the grid: the square, then for each width the
    tallest height on the grid that fits the area (at most max_size, dropped below min_size), and its transpose."""
    side = max(s for s in range(steps, max_size + 1, steps) if s * s <= area)
    out = {(side, side)}
    for width in range(min_size, max_size + 1, steps):
        height = max(h for h in range(steps, max_size + 1, steps) if width * h <= area)
        if height >= min_size:
            out |= {(width, height), (height, width)}
    return out


def nearest_aspect(size, buckets):
    return min(sorted(buckets), key=lambda b: abs(b[0] / b[1] - size[0] / size[1]))


SIZES = [(224, 288), (272, 256), (160, 352), (300, 200)]  # (224, 288): a bucket on the 32 grid only


def test_buckets_follow_bucket_reso_steps(tmp_path, image_factory):
    for i, (w, h) in enumerate(SIZES):
        image_factory(f"1_x/{i}.png", w, h, seed=i)
    spec = DatasetSpec([SubsetSpec(image_dir=str(tmp_path / "1_x"), class_tokens="x")], resolution=256,
                       enable_bucket=True, min_bucket_reso=128, max_bucket_reso=512, bucket_reso_steps=32)
    ds = TrainDataset([spec], reso_multiple=32)
    reference = sd_scripts_buckets(256 * 256, 128, 512, 32)
    assert (224, 288) in reference
    by_name = {e.path.rsplit("/", 1)[1]: e.choice.bucket for e in ds.entries}
    assert by_name == {f"{i}.png": nearest_aspect(size, reference) for i, size in enumerate(SIZES)}
    assert by_name["0.png"] == (224, 288)  # kept at its own size, which is not on the 64 grid
