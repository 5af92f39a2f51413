"""Image resizing by name: sd-scripts' ``resize_interpolation`` choices (library/utils.py resize_image).

sd-scripts resizes with Pillow for lanczos and box, and with OpenCV for the rest. OpenCV is not a dependency here;
its filters are reproduced with PyTorch, whose non-antialiased modes use the same sampling grid as OpenCV's
(pixel centres at +0.5; nearest picks floor(x * scale)):

| name | sd-scripts | here |
| --- | --- | --- |
| lanczos | Pillow LANCZOS | Pillow LANCZOS |
| box | Pillow BOX | Pillow BOX |
| area | cv2.INTER_AREA | Pillow BOX (the same area average when shrinking) |
| nearest | cv2.INTER_NEAREST | torch nearest (floor(x * scale), as OpenCV) |
| bilinear, linear | cv2.INTER_LINEAR | torch bilinear, no antialiasing (as OpenCV) |
| bicubic, cubic | cv2.INTER_CUBIC | torch bicubic, a = -0.75 (OpenCV's a), no antialiasing |
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import DatasetError

__all__ = ["INTERPOLATIONS", "check_interpolation", "resize_channels"]

INTERPOLATIONS = ("lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area", "box")
_PIL = {"lanczos": Image.Resampling.LANCZOS, "box": Image.Resampling.BOX, "area": Image.Resampling.BOX}
_TORCH = {"nearest": "nearest", "bilinear": "bilinear", "linear": "bilinear", "bicubic": "bicubic",
          "cubic": "bicubic"}


def check_interpolation(value, owner: str = "resize_interpolation") -> str | None:
    """``value`` if it is one of sd-scripts' names (or None), else a DatasetError naming ``owner``."""
    if value is None or value in INTERPOLATIONS:
        return value
    raise DatasetError(f"{owner}: {value!r} is not an interpolation; expected one of {', '.join(INTERPOLATIONS)}")


def resize_channels(image: np.ndarray, size: tuple[int, int], interpolation: str) -> np.ndarray:
    """[H, W, C] uint8 (C = 1 or 3) -> [h, w, C] uint8 at ``size`` (width, height) with the named filter."""
    check_interpolation(interpolation)
    width, height = int(size[0]), int(size[1])
    if interpolation in _PIL:
        mode = "L" if image.shape[2] == 1 else "RGB"
        pil = Image.fromarray(np.ascontiguousarray(image[..., 0] if mode == "L" else image), mode)
        out = np.asarray(pil.resize((width, height), _PIL[interpolation]), dtype=np.uint8)
        return out[..., None] if mode == "L" else out
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].double()
    mode = _TORCH[interpolation]
    kwargs = {} if mode == "nearest" else {"align_corners": False}
    y = F.interpolate(x, size=(height, width), mode=mode, **kwargs)
    # OpenCV rounds to nearest and saturates to 0..255
    return y[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()
