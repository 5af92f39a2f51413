"""The colour detector on images whose colour content is known."""

import numpy as np
import pytest
from PIL import Image

from lorakit.models import demo_data
from lorakit.models.demo_detector import MIN_FRACTION, RADIUS, colour_fraction, concept_rate, shows_colour
from lorakit.models.demo_data import HELD_OUT_COLOUR, PALETTE


def test_fraction_counts_pixels_within_the_radius():
    img = np.zeros((10, 10, 3), np.uint8)
    img[:3] = PALETTE["purple"]  # 30% exact
    img[3:4] = np.asarray(PALETTE["purple"]) + [20, 20, 20]  # 10% at distance 34.6 < 45
    img[4:5] = np.asarray(PALETTE["purple"]) + [30, 30, 30]  # 10% at distance 52 > 45
    assert colour_fraction(img, "purple") == pytest.approx(0.4)
    assert colour_fraction(Image.fromarray(img), PALETTE["purple"]) == pytest.approx(0.4)
    assert colour_fraction(img, "purple", radius=60) == pytest.approx(0.5)


def test_shape_images_with_and_without_the_colour():
    with_colour = [s.image for s in demo_data.concept_set(30)]
    without = [s.image for s in demo_data.pretraining_set(60)]
    assert concept_rate(with_colour) == 1.0
    assert concept_rate(without) == 0.0
    assert all(shows_colour(s.image, s.colour) and shows_colour(s.image, s.background)
               for s in demo_data.pretraining_set(30, seed=5))


def test_threshold_and_blurred_edges():
    # red next to blue mixes to a purplish colour at their boundary: a blurred edge band is not "purple"
    img = np.zeros((64, 64, 3), np.float32)
    img[:, :32], img[:, 32:] = PALETTE["red"], PALETTE["blue"]
    kernel = np.ones(9) / 9
    for c in range(3):
        img[..., c] = np.apply_along_axis(lambda r: np.convolve(np.pad(r, 4, mode="edge"), kernel, "valid"), 1,
                                          img[..., c])
    assert not shows_colour(img.round().astype(np.uint8))
    # a purple patch just over / under MIN_FRACTION of the image
    for side, expected in ((14, True), (12, False)):
        im = np.full((64, 64, 3), PALETTE["white"], np.uint8)
        im[:side, :side] = PALETTE[HELD_OUT_COLOUR]
        assert (side * side / 64 ** 2 >= MIN_FRACTION) == expected
        assert shows_colour(im) is expected
    assert RADIUS < 0.5 * np.linalg.norm(np.subtract(PALETTE["purple"], PALETTE["blue"]))


def test_unknown_colour_and_empty_list():
    with pytest.raises(ValueError, match="known"):
        colour_fraction(np.zeros((2, 2, 3), np.uint8), "mauve")
    assert concept_rate([]) == 0.0
