"""Image loading: upright RGB pixels, and a named error for each kind of bad file."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lorakit.data.errors import DatasetError
from lorakit.data.images import check_image_data, image_size, list_images, load_image

from .conftest import write_image


def test_png_pixels_and_size(tmp_path):
    pixels = write_image(str(tmp_path / "a.png"), 48, 32, seed=3)
    assert image_size(str(tmp_path / "a.png")) == (48, 32)
    assert np.array_equal(load_image(str(tmp_path / "a.png")), pixels)


def test_rgba_and_grey_become_rgb(tmp_path):
    rgba = write_image(str(tmp_path / "t.png"), 16, 8, mode="RGBA")
    assert np.array_equal(load_image(str(tmp_path / "t.png")), rgba[..., :3])  # kohya's convert("RGB")
    Image.fromarray(np.full((8, 8), 77, np.uint8), "L").save(tmp_path / "g.png")
    assert np.array_equal(load_image(str(tmp_path / "g.png")), np.full((8, 8, 3), 77, np.uint8))


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 16 * 4).reshape(4, 16).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as opened:
        assert opened.mode.startswith("I")  # what Pillow makes of a 16-bit greyscale PNG
    expected = np.rint(ramp / 257.0).astype(np.uint8)
    assert np.array_equal(load_image(str(tmp_path / "g16.png")), np.repeat(expected[..., None], 3, axis=2))


def test_exif_orientation(tmp_path):
    # Stored 40 wide x 20 high, with orientation 6 ("rotate 90 clockwise to view"): upright it is 20 x 40.
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :10] = 255  # a white band on the stored left edge -> on the top after the rotation
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "r.png", exif=exif)
    assert image_size(str(tmp_path / "r.png")) == (20, 40)
    upright = load_image(str(tmp_path / "r.png"))
    assert upright.shape == (40, 20, 3)
    assert np.array_equal(upright, np.rot90(stored, k=-1))
    assert upright[:10].min() == 255 and upright[10:].max() == 0


def test_an_upright_rgb_image_is_decoded_once_not_copied(tmp_path, monkeypatch):
    """A large photo's pixels are held once by Pillow and once as the array, as sd-scripts' load_image holds them:
    no upright copy when there is no EXIF rotation and no conversion when the mode is already RGB (a 9000x9000
    image peaked at 1.4 GB instead of 0.77 GB)."""
    path = str(tmp_path / "a.png")
    write_image(path, 24, 16, seed=3)
    calls = []
    for name in ("copy", "convert", "transpose"):
        real = getattr(Image.Image, name)
        monkeypatch.setattr(Image.Image, name, lambda self, *a, _real=real, _name=name, **k: (
            calls.append(_name), _real(self, *a, **k))[1])
    pixels = load_image(path)
    assert calls == [] and pixels.shape == (16, 24, 3) and pixels.flags.writeable


def test_list_images(tmp_path):
    for name in ["b.PNG", "a.jpg", "c.webp", "notes.txt", "d.gif", "._a.jpg", ".hidden.png"]:  # (macOS' ._ files)
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub.png").mkdir()
    assert [p.split("/")[-1] for p in list_images(tmp_path)] == ["a.jpg", "b.PNG", "c.webp"]


def test_zero_size(tmp_path):
    (tmp_path / "z.png").write_bytes(b"")
    for read in (image_size, load_image):
        with pytest.raises(DatasetError, match=r"z\.png: the image file is empty \(0 bytes\)"):
            read(str(tmp_path / "z.png"))


def test_not_an_image(tmp_path):
    (tmp_path / "n.jpg").write_bytes(b"this is text, not a JPEG")
    with pytest.raises(DatasetError, match=r"n\.jpg: not an image Pillow can read"):
        image_size(str(tmp_path / "n.jpg"))


def test_truncated(tmp_path):
    write_image(str(tmp_path / "full.png"), 64, 64)
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    assert image_size(str(tmp_path / "cut.png")) == (64, 64)  # the header is intact
    with pytest.raises(DatasetError, match=r"cut\.png: image data is damaged or truncated"):
        load_image(str(tmp_path / "cut.png"))


@pytest.mark.parametrize("name, damage", [("cut.png", "truncate"), ("flip.png", "flip"), ("cut.jpg", "truncate"),
                                          ("cut.bmp", "truncate")])
def test_check_image_data_finds_what_the_header_hides(tmp_path, name, damage):
    """Sizing reads the header only; check_image_data finds a cut file of each format and a PNG with one byte
    changed inside its pixel data, and passes the intact file. (Pillow cannot open a cut WebP at all, so sizing
    refuses that one already.)"""
    full = tmp_path / f"full{name[name.index('.'):]}"
    write_image(str(full), 96, 80)
    check_image_data(str(full))
    data = bytearray(full.read_bytes())
    if damage == "truncate":
        data = data[: len(data) * 2 // 3]
    else:
        data[len(data) // 2] ^= 0xFF
    (tmp_path / name).write_bytes(bytes(data))
    assert image_size(str(tmp_path / name)) == (96, 80)
    with pytest.raises(DatasetError, match=rf"{name.replace('.', '[.]')}: image data is damaged or truncated"):
        check_image_data(str(tmp_path / name))


def test_missing(tmp_path):
    with pytest.raises(DatasetError, match=r"gone\.png: image file not found"):
        load_image(str(tmp_path / "gone.png"))
