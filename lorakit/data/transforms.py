"""Pixels for one training step: resize to cover the bucket, crop the overhang, flip, colour augmentation, and the
SDXL size/crop conditioning that describes what was done.

* Resize: Pillow's box filter when shrinking (area averaging, what kohya gets from cv2.INTER_AREA), Lanczos when
  enlarging; or the filter ``resize_interpolation`` names (``resize.py``).
* Crop: the overhang is cut evenly from both sides (``random_crop``: at a random offset), width first.
* SDXL conditioning (``Conditioning``): ``original_size_hw`` is the upright image's size before resizing,
  ``crop_top_left`` the pixels cut from the top and left of the resized image (after a flip, from the left of
  the flipped image), ``target_size_hw`` the bucket. This is the SDXL paper's c_crop (and diffusers' SDXL
  trainer's). kohya writes a letterbox offset instead (the margin of fitting the whole image inside the bucket,
  on the other axis, and the centre even under random_crop); we write the crop actually applied.
* ``color_aug``: kohya's, with its probabilities: one time in three, either a hue shift of up to 16 degrees or a
  gamma in [0.95, 1.05]. The gamma is applied to [0, 1] values; kohya raises 0..255 values to the power and clips,
  which brightens or darkens far more than a 5% gamma.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .buckets import BucketChoice
from .resize import resize_channels

__all__ = ["Conditioning", "resize", "crop_to_bucket", "flip", "color_aug", "to_tensor"]

Size = tuple[int, int]


@dataclass(frozen=True)
class Conditioning:
    """SDXL's extra conditioning for one sample, each as (height, width) / (top, left) in pixels."""

    original_size_hw: tuple[int, int]
    crop_top_left: tuple[int, int]
    target_size_hw: tuple[int, int]

    def flipped(self, resized: Size) -> "Conditioning":
        """The same crop seen after a horizontal flip: what was cut on the right is now cut on the left."""
        top, left = self.crop_top_left
        right_cut = resized[0] - left - self.target_size_hw[1]
        return Conditioning(self.original_size_hw, (top, right_cut), self.target_size_hw)


def resize(image: np.ndarray, size: Size, interpolation: str | None = None) -> np.ndarray:
    """[H, W, C] uint8 (C = 3, or 4 with alpha) -> the same at ``size`` (width, height). ``interpolation``:
    sd-scripts' resize_interpolation (``resize.py``); unset: box when shrinking, Lanczos when enlarging."""
    h, w = image.shape[:2]
    if (w, h) == tuple(size):
        return image
    if interpolation is None:
        interpolation = "area" if size[0] * size[1] < w * h else "lanczos"
    if image.shape[2] == 4:  # each channel on its own, as cv2 resizes (no premultiplied alpha)
        alpha = resize_channels(image[..., 3:], size, interpolation)
        return np.concatenate([resize_channels(image[..., :3], size, interpolation), alpha], axis=2)
    return resize_channels(image, size, interpolation)


def crop_to_bucket(image: np.ndarray, choice: BucketChoice, rng: random.Random | None = None,
                   random_crop: bool = False, interpolation: str | None = None) -> tuple[np.ndarray, Conditioning]:
    """Resize to ``choice.resized`` and crop to ``choice.bucket``; with the conditioning that records it.
    ``rng`` is needed only with ``random_crop``; ``interpolation`` as in ``resize``."""
    original = (image.shape[1], image.shape[0])
    image = resize(image, choice.resized, interpolation)
    bw, bh = choice.bucket
    h, w = image.shape[:2]
    if w < bw or h < bh:
        raise ValueError(f"resized image {w}x{h} is smaller than its bucket {bw}x{bh}")
    left = (rng.randint(0, w - bw) if random_crop else (w - bw) // 2) if w > bw else 0
    top = (rng.randint(0, h - bh) if random_crop else (h - bh) // 2) if h > bh else 0
    image = image[top: top + bh, left: left + bw]
    return np.ascontiguousarray(image), Conditioning((original[1], original[0]), (top, left), (bh, bw))


def flip(image: np.ndarray) -> np.ndarray:
    """Mirror left-right."""
    return np.ascontiguousarray(image[:, ::-1])


def color_aug(image: np.ndarray, rng: random.Random) -> np.ndarray:
    """kohya's colour augmentation (see the module doc), drawing from ``rng``. [H, W, 3] only."""
    if rng.random() > 0.33:
        return image
    if rng.random() > 0.5:
        shift_degrees = 2 * rng.uniform(-8, 8)  # kohya: +-8 in OpenCV's 0..180 hue units
        hsv = np.asarray(Image.fromarray(image).convert("HSV"), dtype=np.int32).copy()
        hsv[..., 0] = (hsv[..., 0] + round(shift_degrees * 256 / 360)) % 256
        return np.asarray(Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB"), dtype=np.uint8)
    gamma = rng.uniform(0.95, 1.05)
    return np.clip(np.rint(255.0 * (image / 255.0) ** gamma), 0, 255).astype(np.uint8)


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """[H, W, 3] uint8 -> [3, H, W] float32 in [-1, 1] (the VAE's input range)."""
    image = image if image.flags.writeable and image.flags.c_contiguous else np.array(image)
    return torch.from_numpy(image).permute(2, 0, 1).float().div(127.5).sub(1.0)
