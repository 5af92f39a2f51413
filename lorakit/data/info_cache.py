"""sd-scripts' ``cache_info``: a subset folder's image sizes and captions kept in ``<image_dir>/metadata_cache.json``
(``{image path: {"caption": ..., "resolution": [width, height]}}``, sd-scripts' layout), so that listing a large
dataset needs neither reading every caption file nor opening every image.

The file is reused when its images are exactly the folder's images (matched by file name, so a moved folder
keeps its cache); otherwise it is rebuilt. Edited captions are not noticed: delete the file after editing them
(sd-scripts does not notice either).

``resolution`` is the size as stored, as sd-scripts writes it (imagesize, no EXIF orientation); lorakit trains
images upright, so each entry also holds ``upright_resolution``, which sd-scripts ignores. A file without it
(written by sd-scripts) is rebuilt once: its sizes are wrong for a photo with an EXIF rotation.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Callable

from ..formats.atomic import atomic_write, remove_stale_temporaries
from .errors import DatasetError
from .images import stored_and_upright_size

__all__ = ["CACHE_FILE", "cached_images"]

CACHE_FILE = "metadata_cache.json"
UPRIGHT = "upright_resolution"  # lorakit's key beside sd-scripts' "resolution" (see the module doc)
logger = logging.getLogger(__name__)


def _read(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        logger.warning("%s: unreadable cache_info file (%s); rebuilding it", path, e)
        return None
    return data if isinstance(data, dict) else None


def _entries(data: dict, paths: list[str]) -> list | None:
    """The cached (caption, size) of each of ``paths``, or None when the cache does not describe them all."""
    by_name = {}
    for key, meta in data.items():
        try:
            caption, (w, h) = meta["caption"], meta[UPRIGHT]
        except (KeyError, TypeError, ValueError):
            return None
        if not isinstance(caption, str) or not all(isinstance(v, int) and v > 0 for v in (w, h)):
            return None
        by_name[os.path.basename(key)] = (caption, (w, h))
    names = [os.path.basename(p) for p in paths]
    if set(names) != set(by_name) or len(by_name) != len(data):
        return None
    return [by_name[name] for name in names]


def cached_images(subset, paths: list[str], read: Callable[[], list]) -> list:
    """The subset's ``SourceImage``s with sizes, from the cache file when it matches ``paths``, else from
    ``read()`` (captions) and the image headers, written to the cache file for the next run."""
    from .folders import SourceImage

    cache = os.path.join(subset.image_dir, CACHE_FILE)
    for left in remove_stale_temporaries(subset.image_dir, name=CACHE_FILE):  # the user's folder: only ours go
        logger.info("removed %s, left by a run that was stopped while writing it", left)
    data = _read(cache)
    entries = None if data is None else _entries(data, paths)
    if entries is not None:
        return [SourceImage(p, caption, size) for p, (caption, size) in zip(paths, entries)]
    if data is not None:
        foreign = any(isinstance(m, dict) and UPRIGHT not in m for m in data.values())
        logger.info("%s: %s; rebuilding it", cache, "written without upright sizes (by sd-scripts?)" if foreign
                    else "the folder's images changed since the cache was written")
    images, entries = [], {}
    for im in read():
        stored, upright = stored_and_upright_size(im.path)
        images.append(SourceImage(im.path, im.caption, upright))
        entries[im.path] = {"caption": im.caption, "resolution": list(stored), UPRIGHT: list(upright)}
    text = json.dumps(entries, ensure_ascii=False, indent=2)
    try:
        atomic_write(cache, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    except OSError as e:
        raise DatasetError(f"{cache}: cache_info cannot write its cache file ({e.strerror or e})") from None
    return images
