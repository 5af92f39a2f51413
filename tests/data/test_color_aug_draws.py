"""color_aug draws as sd-scripts' AugHelper.color_aug does: ``random() <= 0.33`` applies it, then ``random() > 0.5``
picks a hue shift of ``uniform(-8, 8)`` OpenCV hue units (180 per turn: up to 16 degrees), else a gamma of
``uniform(0.95, 1.05)`` (applied to [0, 1] values, transforms.py doc). The reference below replays those draws."""

from __future__ import annotations

import random

import numpy as np
from PIL import Image

from lorakit.data.transforms import color_aug

# row 0, saturated colours: the Pillow HSV round trip moves their hue by at most one unit (of 256 per turn);
# row 1, mid-tones: a gamma changes them (it leaves 0 and 255 as they are)
IMAGE = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0]],
                  [[128, 64, 32], [200, 100, 50], [30, 60, 90], [90, 180, 250]]], dtype=np.uint8)
SEEDS = range(80)


def sd_scripts_draws(seed):
    rng = random.Random(seed)
    if not rng.random() <= 0.33:
        return "none", None
    if rng.random() > 0.5:
        opencv_units = rng.uniform(-8, 8)
        return "hue", round(opencv_units * 2 * 256 / 360)  # OpenCV unit = 2 degrees; Pillow: 256 per 360 degrees
    return "gamma", rng.uniform(0.95, 1.05)


def hue_units(image):
    return np.asarray(Image.fromarray(image[:1]).convert("HSV"))[..., 0].astype(int)


def test_the_draws_pick_none_hue_or_gamma_as_sd_scripts():
    draws = [sd_scripts_draws(seed) for seed in SEEDS]
    assert {kind for kind, _ in draws} == {"none", "hue", "gamma"}  # the seeds reach all three branches
    # some shifts of 8+ Pillow units (11+ degrees): more than +-8 OpenCV units read as degrees could give
    assert any(kind == "hue" and abs(value) >= 8 for kind, value in draws)
    for seed in SEEDS:
        kind, value = sd_scripts_draws(seed)
        out = color_aug(IMAGE, random.Random(seed))
        if kind == "none":
            assert np.array_equal(out, IMAGE), seed
        elif kind == "gamma":
            expected = np.clip(np.rint(255.0 * (IMAGE / 255.0) ** value), 0, 255).astype(np.uint8)
            assert np.array_equal(out, expected), seed
        else:
            shift = (hue_units(out) - hue_units(IMAGE) + 128) % 256 - 128
            assert np.abs(shift - value).max() <= 1, (seed, value, shift)

