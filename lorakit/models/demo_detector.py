"""Does an image show a colour? Colour statistics on generated images, to measure what a LoRA taught.

A pixel "has" a colour when it lies within ``RADIUS`` of the colour's RGB (Euclidean, 0-255 scale); an image
"shows" the colour when at least ``MIN_FRACTION`` of its pixels have it.

* ``RADIUS`` = 45: wide enough for a small model's colour drift (its samples of seen colours land within ~10-30
  of the palette value), and under half the distance from the held-out magenta to any blend of training colours
  (96: it lies outside their convex hull), so neither a blurred edge nor a base model mixing colours for a word it
  does not know counts as the concept.
* ``MIN_FRACTION`` = 0.04: the smallest shape of ``demo_data`` (a triangle of circumradius 0.22 x side) covers
  ~6% of the image, while stray pixels of a generated image do not add up to 4%.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from .demo_data import HELD_OUT_COLOUR, PALETTE

__all__ = ["RADIUS", "MIN_FRACTION", "colour_fraction", "shows_colour", "concept_rate"]

RADIUS = 45.0
MIN_FRACTION = 0.04


def _rgb(colour: str | Sequence[int]) -> np.ndarray:
    if isinstance(colour, str):
        if colour not in PALETTE:
            raise ValueError(f"unknown colour {colour!r}; known: {', '.join(PALETTE)}")
        colour = PALETTE[colour]
    return np.asarray(colour, dtype=np.float32)


def colour_fraction(image, colour: str | Sequence[int] = HELD_OUT_COLOUR, radius: float = RADIUS) -> float:
    """Fraction of ``image``'s pixels (a PIL image or an HxWx3 uint8 array) within ``radius`` of ``colour``
    (a PALETTE name or an RGB triple)."""
    pixels = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.float32)[..., :3]
    distance = np.linalg.norm(pixels - _rgb(colour), axis=-1)
    return float((distance < radius).mean())


def shows_colour(image, colour: str | Sequence[int] = HELD_OUT_COLOUR, radius: float = RADIUS,
                 min_fraction: float = MIN_FRACTION) -> bool:
    """True when at least ``min_fraction`` of the pixels are within ``radius`` of ``colour``."""
    return colour_fraction(image, colour, radius) >= min_fraction


def concept_rate(images: Iterable, colour: str | Sequence[int] = HELD_OUT_COLOUR, radius: float = RADIUS,
                 min_fraction: float = MIN_FRACTION) -> float:
    """Fraction of ``images`` that show ``colour`` (0.0 for no images)."""
    flags = [shows_colour(im, colour, radius, min_fraction) for im in images]
    return float(np.mean(flags)) if flags else 0.0
