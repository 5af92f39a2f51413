"""EXIF orientations 5 (transpose) and 7 (transverse) turn the image by 90 degrees like 6 and 8 (EXIF 2.3, tag
0x0112): the upright size has width and height swapped, and image_size (read from the header, used to bucket)
agrees with the pixels load_image returns."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lorakit.data.images import image_size, load_image


@pytest.mark.parametrize("orientation", [5, 7])
def test_a_transposed_image_is_upright_with_its_sides_swapped(tmp_path, orientation):
    stored = np.random.default_rng(0).integers(0, 256, (4, 10, 3), dtype=np.uint8)  # 10 wide, 4 high
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(stored).save(tmp_path / "t.png", exif=exif)
    # 5: mirrored along the main diagonal (the transpose); 7: along the other diagonal
    upright = stored.transpose(1, 0, 2) if orientation == 5 else stored[::-1, ::-1].transpose(1, 0, 2)
    assert image_size(str(tmp_path / "t.png")) == (4, 10)
    np.testing.assert_array_equal(load_image(str(tmp_path / "t.png")), upright)
