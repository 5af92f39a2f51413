"""The synthetic pre-training set: deterministic, and the held-out colour never appears in it."""

import numpy as np
import pytest

from lorakit.models import demo_data
from lorakit.models.demo_data import HELD_OUT_COLOUR, PALETTE, TRAIN_COLOURS
from lorakit.models.demo_detector import RADIUS


def _pixels(s):
    return np.asarray(s.image, dtype=np.int16)


def test_same_seed_same_images_and_captions():
    a, b = demo_data.pretraining_set(20, seed=3), demo_data.pretraining_set(20, seed=3)
    assert [s.caption for s in a] == [s.caption for s in b]
    assert all(np.array_equal(_pixels(x), _pixels(y)) for x, y in zip(a, b))
    # image i depends only on (seed, i)
    assert np.array_equal(_pixels(demo_data.sample(7, seed=3)), _pixels(a[7]))
    c = demo_data.pretraining_set(20, seed=4)
    assert sum(np.array_equal(_pixels(x), _pixels(y)) for x, y in zip(a, c)) < 3


def test_held_out_colour_never_in_pretraining_captions_or_pixels():
    samples = demo_data.pretraining_set(300)
    assert HELD_OUT_COLOUR not in TRAIN_COLOURS
    held = np.asarray(PALETTE[HELD_OUT_COLOUR], dtype=np.float32)
    palette = np.asarray([PALETTE[c] for c in TRAIN_COLOURS], dtype=np.int16)
    for s in samples:
        assert HELD_OUT_COLOUR not in s.caption.split() and HELD_OUT_COLOUR not in s.caption
        px = _pixels(s).reshape(-1, 3)
        # every pixel is exactly one training colour (no anti-aliasing), none near the held-out one
        assert (px[:, None, :] == palette[None]).all(-1).any(-1).all()
        assert np.linalg.norm(px - held, axis=-1).min() > RADIUS


def test_captions_name_the_drawn_colours_and_shape():
    for s in demo_data.pretraining_set(50, seed=1):
        assert s.colour != s.background
        assert {s.colour, s.shape, s.background} <= set(s.caption.replace(",", "").split())
        px = _pixels(s).reshape(-1, 3)
        shape_frac = (px == PALETTE[s.colour]).all(-1).mean()
        assert 0.05 < shape_frac < 0.5  # the smallest triangle still covers ~6%
        assert (px == PALETTE[s.background]).all(-1).mean() == pytest.approx(1 - shape_frac)
    assert demo_data.caption("orange", "circle", "white") == "an orange circle on a white background"


def test_palette_colours_are_far_apart():
    rgb = np.asarray(list(PALETTE.values()), dtype=np.float32)
    d = np.linalg.norm(rgb[:, None] - rgb[None], axis=-1) + np.eye(len(rgb)) * 1e9
    assert d.min() > 2 * 40  # no pixel can be within the detector radius of two colours... nearly
    assert d[list(PALETTE).index(HELD_OUT_COLOUR)].min() > 2 * RADIUS


def test_concept_folder(tmp_path):
    folder = demo_data.write_concept_folder(tmp_path, n=5, repeats=10)
    assert folder.name == f"10_{HELD_OUT_COLOUR}"
    pngs, txts = sorted(folder.glob("*.png")), sorted(folder.glob("*.txt"))
    assert len(pngs) == len(txts) == 5 and [p.stem for p in pngs] == [t.stem for t in txts]
    from PIL import Image

    for png, txt in zip(pngs, txts):
        caption = txt.read_text().strip()
        assert HELD_OUT_COLOUR in caption
        px = np.asarray(Image.open(png).convert("RGB"), dtype=np.int16).reshape(-1, 3)
        assert (px == PALETTE[HELD_OUT_COLOUR]).all(-1).mean() > 0.05
    again = demo_data.write_concept_folder(tmp_path / "b", n=5, repeats=10)
    assert all(np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
               for a, b in zip(pngs, sorted(again.glob("*.png"))))
