"""Small generated images for the data tests."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image


def write_image(path, width, height, seed=0, mode="RGB", **save_args) -> np.ndarray:
    """A random image of ``width`` x ``height`` saved at ``path`` (format from the extension); its pixels."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    channels = 4 if mode == "RGBA" else 3
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)
    Image.fromarray(pixels, mode).save(path, **save_args)
    return pixels


@pytest.fixture
def image_factory(tmp_path):
    def make(relative, width=64, height=64, seed=0, caption=None, extension=".txt", **kw):
        path = tmp_path / relative
        pixels = write_image(str(path), width, height, seed, **kw)
        if caption is not None:
            path.with_suffix(extension).write_text(caption, encoding="utf-8")
        return str(path), pixels
    return make
