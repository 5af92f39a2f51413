"""Aspect-ratio buckets, as kohya sd-scripts makes and assigns them.

Sizes are (width, height) in pixels throughout.

* ``make_bucket_resolutions``: the predefined buckets for a training area ``max_reso`` (w*h): one square of
  side floor(sqrt(w*h) / step) * step, then for every width from ``min_size`` to ``max_size`` in ``step``s the
  tallest height (a multiple of step, at most ``max_size``) whose area does not exceed w*h, with its transpose;
  heights below ``min_size`` are dropped.
* ``BucketSelector.select``: with predefined buckets, an image whose exact size is a bucket keeps it; otherwise
  the bucket of closest aspect ratio, the image scaled to cover it (the side that fits, rounded half up) and
  the overhang cropped later. With ``no_upscale`` the bucket comes from the image itself: scaled down to the
  area if larger (the side, width or height, whose rounding to ``step`` keeps the aspect closer), then each side
  floored to a multiple of ``step``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import DatasetError

__all__ = ["make_bucket_resolutions", "BucketSelector", "BucketChoice", "check_bucket"]

Size = tuple[int, int]


def make_bucket_resolutions(max_reso: Size, min_size: int = 256, max_size: int = 1024,
                            divisible: int = 64) -> list[Size]:
    """Sorted list of (w, h) buckets with area <= max_reso[0] * max_reso[1] (kohya's model_util function)."""
    max_area = max_reso[0] * max_reso[1]
    side = int(math.sqrt(max_area) // divisible) * divisible
    resos = {(side, side)}
    width = min_size
    while width <= max_size:
        height = min(max_size, int((max_area // width) // divisible) * divisible)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
        width += divisible
    return sorted(resos)


@dataclass(frozen=True)
class BucketChoice:
    """``bucket``: the training size; ``resized``: the size the image is scaled to before the centre (or random)
    crop down to ``bucket``."""

    bucket: Size
    resized: Size


class BucketSelector:
    """Chooses each image's bucket. ``predefined``: buckets to choose from (None with ``no_upscale``)."""

    def __init__(self, predefined: list[Size] | None, *, max_area: int | None = None, steps: int = 64,
                 no_upscale: bool = False) -> None:
        if no_upscale and max_area is None:
            raise ValueError("no_upscale bucketing needs max_area")
        if not no_upscale and not predefined:
            raise ValueError("bucketing without no_upscale needs predefined buckets")
        self.no_upscale = no_upscale
        self.max_area = max_area
        self.steps = steps
        self.predefined = list(predefined or [])
        self._predefined_set = set(self.predefined)
        self._ratios = [w / h for w, h in self.predefined]

    def _round(self, x: float) -> int:
        x = int(x + 0.5)
        return x - x % self.steps

    def select(self, width: int, height: int) -> BucketChoice:
        aspect = width / height
        if not self.no_upscale:
            reso = (width, height)
            if reso not in self._predefined_set:
                errors = [abs(r - aspect) for r in self._ratios]
                reso = self.predefined[errors.index(min(errors))]  # first of equal errors, like numpy argmin
            # Scale so the image covers the bucket: match heights when the image is wider, else widths.
            scale = reso[1] / height if aspect > reso[0] / reso[1] else reso[0] / width
            resized = (int(width * scale + 0.5), int(height * scale + 0.5))
            return BucketChoice(reso, resized)

        if width * height > self.max_area:
            rw = math.sqrt(self.max_area * aspect)
            rh = self.max_area / rw
            bw = self._round(rw)
            ar_w = bw / self._round(bw / aspect) if self._round(bw / aspect) else math.inf
            bh = self._round(rh)
            ar_h = self._round(bh * aspect) / bh if bh else math.inf
            if abs(ar_w - aspect) < abs(ar_h - aspect):
                resized = (bw, int(bw / aspect + 0.5))
            else:
                resized = (int(bh * aspect + 0.5), bh)
        else:
            resized = (width, height)  # never enlarged
        bucket = (resized[0] - resized[0] % self.steps, resized[1] - resized[1] % self.steps)
        return BucketChoice(bucket, resized)


def check_bucket(path: str, size: Size, choice: BucketChoice, steps: int) -> None:
    """An image whose bucket would have an empty side (bucket_no_upscale and a side under ``steps``) is refused,
    naming the file (sd-scripts would fail on the empty batch)."""
    if min(choice.bucket) < 1:
        raise DatasetError(f"{path}: image of {size[0]}x{size[1]} pixels is too small: with bucket_no_upscale, a "
                           f"side under bucket_reso_steps ({steps}) leaves an empty bucket "
                           f"({choice.bucket[0]}x{choice.bucket[1]}); remove it or enlarge it")
