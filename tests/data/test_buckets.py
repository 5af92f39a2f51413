"""Bucket resolutions and assignment against hand-derived kohya values and a brute-force reference."""

from __future__ import annotations

import pytest

from lorakit.data.buckets import BucketSelector, check_bucket, make_bucket_resolutions
from lorakit.data.errors import DatasetError

# kohya make_bucket_resolutions((512, 512), 256, 1024, 64), worked by hand: for each width 256..1024 the tallest
# multiple of 64 with w*h <= 512*512 (capped at 1024, dropped below 256), its transpose, and the 512 square.
SD15_512 = [(256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576),
            (512, 512), (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256),
            (1024, 256)]


def reference_resolutions(max_reso, min_size, max_size, step):
    """Brute force over the grid: for each width, the largest height on the grid that fits the area."""
    area = max_reso[0] * max_reso[1]
    out = set()
    side = step
    while (side + step) ** 2 <= area:
        side += step
    out.add((side, side))
    for w in range(min_size, max_size + 1, step):
        fitting = [h for h in range(step, max_size + 1, step) if w * h <= area]
        if fitting and max(fitting) >= min_size:
            out |= {(w, max(fitting)), (max(fitting), w)}
    return sorted(out)


def test_sd15_512_by_hand():
    assert make_bucket_resolutions((512, 512), 256, 1024, 64) == SD15_512


@pytest.mark.parametrize("reso, lo, hi, step", [
    ((512, 512), 256, 1024, 64), ((768, 768), 256, 1024, 64), ((1024, 1024), 256, 2048, 64),
    ((1024, 1024), 640, 1536, 32), ((512, 768), 320, 960, 64), ((64, 64), 64, 128, 64), ((960, 540), 256, 1024, 32),
])
def test_resolutions_match_brute_force(reso, lo, hi, step):
    assert make_bucket_resolutions(reso, lo, hi, step) == reference_resolutions(reso, lo, hi, step)


def test_sizes_off_the_step_by_hand():
    # kohya's loop with min_size 320 and max_size 832 off the 128 step: widths 320, 448, 576, 704, 832 (while
    # width <= max_size), heights floor(409600 / w / 128) * 128 capped at 832. (832, 384) and its transpose come
    # from the last width alone: the widths never meet 384.
    assert make_bucket_resolutions((640, 640), 320, 832, 128) == [
        (320, 832), (384, 832), (448, 832), (512, 704), (576, 640), (640, 576), (640, 640), (704, 512), (832, 320),
        (832, 384), (832, 448)]


def test_select_predefined_by_hand():
    s = BucketSelector(SD15_512)
    # 1000x2000 (aspect 0.5): nearest ratio 320/704 (0.4545, error 0.045; 384/640 is 0.1 away); the image is
    # wider than the bucket's ratio, so heights match: scale 704/2000 -> 352x704, 32 columns to crop.
    c = s.select(1000, 2000)
    assert (c.bucket, c.resized) == ((320, 704), (352, 704))
    # An exact bucket size is kept as is.
    c = s.select(448, 576)
    assert (c.bucket, c.resized) == ((448, 576), (448, 576))
    # 300x300 is enlarged to the square bucket.
    assert s.select(300, 300).resized == (512, 512)


def test_select_predefined_against_brute_force():
    s = BucketSelector(SD15_512)
    for w in range(40, 2000, 97):
        for h in range(40, 2000, 113):
            c = s.select(w, h)
            errors = [abs(bw / bh - w / h) for bw, bh in SD15_512]
            if (w, h) not in SD15_512:
                assert c.bucket == SD15_512[errors.index(min(errors))]
            # The resized image covers the bucket and matches it on one side.
            assert c.resized[0] >= c.bucket[0] and c.resized[1] >= c.bucket[1]
            assert c.resized[0] == c.bucket[0] or c.resized[1] == c.bucket[1]


def test_select_no_upscale_by_hand():
    s = BucketSelector(None, max_area=512 * 512, steps=64, no_upscale=True)
    # 1000x2000 scaled to the area: 362.0x724.1; width rounded to 320 keeps the aspect exactly (320x640),
    # height rounded to 704 gives 320x704 (0.4545): the width rounding wins.
    c = s.select(1000, 2000)
    assert (c.bucket, c.resized) == ((320, 640), (320, 640))
    # Small images are never enlarged; the bucket floors each side to the step.
    c = s.select(300, 200)
    assert (c.bucket, c.resized) == ((256, 192), (300, 200))


def test_no_upscale_ignores_min_bucket_reso_and_refuses_only_empty_buckets():
    """sd-scripts with bucket_no_upscale: each image's own size floored to the steps, min/max_bucket_reso not
    used; only an image with a side under the steps (an empty bucket) is refused."""
    s = BucketSelector(None, max_area=512 * 512, steps=64, no_upscale=True)
    assert s.select(300, 200).bucket == (256, 192)
    check_bucket("small.png", (300, 200), s.select(300, 200), 64)
    with pytest.raises(DatasetError, match=r"tiny\.png: image of 40x40 pixels is too small: .*bucket_reso_steps "
                                           r"\(64\) leaves an empty bucket \(0x0\)"):
        check_bucket("tiny.png", (40, 40), s.select(40, 40), 64)
