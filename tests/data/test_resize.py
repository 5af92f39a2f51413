"""resize_interpolation: each filter against a float64 formula written here (OpenCV's sampling grid), or Pillow."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from lorakit.data.errors import DatasetError
from lorakit.data.resize import INTERPOLATIONS, resize_channels
from lorakit.data.spec import SubsetSpec
from lorakit.data.transforms import resize

IMG = np.random.default_rng(0).integers(0, 256, (9, 13, 3), dtype=np.uint8)


def test_the_names_are_sd_scripts():
    assert INTERPOLATIONS == ("lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area", "box")


@pytest.mark.parametrize("size", [(5, 4), (29, 20)])
def test_nearest_picks_floor_of_x_times_scale(size):
    w, h = size
    got = resize_channels(IMG, size, "nearest")
    ys = [min(math.floor(y * 9 / h), 8) for y in range(h)]
    xs = [min(math.floor(x * 13 / w), 12) for x in range(w)]
    np.testing.assert_array_equal(got, IMG[np.ix_(ys, xs)])


def _linear_ref(img, w, h):
    """OpenCV INTER_LINEAR: source coordinate (x + 0.5) * scale - 0.5, clamped at the edges, no antialiasing."""
    src = img.astype(np.float64)
    H, W = src.shape[:2]
    out = np.zeros((h, w, src.shape[2]))
    for y in range(h):
        sy = min(max((y + 0.5) * H / h - 0.5, 0.0), H - 1)
        y0 = int(math.floor(sy))
        y1, fy = min(y0 + 1, H - 1), sy - y0
        for x in range(w):
            sx = min(max((x + 0.5) * W / w - 0.5, 0.0), W - 1)
            x0 = int(math.floor(sx))
            x1, fx = min(x0 + 1, W - 1), sx - x0
            top = src[y0, x0] * (1 - fx) + src[y0, x1] * fx
            bottom = src[y1, x0] * (1 - fx) + src[y1, x1] * fx
            out[y, x] = top * (1 - fy) + bottom * fy
    return out  # before rounding to uint8


@pytest.mark.parametrize("name", ["bilinear", "linear"])
@pytest.mark.parametrize("size", [(5, 4), (29, 20)])
def test_bilinear_is_opencv_linear(name, size):
    got = resize_channels(IMG, size, name).astype(np.float64)
    assert np.abs(got - _linear_ref(IMG, *size)).max() <= 0.5 + 1e-9  # the nearest integer to the exact value


def test_cubic_differs_from_linear_and_keeps_constant_images():
    flat = np.full((9, 13, 3), 77, dtype=np.uint8)
    for name in ("bicubic", "cubic"):
        np.testing.assert_array_equal(resize_channels(flat, (29, 20), name), 77)
    assert not np.array_equal(resize_channels(IMG, (29, 20), "cubic"), resize_channels(IMG, (29, 20), "linear"))


@pytest.mark.parametrize("name,method", [("lanczos", Image.Resampling.LANCZOS), ("box", Image.Resampling.BOX),
                                         ("area", Image.Resampling.BOX)])
def test_pillow_filters(name, method):
    want = np.asarray(Image.fromarray(IMG).resize((5, 4), method))
    np.testing.assert_array_equal(resize_channels(IMG, (5, 4), name), want)


def test_alpha_is_resized_on_its_own():
    rgba = np.random.default_rng(1).integers(0, 256, (9, 13, 4), dtype=np.uint8)
    got = resize(rgba, (5, 4), "lanczos")
    np.testing.assert_array_equal(got[..., :3], resize_channels(rgba[..., :3], (5, 4), "lanczos"))
    want_alpha = np.asarray(Image.fromarray(rgba[..., 3], "L").resize((5, 4), Image.Resampling.LANCZOS))
    np.testing.assert_array_equal(got[..., 3], want_alpha)


def test_unknown_name_is_an_error_naming_the_option():
    with pytest.raises(DatasetError, match="resize_interpolation: 'cubicc' is not an interpolation"):
        SubsetSpec(image_dir="x", resize_interpolation="cubicc")
