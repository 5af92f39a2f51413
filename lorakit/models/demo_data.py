"""The synthetic captioned image set the demo models are pre-trained on: coloured shapes on plain backgrounds.

Every image is one flat-coloured shape (circle, square, triangle, diamond) on a flat background of another
colour, drawn without anti-aliasing, so that every pixel holds exactly one palette colour (the tests rely on
that to show the held-out colour never occurs). Image ``i`` of seed ``s`` depends only on ``(s, i)``: any
subset can be regenerated without drawing the rest.

One colour, ``HELD_OUT_COLOUR``, is never used in pre-training, neither for shapes nor for backgrounds nor in
captions: the demo models have never seen it, so a LoRA trained on ``write_concept_folder``'s images can
visibly teach it (``demo_detector`` measures it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["PALETTE", "HELD_OUT_COLOUR", "TRAIN_COLOURS", "SHAPES", "IMAGE_SIZE", "TEMPLATES", "Sample",
           "draw", "caption", "sample", "pretraining_set", "concept_set", "write_concept_folder"]

# Fixed RGB per colour name, chosen far apart so that the detector's radius around one colour contains no other.
# The held-out colour, magenta, lies outside the convex hull of the training colours (96 RGB units from it, over
# twice the detector's radius): no blend of seen colours (blurred edges, a model mixing two colours for a word
# it does not know) can pass for it. Purple, tried first, lies 44 units from that hull: the base model drew
# purplish blends of blue and red for 20% of "purple" prompts before any LoRA.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 220, 40),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
    "pink": (250, 160, 190),
    "brown": (130, 80, 40),
    "cyan": (40, 200, 210),
    "magenta": (220, 40, 220),
}

HELD_OUT_COLOUR = "magenta"
TRAIN_COLOURS: tuple[str, ...] = tuple(c for c in PALETTE if c != HELD_OUT_COLOUR)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
IMAGE_SIZE = 64

# Caption wordings with their weights: mostly the canonical one, some variety so that the text encoder keys on
# the colour and shape words rather than on positions.
TEMPLATES: tuple[tuple[str, int], ...] = (
    ("a {colour} {shape} on a {background} background", 6),
    ("a {colour} {shape}, {background} background", 2),
    ("{colour} {shape} on {background}", 1),
    ("a {shape} in {colour} on a {background} background", 1),
)


@dataclass(frozen=True)
class Sample:
    image: Image.Image
    caption: str
    colour: str
    shape: str
    background: str


def draw(shape: str, colour: str, background: str, size: int = IMAGE_SIZE,
         centre: tuple[float, float] | None = None, radius: float | None = None) -> Image.Image:
    """One RGB image: ``shape`` in ``colour`` on ``background`` (names of PALETTE). ``radius`` is the
    circumradius in pixels (default: 0.3 x size), ``centre`` (x, y) defaults to the middle."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    cx, cy = centre if centre is not None else (size / 2, size / 2)
    r = radius if radius is not None else 0.3 * size
    img = Image.new("RGB", (size, size), PALETTE[background])
    pen = ImageDraw.Draw(img)
    fill = PALETTE[colour]
    if shape == "circle":
        pen.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        h = r / np.sqrt(2)  # square inscribed in the circle of radius r
        pen.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif shape == "triangle":
        # upright equilateral triangle inscribed in the circle of radius r
        pts = [(cx + r * np.cos(a), cy - r * np.sin(a)) for a in np.deg2rad([90, 210, 330])]
        pen.polygon(pts, fill=fill)
    else:  # diamond
        pen.polygon([(cx, cy - r), (cx + 0.75 * r, cy), (cx, cy + r), (cx - 0.75 * r, cy)], fill=fill)
    return img


def caption(colour: str, shape: str, background: str, template: int = 0) -> str:
    text = TEMPLATES[template][0].format(colour=colour, shape=shape, background=background)
    return re.sub(r"\ba (?=[aeiou])", "an ", text)  # "an orange square"


def sample(index: int, seed: int = 0, colours: tuple[str, ...] = TRAIN_COLOURS,
           shape_colours: tuple[str, ...] | None = None, size: int = IMAGE_SIZE) -> Sample:
    """Image ``index`` of the set ``seed``: a shape colour from ``shape_colours`` (default ``colours``), a
    different background colour from ``colours``, a random shape, size, position and caption wording."""
    rng = np.random.default_rng([seed, index])
    shape_colours = colours if shape_colours is None else shape_colours
    colour = shape_colours[rng.integers(len(shape_colours))]
    background = colour
    while background == colour:
        background = colours[rng.integers(len(colours))]
    shape = SHAPES[rng.integers(len(SHAPES))]
    # circumradius 0.22-0.38 of the side: the smallest triangle still covers ~6% of the image
    r = size * rng.uniform(0.22, 0.38)
    cx, cy = (rng.uniform(r, size - r) for _ in range(2))
    weights = np.array([w for _, w in TEMPLATES], dtype=float)
    template = int(rng.choice(len(TEMPLATES), p=weights / weights.sum()))
    return Sample(draw(shape, colour, background, size, (cx, cy), r), caption(colour, shape, background, template),
                  colour, shape, background)


def pretraining_set(n: int, seed: int = 0, size: int = IMAGE_SIZE) -> list[Sample]:
    """``n`` pre-training samples; only TRAIN_COLOURS (never HELD_OUT_COLOUR) in pixels and captions."""
    return [sample(i, seed, TRAIN_COLOURS, size=size) for i in range(n)]


def concept_set(n: int, seed: int = 1, colour: str = HELD_OUT_COLOUR, size: int = IMAGE_SIZE) -> list[Sample]:
    """``n`` samples whose shape is ``colour`` (on backgrounds of the training colours): the concept to teach."""
    backgrounds = tuple(c for c in TRAIN_COLOURS if c != colour)
    return [sample(i, seed, backgrounds, shape_colours=(colour,), size=size) for i in range(n)]


def write_concept_folder(root: str | Path, n: int = 24, repeats: int = 10, seed: int = 1,
                         colour: str = HELD_OUT_COLOUR, size: int = IMAGE_SIZE) -> Path:
    """Write a kohya-style training folder ``root/{repeats}_{colour}/`` with ``n`` images (``0000.png``...) and
    their captions (``0000.txt``); returns that folder."""
    folder = Path(root) / f"{repeats}_{colour}"
    folder.mkdir(parents=True, exist_ok=True)
    for i, s in enumerate(concept_set(n, seed, colour, size)):
        s.image.save(folder / f"{i:04d}.png")
        (folder / f"{i:04d}.txt").write_text(s.caption + "\n", encoding="utf-8")
    return folder
