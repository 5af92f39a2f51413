"""BucketSelector.select against sd-scripts' BucketManager.select_bucket (train_util.py), written out here: an
image whose exact size is a predefined bucket keeps it (metadata train_resolution buckets can share an aspect
ratio), and bucket_no_upscale's reduction to the area rounds half up to the steps (round_to_steps) and rounds the
resized side it computes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lorakit.data.buckets import BucketSelector


def sd_scripts_round_to_steps(x: float, steps: int) -> int:
    x = int(x + 0.5)
    return x - x % steps


def sd_scripts_select(width, height, predefined=None, max_area=None, steps=64):
    """((bucket w, h), (resized w, h)) as sd-scripts' select_bucket gives them."""
    aspect = width / height
    if predefined is not None:
        reso = (width, height)
        if reso not in set(predefined):
            ratios = np.array([w / h for w, h in predefined])
            reso = predefined[int(np.abs(ratios - aspect).argmin())]
        scale = reso[1] / height if aspect > reso[0] / reso[1] else reso[0] / width
        return reso, (int(width * scale + 0.5), int(height * scale + 0.5))
    if width * height > max_area:
        resized_width = math.sqrt(max_area * aspect)
        resized_height = max_area / resized_width
        b_width_rounded = sd_scripts_round_to_steps(resized_width, steps)
        ar_width_rounded = b_width_rounded / sd_scripts_round_to_steps(b_width_rounded / aspect, steps)
        b_height_rounded = sd_scripts_round_to_steps(resized_height, steps)
        ar_height_rounded = sd_scripts_round_to_steps(b_height_rounded * aspect, steps) / b_height_rounded
        if abs(ar_width_rounded - aspect) < abs(ar_height_rounded - aspect):
            resized = (b_width_rounded, int(b_width_rounded / aspect + 0.5))
        else:
            resized = (int(b_height_rounded * aspect + 0.5), b_height_rounded)
    else:
        resized = (width, height)
    return (resized[0] - resized[0] % steps, resized[1] - resized[1] % steps), resized


def selected(selector, width, height):
    choice = selector.select(width, height)
    return choice.bucket, choice.resized


# Two metadata train_resolution buckets of the same aspect ratio (2:3), as prepare_buckets_latents.py can write.
SAME_ASPECT = [(512, 768), (1024, 1536)]


@pytest.mark.parametrize("size", SAME_ASPECT)
def test_an_image_of_a_bucket_size_keeps_that_bucket(size):
    assert selected(BucketSelector(SAME_ASPECT), *size) == (size, size)


def test_predefined_buckets_of_equal_aspect_match_sd_scripts():
    selector = BucketSelector(SAME_ASPECT)
    for size in [(1024, 1536), (512, 768), (1000, 1500), (600, 900), (700, 1400), (2048, 3072)]:
        assert selected(selector, *size) == sd_scripts_select(*size, predefined=SAME_ASPECT), size


@pytest.mark.parametrize("size, bucket, resized", [
    ((300, 1202), (256, 1024), (256, 1024)),  # round_to_steps rounds half up: 255.8 -> 256 (not 255 -> 192)
    ((300, 971), (256, 896), (277, 896)),  # the width matched to the rounded height: 276.6 -> 277
])
def test_no_upscale_by_hand(size, bucket, resized):
    assert sd_scripts_select(*size, max_area=512 * 512) == (bucket, resized)
    assert selected(BucketSelector(None, max_area=512 * 512, steps=64, no_upscale=True), *size) == (bucket, resized)


@pytest.mark.parametrize("max_area, steps", [(512 * 512, 64), (1024 * 1024, 32)])
def test_no_upscale_matches_sd_scripts_over_a_grid_of_sizes(max_area, steps):
    selector = BucketSelector(None, max_area=max_area, steps=steps, no_upscale=True)
    differ = [(w, h) for w in range(300, 2400, 7) for h in range(300, 2400, 11)
              if selected(selector, w, h) != sd_scripts_select(w, h, max_area=max_area, steps=steps)]
    assert differ == []
