"""Where crop_to_bucket cuts, as sd-scripts' trim_and_resize_if_required: the overhang ``trim`` of each side is cut
``trim // 2`` from the top/left (the odd pixel goes to the bottom/right), or with random_crop at
``random.randint(0, trim)``, both ends included."""

from __future__ import annotations

import random

import numpy as np

from lorakit.data.buckets import BucketChoice
from lorakit.data.transforms import crop_to_bucket


def numbered_image(width, height):
    """Each pixel holds its own row and column, so a crop tells where it was cut."""
    rows, cols = np.mgrid[0:height, 0:width]
    return np.stack([rows, cols, np.zeros_like(rows)], axis=2).astype(np.uint8)


def cut_at(crop):
    return int(crop[0, 0, 0]), int(crop[0, 0, 1])


def test_an_odd_overhang_leaves_the_extra_pixel_at_the_bottom_and_right():
    # 7 wide x 9 high into 4x4: trims 3 and 5 -> cut 1 from the left and 2 from the top
    crop, cond = crop_to_bucket(numbered_image(7, 9), BucketChoice((4, 4), (7, 9)))
    assert cut_at(crop) == ((9 - 4) // 2, (7 - 4) // 2) == (2, 1)
    assert cond.crop_top_left == (2, 1)


def test_random_crop_reaches_every_offset_from_0_to_the_whole_overhang():
    image, choice = numbered_image(6, 7), BucketChoice((4, 4), (6, 7))  # trims: 2 columns, 3 rows
    rng = random.Random(0)
    cuts = {cut_at(crop_to_bucket(image, choice, rng, random_crop=True)[0]) for _ in range(200)}
    assert cuts == {(top, left) for top in range(4) for left in range(3)}


def test_random_crop_with_a_one_pixel_overhang_reaches_both_offsets():
    # trims of 1 on each side: randint(0, 1) per side, so both 0 and 1 occur (not always the top/left edge)
    image, choice = numbered_image(5, 5), BucketChoice((4, 4), (5, 5))
    rng = random.Random(0)
    cuts = {cut_at(crop_to_bucket(image, choice, rng, random_crop=True)[0]) for _ in range(100)}
    assert cuts == {(0, 0), (0, 1), (1, 0), (1, 1)}
