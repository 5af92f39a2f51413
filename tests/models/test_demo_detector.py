"""The colour detector on images whose colour content is known."""

import numpy as np
import pytest
from PIL import Image

from lorakit.models import demo_data
from lorakit.models.demo_detector import MIN_FRACTION, RADIUS, colour_fraction, concept_rate, shows_colour
from lorakit.models.demo_data import HELD_OUT_COLOUR, PALETTE


def test_fraction_counts_pixels_within_the_radius():
    img = np.zeros((10, 10, 3), np.uint8)
    img[:3] = PALETTE["magenta"]  # 30% exact
    img[3:4] = np.asarray(PALETTE["magenta"]) + [20, 20, 20]  # 10% at distance 34.6 < 45
    img[4:5] = np.asarray(PALETTE["magenta"]) + [30, 30, 30]  # 10% at distance 52 > 45
    assert colour_fraction(img, "magenta") == pytest.approx(0.4)
    assert colour_fraction(Image.fromarray(img), PALETTE["magenta"]) == pytest.approx(0.4)
    assert colour_fraction(img, "magenta", radius=60) == pytest.approx(0.5)


def test_shape_images_with_and_without_the_colour():
    with_colour = [s.image for s in demo_data.concept_set(30)]
    without = [s.image for s in demo_data.pretraining_set(60)]
    assert concept_rate(with_colour) == 1.0
    assert concept_rate(without) == 0.0
    assert all(shows_colour(s.image, s.colour) and shows_colour(s.image, s.background)
               for s in demo_data.pretraining_set(30, seed=5))


def test_threshold_and_blurred_edges():
    # red next to blue mixes to a purplish colour at their boundary: a blurred edge band is not the concept
    img = np.zeros((64, 64, 3), np.float32)
    img[:, :32], img[:, 32:] = PALETTE["red"], PALETTE["blue"]
    kernel = np.ones(9) / 9
    for c in range(3):
        img[..., c] = np.apply_along_axis(lambda r: np.convolve(np.pad(r, 4, mode="edge"), kernel, "valid"), 1,
                                          img[..., c])
    assert not shows_colour(img.round().astype(np.uint8))
    # a patch of the held-out colour just over / under MIN_FRACTION of the image
    for side, expected in ((14, True), (12, False)):
        im = np.full((64, 64, 3), PALETTE["white"], np.uint8)
        im[:side, :side] = PALETTE[HELD_OUT_COLOUR]
        assert (side * side / 64 ** 2 >= MIN_FRACTION) == expected
        assert shows_colour(im) is expected


def _distance_to_hull(point: np.ndarray, vertices: np.ndarray, iterations: int = 20000) -> float:
    """Euclidean distance from ``point`` to the convex hull of ``vertices`` (Frank-Wolfe, float64)."""
    x = vertices.mean(0)
    for k in range(iterations):
        vertex = vertices[np.argmin(vertices @ (x - point))]  # the hull's vertex that most lowers |x - point|^2
        x = x + 2.0 / (k + 2) * (vertex - x)
    return float(np.linalg.norm(x - point))


def test_no_blend_of_training_colours_passes_for_the_held_out_one():
    """A base model that mixes seen colours (blurred edges, an unknown colour word) must not produce the concept:
    the held-out colour lies over twice the detector's radius from every convex combination of training colours."""
    train = np.asarray([PALETTE[c] for c in demo_data.TRAIN_COLOURS], np.float64)
    held = np.asarray(PALETTE[HELD_OUT_COLOUR], np.float64)
    assert _distance_to_hull(held, train) > 2 * RADIUS
    # the reference works: a blend inside the hull is at distance ~0, the old held-out purple was within the radius
    assert _distance_to_hull(0.5 * train[0] + 0.5 * train[2], train) < 1.0
    assert _distance_to_hull(np.asarray([120.0, 40.0, 190.0]), train) < RADIUS


def test_unknown_colour_and_empty_list():
    with pytest.raises(ValueError, match="known"):
        colour_fraction(np.zeros((2, 2, 3), np.uint8), "mauve")
    assert concept_rate([]) == 0.0
