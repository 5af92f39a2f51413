"""Reading training images safely: every failure is a ``DatasetError`` naming the file and what was wrong.

Images are returned upright (the EXIF orientation applied, as viewers show them; kohya ignores it) and as RGB
uint8 arrays [H, W, 3]. Transparency is dropped the way kohya drops it (``convert("RGB")``: the stored colour of
transparent pixels is kept).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import DatasetError

__all__ = ["IMAGE_EXTENSIONS", "list_images", "image_size", "load_image", "check_image_data"]

# kohya's list (lower case here; the match is case-insensitive).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# EXIF orientations 5-8 rotate by 90 degrees: the upright image has width and height swapped.
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}
_ORIENTATION_TAG = 0x0112


def list_images(folder: str | os.PathLike) -> list[str]:
    """The image files directly in ``folder`` (not in sub-folders), sorted by name. Hidden files are left out, as
    sd-scripts' glob leaves them out: macOS writes a ``._name.png`` (AppleDouble, not an image) beside each image
    copied to some drives or zipped."""
    folder = Path(folder)
    return sorted(str(p) for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))


def _open(path: str) -> Image.Image:
    try:
        if os.path.getsize(path) == 0:
            raise DatasetError(f"{path}: the image file is empty (0 bytes)")
        return Image.open(path)
    except FileNotFoundError:
        raise DatasetError(f"{path}: image file not found") from None
    except PermissionError:
        raise DatasetError(f"{path}: image file cannot be read (permission denied)") from None
    except UnidentifiedImageError:
        raise DatasetError(f"{path}: not an image Pillow can read (expected PNG, JPEG, WebP or BMP data)") from None
    except OSError as e:
        raise DatasetError(f"{path}: image file cannot be read ({e})") from None


def image_size(path: str) -> tuple[int, int]:
    """(width, height) of the upright image, from the header (the pixels are not decoded)."""
    return stored_and_upright_size(path)[1]


def stored_and_upright_size(path: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """((width, height) as stored, as the header gives it; (width, height) upright, after the EXIF orientation)."""
    with _open(path) as image:
        width, height = image.size
        try:
            orientation = image.getexif().get(_ORIENTATION_TAG, 1)
        except Exception:  # a damaged EXIF block: treat as upright, as viewers do
            orientation = 1
    if width < 1 or height < 1:
        raise DatasetError(f"{path}: image has no pixels ({width}x{height})")
    return (width, height), ((height, width) if orientation in _SWAPPING_ORIENTATIONS else (width, height))


@contextlib.contextmanager
def _decoding(path: str):
    """The opened image; what its decoding raises becomes the DatasetError of a damaged file."""
    with _open(path) as image:
        try:
            yield image
        except (OSError, SyntaxError, ValueError) as e:
            raise DatasetError(f"{path}: image data is damaged or truncated ({e})") from None


def check_image_data(path: str) -> None:
    """A damaged or truncated file is a DatasetError now, not when training first reads it: the header alone (all
    that sizing reads) does not show it. A PNG's chunks are read and their checksums checked (Pillow's verify, a
    tenth of a decode), a JPEG is decoded at 1/8 scale (Pillow's draft), anything else decoded whole."""
    with _decoding(path) as image:
        if image.format == "PNG":
            image.verify()
            return
        if image.format == "JPEG":
            image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
        image.load()


def _eight_bit(image: Image.Image) -> Image.Image:
    """16-bit greyscale ("I;16", or "I" as Pillow opens some) scaled to 8 bits: convert("RGB") would clip every
    value above 255, turning the image white. (16-bit colour PNGs open as 8-bit RGB already.)"""
    if image.mode not in ("I", "I;16", "I;16B", "I;16L"):
        return image
    values = np.asarray(image).astype(np.float64)
    return Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8), "L")


def load_image(path: str, alpha: bool = False) -> np.ndarray:
    """The upright RGB pixels [H, W, 3] uint8; with ``alpha``, RGBA [H, W, 4] (kohya's alpha_mask: an image
    without transparency gets alpha 255). A truncated or corrupt file is an error, never a partial image."""
    mode = "RGBA" if alpha else "RGB"
    with _decoding(path) as image:
        image.load()
        ImageOps.exif_transpose(image, in_place=True)  # in place: a large photo is decoded once, not copied
        upright = _eight_bit(image)
        pixels = upright if upright.mode == mode else upright.convert(mode)
        return np.array(pixels, dtype=np.uint8)
