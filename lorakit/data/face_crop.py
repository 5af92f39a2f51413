"""sd-scripts' ``face_crop_aug_range``: images named ``<name>_<cx>_<cy>_<w>_<h>.<ext>`` (a face box's centre and
size in pixels, as sd-scripts' detect_face_rotate.py writes them) are cropped around the face at a random scale, so
the face fills between 1/high and 1/low of the crop's shorter side. It applies to datasets without buckets, as in
sd-scripts (BaseDataset.crop_target); its random draws (scale, then a jitter per axis) follow sd-scripts' order.

One difference: an image smaller than the training size is enlarged to cover it (sd-scripts stops on an assert).
"""

from __future__ import annotations

import os
import random

import numpy as np

from .transforms import Conditioning, resize

__all__ = ["face_box", "crop_around_face"]


def face_box(path: str) -> tuple[int, int, int, int] | None:
    """(cx, cy, w, h) from a file name ending in ``_cx_cy_w_h``, or None (as sd-scripts: the last four "_" parts,
    integers; a name with fewer parts has no face)."""
    parts = os.path.splitext(os.path.basename(path))[0].split("_")
    if len(parts) < 5:
        return None
    try:
        box = tuple(int(p) for p in parts[-4:])
    except ValueError:
        return None
    return box if box[0] > 0 else None  # sd-scripts crops around the face only when cx > 0


def crop_around_face(image: np.ndarray, face: tuple[int, int, int, int], size: tuple[int, int],
                     face_range: tuple[float, float], rng: random.Random, random_crop: bool = False,
                     interpolation: str | None = None) -> tuple[np.ndarray, Conditioning, tuple[int, int]]:
    """The crop of ``image`` [H, W, C] at ``size`` (width, height) around ``face``; with its SDXL conditioning and
    the resized size (width, height) it was cut from."""
    height, width = image.shape[:2]
    target_w, target_h = size
    original = (height, width)
    if (width, height) == (target_w, target_h):
        return image, Conditioning(original, (0, 0), original), (width, height)
    face_cx, face_cy, face_w, face_h = face
    face_size = max(face_w, face_h, 1)
    short = min(target_w, target_h)
    cover = max(target_h / height, target_w / width)  # the smallest scale that still fills the crop
    min_scale = min(1.0, max(cover, short / (face_size * face_range[1])))
    max_scale = min(1.0, max(min_scale, short / (face_size * face_range[0])))
    scale = min_scale if min_scale >= max_scale else rng.uniform(min_scale, max_scale)
    scale = max(scale, cover)
    nw, nh = max(target_w, int(width * scale + 0.5)), max(target_h, int(height * scale + 0.5))
    image = resize(image, (nw, nh), interpolation)
    starts = []
    centres = (int(face_cy * scale + 0.5), int(face_cx * scale + 0.5))
    for target, length, centre in zip((target_h, target_w), (nh, nw), centres):
        p = centre - target // 2  # the face in the middle of the crop
        if random_crop:  # sd-scripts: shift towards either side, more often by little, to show background
            reach = max(length - centre, centre)
            p += rng.randint(0, reach) + rng.randint(0, reach) - reach
        elif face_range[0] != face_range[1] and face_size > short // 10 and face_size >= 40:
            p += rng.randint(-face_size // 20, face_size // 20)  # a little jitter around the centre
        starts.append(max(0, min(p, length - target)))
    top, left = starts
    crop = np.ascontiguousarray(image[top: top + target_h, left: left + target_w])
    return crop, Conditioning(original, (top, left), (target_h, target_w)), (nw, nh)
