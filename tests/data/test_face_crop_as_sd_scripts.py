"""face_crop_aug_range crops as sd-scripts' BaseDataset.crop_target, draw for draw (the transliteration below):
the scale drawn in [min_scale, max_scale], then per axis (height first) a shift of randint(0, r) + randint(0, r) - r
with random_crop, or a jitter of face_size // 20 only when the range's ends differ and the face is at least 40
pixels; the crop kept inside the resized image. Which file names hold a face: the last four "_" parts of a name of
five or more, with cx > 0. One documented difference: an image smaller than the training size is enlarged to cover
it (sd-scripts stops on an assert)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from lorakit.data.face_crop import crop_around_face, face_box


def sd_scripts_crop_target(height, width, face, target_hw, face_range, random_crop, rng):
    """(top, left, resized height, resized width) of sd-scripts' crop_target, drawing from ``rng``."""
    face_cx, face_cy, face_w, face_h = face
    target_h, target_w = target_hw
    face_size = max(face_w, face_h)
    size = min(target_h, target_w)
    min_scale = max(target_h / height, target_w / width)
    min_scale = min(1.0, max(min_scale, size / (face_size * face_range[1])))
    max_scale = min(1.0, max(min_scale, size / (face_size * face_range[0])))
    scale = min_scale if min_scale >= max_scale else rng.uniform(min_scale, max_scale)
    nh, nw = int(height * scale + 0.5), int(width * scale + 0.5)
    face_cx, face_cy = int(face_cx * scale + 0.5), int(face_cy * scale + 0.5)
    starts = []
    for target_size, length, face_p in zip((target_h, target_w), (nh, nw), (face_cy, face_cx)):
        p1 = face_p - target_size // 2
        if random_crop:
            r = max(length - face_p, face_p)
            p1 = p1 + (rng.randint(0, r) + rng.randint(0, r)) - r
        elif face_range[0] != face_range[1] and face_size > size // 10 and face_size >= 40:
            p1 = p1 + rng.randint(-face_size // 20, face_size // 20)
        starts.append(max(0, min(p1, length - target_size)))
    return starts[0], starts[1], nh, nw


CASES = [  # (image w, h), face (cx, cy, w, h), training size (w, h), range, random_crop
    ((200, 150), (100, 75, 60, 60), (96, 64), (2.0, 4.0), False),  # random scale, jitter (face >= 40)
    ((200, 150), (100, 75, 30, 30), (64, 64), (1.5, 2.0), False),  # a face under 40 pixels: no jitter
    ((200, 150), (100, 75, 30, 40), (64, 64), (1.5, 2.0), False),  # a face 40 pixels high: jitter
    ((200, 150), (190, 140, 30, 30), (64, 64), (2.0, 2.0), False),  # at the corner: the crop kept inside
    ((200, 150), (60, 40, 50, 50), (64, 96), (2.0, 4.0), True),  # random_crop's wide shift
    ((200, 150), (20, 130, 20, 20), (64, 64), (3.0, 3.0), True),
]


@pytest.mark.parametrize("image_size, face, size, face_range, random_crop", CASES)
def test_face_crops_follow_sd_scripts_draw_for_draw(image_size, face, size, face_range, random_crop):
    width, height = image_size
    image = np.zeros((height, width, 3), np.uint8)
    for seed in range(25):
        crop, cond, resized = crop_around_face(image, face, size, face_range, random.Random(seed), random_crop)
        top, left, nh, nw = sd_scripts_crop_target(height, width, face, size[::-1], face_range, random_crop,
                                                   random.Random(seed))
        assert (cond.crop_top_left, resized, crop.shape[:2]) == ((top, left), (nw, nh), size[::-1]), seed


def test_an_image_smaller_than_the_training_size_is_enlarged_to_cover_it():
    # 48x40 into 64x64: scale 64 / 40 = 1.6 -> 77x64 (aspect kept); face centre (24, 20) -> (38, 32)
    crop, cond, resized = crop_around_face(np.zeros((40, 48, 3), np.uint8), (24, 20, 10, 10), (64, 64), (2.0, 4.0),
                                           random.Random(0))
    assert (resized, cond.crop_top_left, crop.shape[:2]) == ((77, 64), (0, 38 - 32), (64, 64))


@pytest.mark.parametrize("name, box", [
    ("photo_200_150_60_40.png", (200, 150, 60, 40)),
    ("photo_0_150_60_40.png", None),  # sd-scripts crops around the face only when cx > 0
    ("200_150_60_40.png", None),  # four parts: no name before the box
])
def test_which_names_hold_a_face(name, box):
    assert face_box(f"/data/{name}") == box
