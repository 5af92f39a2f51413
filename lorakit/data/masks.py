"""Loss masks, as sd-scripts makes them (train_util.py, custom_train_functions.apply_masked_loss):

* ``alpha_mask``: the image's alpha channel / 255 after the same resize and crop as the pixels (an image without
  transparency masks nothing: alpha 255).
* ``conditioning_data_dir`` (with ``masked_loss``): a mask image per training image, found by the same file stem;
  it must have the image's size; it is resized (area) and centre-cropped to the bucket like the image, flipped
  with it, and its red channel / 255 is the mask (sd-scripts' ``conditioning_images[:, 0] / 2 + 0.5``).

The trainer multiplies the per-pixel loss by the mask area-resized to the latents (``train.loss.apply_mask``).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from .buckets import BucketChoice
from .errors import DatasetError
from .images import list_images, load_image
from .spec import SubsetSpec
from .transforms import crop_to_bucket

__all__ = ["alpha_to_mask", "conditioning_mask", "mask_images"]


def alpha_to_mask(pixels: np.ndarray) -> torch.Tensor:
    """[H, W, 4] uint8 -> [H, W] float32 alpha in [0, 1]."""
    return torch.from_numpy(pixels[..., 3].astype(np.float32) / 255.0)


def mask_images(subset: SubsetSpec, image_paths: list[str]) -> list[str | None]:
    """The mask image of each image of ``subset`` (None for all without conditioning_data_dir). An image without
    a mask image is an error naming both folders."""
    folder = subset.conditioning_data_dir
    if folder is None:
        return [None] * len(image_paths)
    if not os.path.isdir(folder):
        raise DatasetError(f"conditioning_data_dir {folder}: not a folder")
    by_stem = {os.path.splitext(os.path.basename(p))[0]: p for p in list_images(folder)}
    out = []
    for path in image_paths:
        stem = os.path.splitext(os.path.basename(path))[0]
        if stem not in by_stem:
            raise DatasetError(f"{path}: no mask image named {stem}.* in conditioning_data_dir {folder} (masked_loss "
                               "needs one per training image)")
        out.append(by_stem[stem])
    return out


def conditioning_mask(path: str, size: tuple[int, int], choice: BucketChoice, flipped: bool) -> torch.Tensor:
    """The [H, W] mask in [0, 1] of a conditioning image for an image of ``size`` (width, height) in ``choice``."""
    pixels = load_image(path)
    if (pixels.shape[1], pixels.shape[0]) != tuple(size):
        raise DatasetError(f"{path}: mask image is {pixels.shape[1]}x{pixels.shape[0]}, its training image is "
                           f"{size[0]}x{size[1]}; they must be the same size")
    pixels, _ = crop_to_bucket(pixels, choice, interpolation="area")
    red = pixels[:, ::-1, 0] if flipped else pixels[..., 0]
    return torch.from_numpy(np.ascontiguousarray(red).astype(np.float32) / 255.0)
