"""A conditioning mask image enlarged to its bucket is resized with the area filter, as sd-scripts' ControlNetDataset
resizes it (cv2.INTER_AREA, also when enlarging; at a whole factor that repeats each pixel), whatever filter the
training image itself uses: a hard mask edge stays hard, with no Lanczos ringing."""

from __future__ import annotations

import numpy as np
from PIL import Image

from lorakit.data.buckets import BucketChoice
from lorakit.data.masks import conditioning_mask


def test_a_mask_enlarged_two_times_repeats_each_pixel(tmp_path):
    red = np.array([[0, 255, 0, 255], [255, 0, 255, 0], [0, 0, 255, 255], [255, 255, 0, 0]], dtype=np.uint8)
    pixels = np.zeros((4, 4, 3), dtype=np.uint8)
    pixels[..., 0] = red
    Image.fromarray(pixels).save(tmp_path / "m.png")
    mask = conditioning_mask(str(tmp_path / "m.png"), (4, 4), BucketChoice((8, 8), (8, 8)), flipped=False)
    expected = np.kron(red, np.ones((2, 2), dtype=np.uint8)).astype(np.float32) / 255.0  # cv2 INTER_AREA at x2
    np.testing.assert_array_equal(mask.numpy(), expected)


def test_a_mask_shrunk_two_times_averages_each_block(tmp_path):
    # cv2.INTER_AREA at /2 is the mean of each 2x2 block (means chosen whole, so no rounding tie); a nearest or
    # bilinear pick of one pixel per block would not give them
    red = np.array([[0, 40, 200, 100], [80, 120, 60, 40], [255, 255, 0, 4], [255, 255, 8, 0]], dtype=np.uint8)
    pixels = np.zeros((4, 4, 3), dtype=np.uint8)
    pixels[..., 0] = red
    pixels[..., 1] = 255 - red  # only red is the mask
    Image.fromarray(pixels).save(tmp_path / "m.png")
    mask = conditioning_mask(str(tmp_path / "m.png"), (4, 4), BucketChoice((2, 2), (2, 2)), flipped=False)
    expected = red.astype(np.float64).reshape(2, 2, 2, 2).mean(axis=(1, 3)).astype(np.float32) / 255.0
    np.testing.assert_array_equal(mask.numpy(), expected)
